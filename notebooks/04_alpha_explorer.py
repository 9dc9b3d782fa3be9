# %% [markdown]
# # 04 · Alpha explorer
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bh-routing/bh-routing/blob/main/notebooks/04_alpha_explorer.ipynb)
#
# *(Badge and install cell point at the repository set once in `pyproject.toml`, `[tool.bh-routing]`;
# a fork changes it there and runs `python scripts/sync_colab_cells.py`.)*
#
# Drag the sliders and watch how many experts each token gets. Everything the sliders touch is
# **cached**: router logits are captured once (notebook 01's file is reused when present), one
# null is fitted per kernel, and every p-value is computed once. A slider move only re-runs the
# multiple-testing counts, which takes milliseconds. The **run on the model** button then tries
# the current setting on the live model: greedy generation and perplexity, next to native top-k.
#
# Controls: `alpha` (level of the test), `max_k` / `min_k` (ceiling and floor on experts per
# token), `method` (BH, Benjamini-Yekutieli, Bonferroni, Holm, or static top-k with k = max_k),
# `kernel` (which null's p-values), `layer` (the layer in the histogram and the token view).
# %% [markdown]
# **Setup.** On Colab the next cell installs the package with its notebook extras and
# transformers v5 (Colab preinstalls an older transformers), from the first of: a checkout around
# this notebook, `BH_ROUTING_DIR` (e.g. a Google Drive folder), a `bh_routing-*.whl` uploaded next to
# the notebook, a clone of `REPO_URL`. When none works it stops with one message saying how to get
# in. Anywhere else (your machine, CI) it does nothing: `pip install -e ".[notebooks]"` yourself.

# %%
import importlib
import os
import subprocess
import sys
from pathlib import Path

IN_COLAB = "google.colab" in sys.modules
REPO_URL = os.environ.get("BH_ROUTING_REPO") or "https://github.com/bh-routing/bh-routing.git"  # see pyproject.toml [tool.bh-routing]
PIP_INSTALL = ["-m", "pip", "install", "-q", "-e", ".[notebooks]", "transformers>=5.23,<6"]
WAYS_IN = (
    "Ways in: (1) set BH_ROUTING_REPO to a repository Colab can clone (your fork's URL: "
    "os.environ['BH_ROUTING_REPO'] = '<git URL>') and rerun this cell; "
    "(2) build a wheel with `python -m pip wheel --no-deps -w dist .` in a checkout, upload "
    "dist/bh_routing-*.whl with the Files panel and rerun; (3) put a checkout in Google Drive, mount it "
    "and set BH_ROUTING_DIR to its folder. README.md, section 'Colab', says the same."
)
if IN_COLAB:
    here = Path.cwd()
    repo = here.parent if (here.parent / "pyproject.toml").is_file() else Path(
        os.environ.get("BH_ROUTING_DIR") or here / "bh-routing")
    wheels = sorted(here.glob("bh_routing-*.whl"))
    if not (repo / "pyproject.toml").is_file() and not wheels:
        clone = subprocess.run(["git", "clone", "--depth", "1", REPO_URL, str(repo)], capture_output=True, text=True)
        if clone.returncode != 0:
            reason = (clone.stderr or "").strip().splitlines()[-1:] or ["git failed"]
            raise SystemExit(f"Cannot install bh-routing: cloning {REPO_URL} failed ({reason[0]}). {WAYS_IN}")
    if (repo / "pyproject.toml").is_file():
        install = subprocess.run([sys.executable, *PIP_INSTALL], cwd=repo)
        sys.path.insert(0, str(repo))  # the editable install is only seen by new processes
    else:
        install = subprocess.run([sys.executable, *PIP_INSTALL[:4], f"{wheels[-1]}[notebooks]", PIP_INSTALL[-1]])
    if install.returncode != 0:
        raise SystemExit(f"Cannot install bh-routing: pip failed (its output is above). {WAYS_IN}")
    importlib.invalidate_caches()
    if (repo / "notebooks").is_dir():
        os.chdir(repo / "notebooks")  # outputs/ then lands next to the notebooks, as locally

# %% [markdown]
# **Parameters** (`BH_MODEL`, `BH_NOTEBOOK_SMALL` as in notebook 01).

# %%
from bh_helpers.app import notebook as nbu

MODEL_NAME = nbu.model_choice()  # BH_MODEL, default "auto"
print(nbu.check_runtime(MODEL_NAME))  # GPU or not, and which model "auto" means here
SMALL = nbu.small_mode()  # BH_NOTEBOOK_SMALL=1/0; default: small without a CUDA GPU
THREADS = nbu.cpu_threads()  # BH_THREADS; default on CPU: 1 (fastest on a busy 2-core machine)
CALIBRATION_TOKENS = 4096 if SMALL else 131_072  # as in notebook 01 (its saved logits are reused)
WINDOW = 256
KERNELS = ["gaussian", "tophat", "epanechnikov", "linear", "empirical"]
EXPLORER_TOKENS = 2048  # cached tokens the sliders work on (the first ones, so they read as text)
PROMPT = "The"  # for the "run on the model" button
EVAL_TEXTS = 2 if SMALL else 8  # evaluation documents for the button's perplexity
MAX_NEW_TOKENS = 16 if SMALL else 32
OUTPUT_ROOT = "outputs"
print(f"model={MODEL_NAME!r} small={SMALL}")

# %% [markdown]
# ## 1. Cache: logits, nulls per kernel, p-values

# %%
import time

from bh_helpers.app import paths
from bh_helpers.models.texts import corpus_texts
from bh_helpers.nulls.fit import fit_null_bank
from bh_helpers.app.widgets import AlphaExplorer

model, tokenizer = nbu.load_notebook_model(MODEL_NAME)
MODEL_KEY = paths.model_key(model)
OUT = paths.output_dir(MODEL_KEY, OUTPUT_ROOT)
captured, model, tokenizer = nbu.calibration_logits(
    OUT / nbu.LOGITS_NAME, model=model, tokenizer=tokenizer, max_tokens=CALIBRATION_TOKENS, window=WINDOW,
)
start = time.perf_counter()
banks = {kernel: fit_null_bank(captured, kernel=kernel, model_id=MODEL_KEY) for kernel in KERNELS}
# the same Gaussian null on the per-token z-score (section 3 says why): one more entry of the dropdown
banks["gaussian/zscore"] = fit_null_bank(captured, kernel="gaussian", statistic="zscore", model_id=MODEL_KEY)
print(f"{captured}; {len(banks)} null banks fitted in {time.perf_counter() - start:.1f} s")

start = time.perf_counter()
explorer = AlphaExplorer(
    captured, banks, captured.token_ids, model=model, tokenizer=tokenizer, max_tokens=EXPLORER_TOKENS,
)
print(f"p-values of {explorer.num_tokens} tokens x {len(explorer.layers)} layers x {len(banks)} kernels "
      f"precomputed in {time.perf_counter() - start:.1f} s")

# %% [markdown]
# ## 2. The explorer
# Each slider move prints its update time (computation) and drawing time. Hover over a token in
# the coloured text to see its experts. The button runs greedy generation from `PROMPT` and
# perplexity on a few evaluation documents, for native top-k and for the current setting.
# (The interactive widget needs a live kernel: in a static render only its first state shows.)

# %%
explorer.widget(prompt=PROMPT, eval_texts=corpus_texts("evaluation", EVAL_TEXTS), max_new_tokens=MAX_NEW_TOKENS)

# %% [markdown]
# ## 3. The same, programmatically
# The sliders call `explorer.update(**settings)`; so can you. The table sweeps alpha for BH
# with the first kernel (mean experts per token per layer, and how often the floor `min_k` and
# the ceiling `max_k` bind). **What to look for:** mean k grows with alpha; where most tokens sit
# at the floor, BH finds no expert "significant" beyond the one it must keep, and the null or
# alpha is the lever, not max_k.

# %%
ALPHAS = [1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.5]
table = explorer.alpha_table(ALPHAS, method="bh", min_k=1, max_k=8)
table.round({column: 3 for column in table.columns if column != "alpha"})

# %%
state = explorer.update(alpha=0.2, method="bh", min_k=1, max_k=8, layer=explorer.layers[-1])
nbu.show(explorer.figure(state), OUT / "04_explorer_alpha0.2.png")
print(f"median update time {explorer.median_update_ms():.1f} ms over {len(explorer.timings_ms)} updates")

# %% [markdown]
# Kernels compared at one setting: the nulls differ most in the tail, so they disagree most at
# small alpha.

# %%
import pandas as pd

pd.DataFrame({
    kernel: {f"alpha={a:g}": explorer.update(kernel=kernel, alpha=a).mean_k for a in (0.01, 0.1, 0.5)}
    for kernel in KERNELS
}).T.round(3)

# %% [markdown]
# **Test statistic and target compute.** The router's softmax ignores a shift of all of a
# token's logits; a null pooled over raw logits does not, so with `"raw"` a token whose logits
# all sit a little higher gets more experts for no reason the router would recognise. The
# `gaussian/zscore` bank tests each logit minus the token's mean, over the token's spread. The
# "target k" slider (and `explorer.alpha_for_target`) picks the alpha that reaches a mean number
# of experts per token, so the two statistics can be compared at equal compute: same mean k,
# different tokens getting the experts (the floor rate shows how many sit at `min_k`).

# %%
rows = {}
for name in ("gaussian", "gaussian/zscore"):
    for target in (2.0, 4.0):
        alpha = explorer.alpha_for_target(target, kernel=name, method="bh", min_k=1, max_k=8)
        st = explorer.update(kernel=name, alpha=alpha, method="bh", min_k=1, max_k=8)
        rows[(name, target)] = {"alpha": alpha, "mean k": st.mean_k, "at floor": float((st.counts == 1).double().mean())}
pd.DataFrame(rows).T

# %% [markdown]
# **One alpha per layer.** One global alpha reaches the target on average; the layers differ.
# `alpha_for_target(..., per_layer=True)` (the widget's "target in every layer" box) gives each
# layer the alpha that reaches the target in that layer, and `update(alpha={layer: alpha})` routes
# with them (adaptive FDR; `BHSelector` and the sweeps take the same per-layer levels).

# %%
TARGET = 3.0
previous = explorer.settings  # restored below: the next section runs the current setting
global_alpha = explorer.alpha_for_target(TARGET, kernel="gaussian", method="bh", min_k=1, max_k=8)
per_layer_alpha = explorer.alpha_for_target(TARGET, per_layer=True, kernel="gaussian", method="bh", min_k=1, max_k=8)
per_layer_table = pd.DataFrame({
    "one alpha": explorer.update(kernel="gaussian", alpha=global_alpha).mean_k_per_layer,
    "alpha per layer": explorer.update(alpha=per_layer_alpha).mean_k_per_layer,
    "the per-layer alphas": [per_layer_alpha[layer] for layer in explorer.layers],
}, index=[f"layer {layer}" for layer in explorer.layers]).round(4)
explorer.update(**vars(previous))
per_layer_table

# %% [markdown]
# ## 4. The button, programmatically
# What "run on the model" does, for the explorer's current setting: the last one set above,
# printed first (the cells above leave it wherever their last `update` put it).

# %%
print(f"current setting: {explorer.settings}")
result = explorer.run_live(PROMPT, eval_texts=corpus_texts("evaluation", EVAL_TEXTS), max_new_tokens=MAX_NEW_TOKENS)
pd.DataFrame({
    "native top-k": {"text": result["native_text"], "perplexity": result.get("native_ppl"),
                     "mean k": explorer.native_k, "generate s": result["native_generate_s"]},
    "current setting": {"text": result["routed_text"], "perplexity": result.get("routed_ppl"),
                        "mean k": result["routed_mean_k"], "generate s": result["generate_s"]},
}).T
