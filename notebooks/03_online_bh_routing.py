# %% [markdown]
# # 03 · Online BH routing
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bh-routing/bh-routing/blob/main/notebooks/03_online_bh_routing.ipynb)
#
# *(Badge and install cell point at the repository set once in `pyproject.toml`, `[tool.bh-routing]`;
# a fork changes it there and runs `python scripts/sync_colab_cells.py`.)*
#
# Now the model itself is routed with BH. Inside `with route(model, BHSelector(...))` every MoE
# block computes its router logits, turns them into p-values with the null bank, lets BH pick
# how many experts each token gets (between `min_k` and `max_k`), and runs only those experts;
# on exit the model is restored exactly. This notebook:
#
# 1. generates text side by side with the native top-k model and shows how many experts every
#    token got;
# 2. measures perplexity and speed against native;
# 3. runs a small sweep of alpha and compares BH with **compute-matched** static top-k (top-k at
#    the same mean number of experts, interpolated between integer k), the fair baseline;
# 4. writes a markdown report with the tables and figures.
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
# **Parameters** (`BH_MODEL`, `BH_NOTEBOOK_SMALL` as in notebook 01). `WEIGHTS="softmax"`
# keeps OLMoE's own weighting of the chosen experts (raw router probabilities,
# `norm_topk_prob=False`), so top-8 is exactly the native model.

# %%
from bh_helpers.app import notebook as nbu

MODEL_NAME = nbu.model_choice()  # BH_MODEL, default "auto"
print(nbu.check_runtime(MODEL_NAME))  # GPU or not, and which model "auto" means here
SMALL = nbu.small_mode()  # BH_NOTEBOOK_SMALL=1/0; default: small without a CUDA GPU
THREADS = nbu.cpu_threads()  # BH_THREADS; default on CPU: 1 (fastest on a busy 2-core machine)
METHOD, ALPHA, MIN_K, MAX_K = "bh", 0.5, 1, 8  # the BH setting shown first
WEIGHTS = "softmax"
PROMPTS = ["The history of the", "def read_config(path):"]
MAX_NEW_TOKENS = 24 if SMALL else 48
# held-out evaluation slice of the embedded corpus; on OLMoE in full mode WikiText-2 (test split, through `datasets`);
# BH_EVAL_DATASETS=prose,code overrides (e.g. offline)
EVAL_DATASETS = nbu.eval_datasets(["prose", "code"] if SMALL or MODEL_NAME == "tiny" else ["wikitext2"])
EVAL_TOKENS = 1024 if SMALL else 8192  # tokens per data set
WINDOW = 128 if SMALL else 256  # perplexity windows, stride = window (no overlap): 8 windows per data set when small
SWEEP_TOPK = (1, 2, 3, 4, 6, 8) if SMALL else tuple(range(1, 9))
OUTPUT_ROOT = "outputs"
print(f"model={MODEL_NAME!r} small={SMALL} alpha={ALPHA} eval tokens={EVAL_TOKENS}")

# %% [markdown]
# ## 1. Model and null bank
# For the embedded model the null bank committed under `bh_helpers/data/kde_models/tiny-olmoe/` (installed with the package) is used; for
# another model, the bank notebook 02 saved (or, failing that, one fitted here on 4096
# calibration tokens).

# %%
import pandas as pd
from IPython.display import HTML, Markdown, display

from bh_helpers.app import paths, pipeline
from bh_helpers.models.texts import evaluation_texts
from bh_helpers.report import plots
from bh_helpers.evaluation.scoring import perplexity
from bh_helpers.evaluation.generate import generate_side_by_side
from bh_helpers.evaluation.speed import measure_speed
from bh_helpers.report.assemble import report_step
from bh_helpers import BHSelector, NativeSelector, route

model, tokenizer = nbu.load_notebook_model(MODEL_NAME)
MODEL_KEY = paths.model_key(model)
OUT = paths.output_dir(MODEL_KEY, OUTPUT_ROOT)
bank, bank_source = nbu.find_null_bank(MODEL_KEY, OUT, model=model, tokenizer=tokenizer, prefer_own=not SMALL)
bank.check_compatible(model)
selector = BHSelector(null_bank=bank, method=METHOD, alpha=ALPHA, min_k=MIN_K, max_k=MAX_K, weights=WEIGHTS)
native = NativeSelector.for_model(model)
print(f"{MODEL_KEY}: {bank} ({bank_source})")
print(f"routing with {selector}; native: {native}")

# %% [markdown]
# ## 2. Generation side by side
# Greedy decoding from the same prompts, native top-k and BH. With fewer experts the text can
# drift from the native continuation; **what to look for** is whether it stays fluent.

# %%
table, views = generate_side_by_side(model, tokenizer, PROMPTS, selector, max_new_tokens=MAX_NEW_TOKENS)
table

# %% [markdown]
# **Experts per token over the generated text** (mean over layers; hover for the value).
# The first tokens are the prompt (one prefill pass), the rest were generated one at a time.
# BH gives more experts where the router is unsure which expert fits, fewer where one expert
# stands out.

# %%
for (tokens, counts), prompt in zip(views, PROMPTS):
    display(HTML(plots.token_view_html(tokens, counts.double().mean(dim=1).numpy(), vmin=MIN_K, vmax=MAX_K)))
tokens, counts = views[0]
nbu.show(plots.plot_k_histogram({f"{METHOD} alpha={ALPHA}": counts}, max_k=MAX_K), OUT / "03_k_histogram.png")

# %% [markdown]
# ## 3. Perplexity and speed against native
# Protocol: documents joined by EOS, windows of `WINDOW` tokens with stride `WINDOW`,
# token-weighted mean NLL, first `EVAL_TOKENS` tokens of each data set. Speed: greedy
# generation of `MAX_NEW_TOKENS` tokens from 64-token prompts, batch 1, after one warm-up.
# The routed model dispatches its variable number of experts in Python (`bh_helpers.routing.dispatch`),
# so on CPU and for a model this small it is usually *slower* than the fused native kernels:
# expert compute is the saving, and it only becomes wall-clock speed where experts dominate.

# %%
data = {name: evaluation_texts(name, tokenizer, max_tokens=EVAL_TOKENS) for name in EVAL_DATASETS}
quality = []
for label, sel in [("native", native), (f"{METHOD} alpha={ALPHA}", selector)]:
    for name, texts in data.items():
        # NativeSelector through route() computes what the untouched model does (its top-k, its weights).
        with route(model, sel) as rec:
            ppl = perplexity(model, tokenizer, texts, window=WINDOW, stride=WINDOW, progress=False)
        quality.append({"routing": label, "dataset": name, "perplexity": ppl.perplexity,
                        "mean k": rec.summary()["mean_k"], "tokens": ppl.n_tokens})
pd.DataFrame(quality).set_index(["routing", "dataset"]).round(3)

# %%
speed_prompts = [t for texts in data.values() for t in texts[:2]]
speed_kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, prompt_tokens=64, batch_size=1, progress=False)
speed = {"native (untouched model)": measure_speed(model, tokenizer, speed_prompts, **speed_kwargs)}
with route(model, selector):
    speed[f"{METHOD} alpha={ALPHA}"] = measure_speed(model, tokenizer, speed_prompts, **speed_kwargs)
pd.DataFrame({label: {"prefill tok/s": s.prefill_tokens_per_s, "decode tok/s": s.decode_tokens_per_s,
                      "device": s.device, "dtype": s.dtype} for label, s in speed.items()}).T

# %% [markdown]
# ## 4. Sweep: quality against compute, against controls that ran at the same compute
# **Which statistic is tested.** The router's softmax ignores a shift of all of a token's logits,
# but a null pooled over *raw* logits does not: a token whose logits are all a little higher gets
# more BH rejections with the same experts. `statistic="centred"` tests each logit minus the
# token's mean, `"zscore"` also divides by the token's spread (both are shift-invariant, like the
# router); `trim=m` fits the null without each token's `m` largest values, so the experts the
# router picks do not inflate it. One bank per statistic, fitted on the same calibration logits.
#
# **Compute targets, not hand-picked alphas, matched once routed.** For each target mean k, the
# alpha that reaches it is solved on the *routed* model's own router logits (route, capture,
# solve again, until the realised mean k on calibration text is within 0.02 of the target): a
# routed layer sees routed inputs, and an alpha solved on the native logits overshoots.
#
# **The strongest controls.** The top-k line is interpolated, not a policy anyone ran. Each BH row
# is followed by three that do run at its realised compute: *mixed top-k* (each token gets the
# floor or ceiling of the BH row's per-layer mean k, at random), *shuffled* (BH's own per-token
# counts permuted across the tokens) and the *static chord*: per window, one of the two static
# per-layer allocations (an integer k per layer, fitted on calibration text) whose totals bracket
# the row's mean k. Layers differ in what a missing expert costs, so the static allocation is the
# strongest static policy; the verdict reads each row against its strongest control. Beside the
# one-alpha family runs "per-layer budgets + BH": per-layer alphas that give each layer the static
# allocation's k.
#
# **Tune, then confirm.** Every data set is split by document: the whole grid runs on the
# even-numbered documents, the best configuration of each family (against its strongest control)
# is kept, and only those run again, with their controls, on the odd-numbered documents. The
# verdict is read there, on text nothing was chosen on. Rerunning the cell resumes both sweeps.

# %%
from bh_helpers.capture import capture_calibration, window_batches
from bh_helpers.experiments.comparison import compare_with_controls
from bh_helpers.experiments.configs import bank_name
from bh_helpers.experiments.evaluate import perplexity_sweep, sweep_results_path
from bh_helpers.experiments.grids import sweep_grid
from bh_helpers.experiments.k_matching import RoutedBudget
from bh_helpers.experiments.static_allocation import static_allocation_path
from bh_helpers.experiments.tune_confirm import confirmation_configs, pick_on_tuning
from bh_helpers.models.texts import calibration_token_ids, split_name
from bh_helpers.nulls.fit import fit_captured
from bh_helpers.report.verdict import comparison_markdown, verdict_markdown

CALIBRATION_TOKENS = 2048 if SMALL else 16384
STATISTICS = ("raw", "zscore")
MEAN_KS = (2.0, 4.0) if SMALL else (2.0, 4.0, 5.0)
BATCH = pipeline.room_for(model, WINDOW, 8)
calibration = capture_calibration(model, tokenizer, max_tokens=CALIBRATION_TOKENS, model_id=MODEL_KEY,
                                  batch_size=pipeline.room_for(model, 256, 8), progress=False)
banks = {bank_name("gaussian", s): fit_captured(calibration, statistic=s, model_id=MODEL_KEY)
         for s in STATISTICS}
# the static per-layer allocations (greedy by calibration perplexity on the embedded model, the
# separable proxy on 16-layer OLMoE), and the routed solve of each target's alpha
static_path = static_allocation_path(model, tokenizer, method="separable" if SMALL else "auto", max_k=MAX_K,
                                     max_tokens=512 if SMALL else 2048, window=WINDOW, batch_size=BATCH,
                                     weights=WEIGHTS)
routed_batches = window_batches(calibration_token_ids(tokenizer, max_tokens=1024 if SMALL else 4096),
                                window=WINDOW, batch_size=BATCH)
configs = sweep_grid(banks=banks, calibration=calibration, methods=(METHOD,), alphas=(), mean_ks=MEAN_KS,
                     max_ks=(MAX_K,), min_ks=(MIN_K,), topk_max=max(SWEEP_TOPK), top_ps=(), static_path=static_path,
                     budget_for=lambda bank: RoutedBudget(model, bank, routed_batches, weights=WEIGHTS))
settings = dict(max_tokens=EVAL_TOKENS, window=WINDOW, stride=WINDOW, weights=WEIGHTS)
sweep = dict(null_bank=banks, batch_size=BATCH, model_id=MODEL_KEY, static_path=static_path, progress=False, **settings)
tune_sets = [split_name(d, "tune") for d in EVAL_DATASETS]
tuning = perplexity_sweep(model, tokenizer, configs, datasets=tune_sets,
                          results_path=sweep_results_path(OUT, banks[bank_name("gaussian")], configs, sets=tune_sets,
                                                          **settings), **sweep)
picks = pick_on_tuning(compare_with_controls(tuning), tuning, targets=MEAN_KS)
confirm = confirmation_configs(configs, picks)
confirm_sets = [split_name(d, "confirm") for d in EVAL_DATASETS]
results = perplexity_sweep(model, tokenizer, confirm, datasets=confirm_sets,
                           results_path=sweep_results_path(OUT, banks[bank_name("gaussian")], confirm,
                                                           sets=confirm_sets, **settings), **sweep)
print(f"tuned on {tune_sets} ({len(tuning)} rows); kept {len(picks)}: {[c.label() for c in picks]}")
results[["dataset", "label", "mean_experts_per_token", "perplexity"]].round(3)

# %% [markdown]
# **The answer, from the numbers (confirmation halves).** `delta vs ...` is BH minus each control
# on the same windows, with a 95% paired interval; the verdict counts a win only below 0 against
# the row's strongest control. The frontier plot draws uniform top-k, the static per-layer
# allocations and each control (hollow) beside its BH point.

# %%
comparison = compare_with_controls(results)
if SMALL:  # say why a small run rarely finds a difference, before the verdict does
    print(f"Small mode (no CUDA GPU, or BH_NOTEBOOK_SMALL=1): {EVAL_TOKENS:,} tokens per data set in "
          f"{EVAL_TOKENS // WINDOW} windows of {WINDOW}, so the intervals are wide and 'No' or 'Not clearly' below "
          "means 'not shown at this size', not 'BH loses'. For an answer: BH_NOTEBOOK_SMALL=0 on a GPU, or "
          "`bh-routing demo` (4,096 tokens per data set on the embedded model).")
display(Markdown(verdict_markdown(comparison)))
display(Markdown(comparison_markdown(comparison)))
nbu.show(plots.plot_controls(comparison), OUT / "03_controls.png")
for name in confirm_sets:
    nbu.show(plots.plot_frontier(results, dataset=name, comparison=comparison),
             OUT / f"03_frontier_{name.replace(':', '_')}.png")

# %% [markdown]
# **Keep the best confirmed configuration as one file.** `routing.json` (a `RoutingConfig`: the
# selector, its levels, floor and ceiling, weights and the bank folder) is what `route()` users
# read back (`RoutingConfig.load(path).to_selector()`) and what the vLLM plugin serves with
# (`BH_ROUTING_CONFIG=routing.json vllm serve ...`, see docs/serving.md).

# %%
from bh_helpers.engines.config import RoutingConfig
from bh_helpers.experiments.configs import config_of

best = config_of(results, comparison.loc[comparison["delta_vs_strongest"].idxmin(), "key"])
bank_dir = OUT / "nulls" / best.bank_name().replace("/", "-")
banks[best.bank_name()].save(bank_dir)
best.routing_config(bank=str(bank_dir.resolve()), weights=WEIGHTS).to_json(OUT / "routing.json")
print(f"{best.label()} -> {OUT / 'routing.json'}")
print(RoutingConfig.load(OUT / "routing.json").to_selector())

# %% [markdown]
# **Published anchors (quoted, not measured here).** Real OLMoE-1B-7B on WikiText-2 (test split, 16
# windows of 512 tokens, float32; CocoRoF/moe_optimizer, docs/FINDINGS.md): uniform top-k perplexity,
# and what the best published training-free rule reached. Your own numbers use this notebook's
# protocol (another window, other documents), so compare shapes, not values.

# %%
ANCHORS = pd.DataFrame({
    "k": [8, 7, 6, 5, 4],
    "quoted top-k perplexity (OLMoE-1B-7B, WikiText-2)": [11.05, 11.17, 11.53, 12.30, 14.12],
})
own = results[(results["method"] == "topk") & (results["dataset"] == confirm_sets[0])][["k", "perplexity"]]
display(ANCHORS.merge(own.rename(columns={"perplexity": f"your top-k perplexity ({MODEL_KEY}, {confirm_sets[0]})"}),
                      on="k", how="left"))
print("Quoted facts, same source: score-only dynamic k lost to static top-k at equal k (+13.8% vs +11.3% at k ~ 5); "
      "per-layer static budgets alone gave -2.8% at k ~ 4; per-layer budgets plus a contribution-calibrated "
      "ranking -3.5% [-5.5, -1.6] at k ~ 4 and -0.9% at k ~ 5.")

# **Where the ceiling stops mattering (max_k saturation).** With `max_k=8` a token never gets more
# than 8 experts however many BH rejects. Raising the ceiling on the calibration logits shows how
# many it would choose: the table gives each alpha's saturation point, the smallest `max_k` whose
# mean k is within 5% of the largest ceiling's, and the share of token-layers at the ceiling.

# %%
from bh_helpers.experiments.saturation import saturation_points, saturation_table

raw_rows = tuning[(tuning["method"] == METHOD) & tuning["statistic"].isna()]  # the raw bank's BH rows (whole grid)
sat_alphas = sorted(set(raw_rows["alpha"].dropna().astype(float)))
saturation = saturation_table(banks[bank_name("gaussian")], calibration, sat_alphas, method=METHOD, min_k=MIN_K)
sat_points = saturation_points(saturation)
display(sat_points.round(3))
nbu.show(plots.plot_saturation(saturation, sat_points), OUT / "03_saturation.png")

# %% [markdown]
# **Load balance.** How evenly each configuration spreads its tokens over the experts of a layer:
# the coefficient of variation of expert activations (0 = perfectly even) per configuration and
# layer, and the share of experts a configuration never chose.

# %%
from bh_helpers.experiments.configs import CONTROLS
from bh_helpers.experiments.sweep import load_balance_table

balance = load_balance_table(results)
display(balance[balance["dataset"] == confirm_sets[0]].round(3))
cv = plots.layer_matrix(results[~results["method"].isin(CONTROLS)], dataset=confirm_sets[0],
                        prefix="per_layer_utilisation_cv.")
nbu.show(plots.plot_layer_heatmap(cv, title=f"CV of expert activations by layer ({confirm_sets[0]})", cmap="magma",
                                  label="coefficient of variation", fmt=".2f"),
         OUT / "03_load_balance.png")

# %% [markdown]
# **The optimiser's pick.** Per data set, the configuration with the lowest perplexity within a
# budget of mean experts per token, and the best by 0.7 x quality + 0.3 x speed (both min-max
# scaled); an adaptive pick shows its compute-matched controls beside it
# (`bh-routing optimize --results sweep.jsonl --budget 4`).

# %%
from bh_helpers.experiments.optimize import optimize

BUDGET = 4.0
pd.concat([optimize(results, budget=BUDGET), optimize(results, quality_weight=0.7, speed_weight=0.3)],
          ignore_index=True).round(3)

# %% [markdown]
# ## 5. Report
# `report.md` opens with the verdict and collects the controls, the protocol, the model and
# null-bank metadata, the results and frontier tables and the figures (the prompt-category
# analysis, BH against its mixed control per prompt, runs in full mode only).

# %%
report_path = report_step(
    OUT / "report", results=results, model=model, tokenizer=tokenizer, null_bank=banks, model_id=MODEL_KEY,
    categories=not SMALL, weights=WEIGHTS, calibration=calibration, tuning=tuning, static_path=static_path,
    progress=False,
)
print(f"report written to {report_path}")
report_head = report_path.read_text().split("\n## All results")[0]  # whole sections: never cut mid-table
display(Markdown(report_head + f"\n\n*The rest (all results, figures, protocol, model) is in `{report_path}`.*"))
