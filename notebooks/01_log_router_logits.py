# %% [markdown]
# # 01 · Log router logits
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bh-routing/bh-routing/blob/main/notebooks/01_log_router_logits.ipynb)
#
# *(Badge and install cell point at the repository set once in `pyproject.toml`, `[tool.bh-routing]`;
# a fork changes it there and runs `python scripts/sync_colab_cells.py`.)*
#
# A mixture-of-experts (MoE) layer scores every expert with a **router logit** and, natively,
# runs the top-k of them (OLMoE: 8 of 64). Benjamini-Hochberg (BH) routing instead asks, per
# token, *which experts' logits are unusually large* compared to a **null distribution** of
# router logits. This notebook collects the raw material for that null:
#
# 1. load the model (OLMoE-1B-7B on a GPU with internet, otherwise the tiny OLMoE embedded in the package);
# 2. run it over calibration text with capture hooks and log the float32 router logits of every MoE layer;
# 3. save them for notebooks 02 and 04;
# 4. look at them: logit distributions per layer, expert usage, which tokens go where.
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
# **Parameters.** `BH_MODEL` picks the model (`auto`, `tiny`, or a hub id) and
# `BH_NOTEBOOK_SMALL=1` shrinks the run to CI size; without the variable the notebook runs small
# exactly when there is no GPU.

# %%
from bh_helpers.app import notebook as nbu

MODEL_NAME = nbu.model_choice()  # BH_MODEL, default "auto"
print(nbu.check_runtime(MODEL_NAME))  # GPU or not, and which model "auto" means here
SMALL = nbu.small_mode()  # BH_NOTEBOOK_SMALL=1/0; default: small without a CUDA GPU
THREADS = nbu.cpu_threads()  # BH_THREADS; default on CPU: 1 (fastest on a busy 2-core machine)
CALIBRATION_TOKENS = 4096 if SMALL else 131_072  # calibration tokens, half prose, half code (as the demo)
WINDOW = 256  # tokens per sequence
BATCH_SIZE = 8
OUTPUT_ROOT = "outputs"  # relative to this notebook
print(f"model={MODEL_NAME!r} small={SMALL} calibration tokens={CALIBRATION_TOKENS} window={WINDOW}")

# %% [markdown]
# ## 1. Load the model
# `load_model("auto")` takes OLMoE-1B-7B from the hub when a CUDA GPU and the hub are available
# (fp16 on a T4, bf16 on Ampere and newer) and the embedded tiny OLMoE (6 MoE layers of 64
# experts, top-8, trained for this project) otherwise. GPU memory is freed first, and a model
# that does not fit is spread over GPU and CPU with `device_map="auto"`.

# %%
import pandas as pd
import torch

from bh_helpers.app import paths
from bh_helpers.models import describe_model
from bh_helpers.report import logit_plots, tables

model, tokenizer = nbu.load_notebook_model(MODEL_NAME)
MODEL_KEY = paths.model_key(model)
OUT = paths.output_dir(MODEL_KEY, OUTPUT_ROOT)
pd.DataFrame([describe_model(model)])

# %% [markdown]
# ## 2. Capture router logits on calibration text
# The calibration slice ships with the package (prose and code, disjoint from the evaluation
# slice used later). It is captured exactly as the demo and the CLI capture it
# (`bh_helpers.capture.capture_calibration`): documents joined by EOS, cut into windows of
# `WINDOW` tokens. A forward pre-hook on each MoE block recomputes the router logits from the
# block input in float32; every layer keeps the same tokens, so row `i` of every layer is one token.
# The file is saved beside the notebook's outputs; notebooks 02 and 04 reuse it.

# %%
LOGITS_PATH = OUT / nbu.LOGITS_NAME
captured, model, tokenizer = nbu.calibration_logits(LOGITS_PATH, model=model, tokenizer=tokenizer,
                                                    max_tokens=CALIBRATION_TOKENS, window=WINDOW,
                                                    batch_size=BATCH_SIZE)
print(f"saved {captured.num_tokens} tokens x {len(captured)} layers to {LOGITS_PATH} "
      f"({LOGITS_PATH.stat().st_size / 1e6:.1f} MB)")

# %% [markdown]
# ## 3. What router logits look like
# Grey: all logits of a layer (pooled over experts), the distribution a pooled null describes.
# Red and blue: each token's largest and 8th-largest logit, the experts native top-8 runs.
# **What to look for:** the chosen experts sit in the right tail of the pooled distribution. The
# further the red curve is from the grey bulk, the more confidently the router separates a few
# experts from the rest; where the blue curve overlaps the bulk, the last native experts are not
# distinguishable from "typical" logits, which is exactly the case BH can skip.

# %%
nbu.show(logit_plots.plot_logit_distributions(captured), OUT / "01_logit_distributions.png")

# %%
stats = pd.DataFrame({
    layer: {
        "mean": float(x.mean()), "std": float(x.std()),
        "top-1 mean": float(x.max(-1).values.mean()),
        "top-8 margin (1st - 8th)": float((x.topk(8, -1).values[:, 0] - x.topk(8, -1).values[:, -1]).mean()),
    }
    for layer, x in captured.items()
}).T.rename_axis("layer")
stats.round(3)

# %% [markdown]
# ## 4. Expert usage under native top-8
# **What to look for:** a flat sorted-usage curve at 8/64 means a balanced router (what the
# load-balancing loss trains for); a steep head means a few experts take most tokens, which a
# per-token adaptive rule will also reflect.

# %%
nbu.show(logit_plots.plot_expert_usage(captured), OUT / "01_expert_usage.png")

# %% [markdown]
# ## 5. Which tokens route where
# First, the top-3 experts of the first tokens of one calibration window in every layer;
# then, for the most used experts of the middle layer, the tokens they receive most often.
# Experts often specialise on token types (punctuation, whitespace, code keywords).

# %%
tables.routing_table(captured, tokenizer, sequence=0, tokens=16)

# %%
MIDDLE = captured.layers[len(captured.layers) // 2]
tables.top_tokens_per_expert(captured, tokenizer, layer=MIDDLE, experts=8)

# %% [markdown]
# **Next:** notebook 02 fits null distributions to these logits and checks them on held-out text.
