# %% [markdown]
# # 02 · Fit null distributions of router logits
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bh-routing/bh-routing/blob/main/notebooks/02_fit_null_kdes.ipynb)
#
# *(Badge and install cell point at the repository set once in `pyproject.toml`, `[tool.bh-routing]`;
# a fork changes it there and runs `python scripts/sync_colab_cells.py`.)*
#
# BH turns every router logit into a p-value `p = P(X >= x)` under a **null distribution** of
# router logits of that layer, then picks, per token, the experts whose p-values survive the
# BH step-up at level alpha. The null decides everything, so this notebook:
#
# 1. loads the logits captured in notebook 01 (or captures them if 01 has not run);
# 2. holds out a quarter of the calibration **windows** (256-token sequences);
# 3. fits the four kernel density estimates (Gaussian, tophat, Epanechnikov, linear) and the
#    empirical distribution per layer on the rest;
# 4. checks each against the held-out logits: KS distance, uniformity of the held-out p-values
#    (PIT), and the tail, where BH actually operates;
# 5. refits the chosen kernel on all logits and saves the `NullBank` for notebook 03.
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
# **Parameters** (`BH_MODEL`, `BH_NOTEBOOK_SMALL` as in notebook 01; the capture settings must
# match 01's for its saved logits to be reused).

# %%
from bh_helpers.app import notebook as nbu

MODEL_NAME = nbu.model_choice()  # BH_MODEL, default "auto"
print(nbu.check_runtime(MODEL_NAME))  # GPU or not, and which model "auto" means here
SMALL = nbu.small_mode()  # BH_NOTEBOOK_SMALL=1/0; default: small without a CUDA GPU
THREADS = nbu.cpu_threads()  # BH_THREADS; default on CPU: 1 (fastest on a busy 2-core machine)
CALIBRATION_TOKENS = 4096 if SMALL else 131_072  # as in notebook 01
WINDOW = 256
KERNELS = ["gaussian", "tophat", "epanechnikov", "linear", "empirical"]
HELD_OUT_FRACTION = 0.25  # share of calibration windows held out
OUTPUT_ROOT = "outputs"
# The bank goes under outputs/; only BH_UPDATE_COMMITTED_BANK=1 replaces the committed one (bh_helpers/data/kde_models/).
SAVE_TO_REPOSITORY = nbu.update_committed_bank()
print(f"model={MODEL_NAME!r} small={SMALL} save_to_repository={SAVE_TO_REPOSITORY}")

# %% [markdown]
# ## 1. Router logits from notebook 01

# %%
import time

import pandas as pd

from bh_helpers.app import paths
from bh_helpers.capture import split_by_sequence
from bh_helpers.nulls.bank import NullBank
from bh_helpers.nulls.diagnostics import choose_kernel, goodness_table
from bh_helpers.nulls.fit import fit_null_bank
from bh_helpers.report import logit_plots

MODEL_KEY = paths.resolve_model_key(MODEL_NAME)
OUT = paths.output_dir(MODEL_KEY, OUTPUT_ROOT)
captured, model, tokenizer = nbu.calibration_logits(
    OUT / nbu.LOGITS_NAME, model_name=MODEL_NAME, max_tokens=CALIBRATION_TOKENS, window=WINDOW,
)
fit_logits, held_out = split_by_sequence(captured, held_out_fraction=HELD_OUT_FRACTION)
first = captured.layers[0]
print(captured)
print(f"fit on {fit_logits[first].shape[0]} tokens, held out {held_out[first].shape[0]} tokens "
      f"(whole windows), {fit_logits[first].shape[1]} experts per layer")

# %% [markdown]
# ## 2. Fit every kernel per layer
# One null per layer, pooled over the experts. Bandwidths follow Scott's rule. Each null is
# stored as an exact CDF on a fine grid with exponential tails beyond the data, so the
# strongest experts never tie at p = 0.

# %%
banks, fit_seconds = {}, {}
for kernel in KERNELS:
    start = time.perf_counter()
    banks[kernel] = fit_null_bank(fit_logits, kernel=kernel, model_id=MODEL_KEY,
                                  calibration="committed calibration slice (fit part)")
    fit_seconds[kernel] = time.perf_counter() - start
pd.Series(fit_seconds, name="fit seconds (all layers)").round(2).to_frame()

# %% [markdown]
# ## 3. Goodness of fit on held-out windows
# * **KS distance**: the largest gap between a null's CDF and the held-out empirical CDF.
# * **PIT KS statistic / p-value**: held-out p-values should be Uniform(0, 1) if the null is right
#   (on a subsample of at most 20 000 values; with more, any misfit is "significant").
# * **p<=t columns**: the share of held-out p-values at or below t. BH compares the smallest
#   p-values against `k * alpha / 64`, so what matters most is this tail: a share above t means
#   the null's tail is too light and BH will pick too many experts; below t, too few.

# %%
table = goodness_table(banks, held_out)
table.round(4)

# %% [markdown]
# Averaged over layers, best KS first. With many pooled logits per layer the Scott bandwidth is
# small next to the spread of the logits, so the kernels can agree to the third decimal (they
# do on the embedded model): then the gap to the held-out data is a shift between documents,
# not a smoothing choice, and more varied calibration text helps more than another kernel.

# %%
summary = (
    table.drop(columns="layer").groupby("kernel", sort=False).mean()
    .sort_values("ks_distance")
)
summary.round(4)

# %% [markdown]
# ## 4. CDFs, tails and PIT histograms
# Left: all nulls against the held-out ECDF (they should overlap). Middle: the upper tail on
# a log scale, where the p-values that BH rejects live; the grey curve is the held-out data.
# Right: held-out p-values should fill the histogram flat at 1. **What to look for:** the
# tophat and empirical nulls have the sharpest (least smoothed) tails; the Gaussian kernel
# smooths the most and decays beyond the largest calibration logit.

# %%
for layer in (captured.layers[0], captured.layers[-1]):
    nbu.show(logit_plots.plot_null_fits(banks, held_out, layer=layer), OUT / f"02_null_fits_layer{layer}.png")

# %% [markdown]
# ## 5. Choose a kernel, refit on all calibration logits, save
# The kernel with the smallest mean KS distance is refitted on all captured logits (fit and
# held-out parts) and saved as a `NullBank`: `nulls.npz` with the float64 grids and
# `metadata.json` with the provenance; no pickle anywhere.

# %%
KERNEL = choose_kernel(table)
bank = fit_null_bank(
    captured, kernel=KERNEL, model_id=MODEL_KEY,
    calibration=f"committed calibration slice: {captured.num_tokens} tokens, windows of {WINDOW}",
)
BANK_DIR = paths.default_null_bank_dir(MODEL_KEY, must_exist=False) if SAVE_TO_REPOSITORY else OUT / "null_bank"
bank.save(BANK_DIR)
reloaded = NullBank.load(BANK_DIR)
print(f"chosen kernel: {KERNEL}; saved {reloaded} to {BANK_DIR}")
table.to_csv(OUT / "02_goodness_of_fit.csv", index=False)

# %% [markdown]
# ## 6. Does BH control the FDR on router-like rows? Empirical FDR and power on known truth
# Router logits have no ground truth, so this section simulates rows that look like them: 64
# experts per token, a known set of relevant experts shifted by `signal`, and within-token
# dependence (independent; equicorrelated, a shared shift per token; a factor model with loadings
# of both signs; a shared *spread* per token). A null bank is fitted on pure-null rows of the
# same model, and every method runs through the package's own selection path with `min_k=0`,
# `max_k=64`. FDR, power and FWER come with 95% Monte-Carlo intervals over tokens. The theorems:
# BH controls the FDR at `alpha` under independence and positive dependence, BY under any
# dependence, Bonferroni and Holm the FWER (`tests/test_simulation.py` checks them).

# %%
from IPython.display import display

from bh_helpers.experiments.simulation import empirical_error_rates, rates_frame
from bh_helpers.report import plots

SIM_ALPHA = 0.1
SIM_TOKENS = 5_000 if SMALL else 20_000
SETTINGS = [("independent", 0.0), ("equicorrelated", 0.5), ("factor", 0.8), ("scale", 0.5)]
study = pd.concat([
    rates_frame(empirical_error_rates(alpha=SIM_ALPHA, n_tokens=SIM_TOKENS, calibration_tokens=SIM_TOKENS,
                                      dependence=dependence, rho=rho), dependence=dependence, rho=rho)
    for dependence, rho in SETTINGS], ignore_index=True)
study[["dependence", "rho", "method", "fdr", "fdr_low", "fdr_high", "power", "fwer", "mean_selected"]].round(4)

# %% [markdown]
# **When the guarantee breaks.** The FDR above is an average over tokens. Router logits differ in
# spread from token to token (a confident router spreads its logits wider), and a null pooled over
# raw logits is the null of an *average* token: the nulls of a wide token look significant too
# often. Over all tokens BH stays below `alpha`, but among the widest quarter of tokens its FDR
# is several times `alpha`, paid for by almost no discoveries among the narrow ones. Testing a
# per-token z-score (`statistic="zscore"`, as in notebook 03's sweep) puts every spread group back
# under `alpha`.

# %%
spread = pd.concat([
    rates_frame(empirical_error_rates(alpha=0.2, methods=("bh",), n_tokens=SIM_TOKENS, calibration_tokens=SIM_TOKENS,
                                      relevant=1, dependence="scale", rho=0.5, spread_groups=4, statistic=statistic),
                setting=f"BH, {statistic} null")
    for statistic in ("raw", "zscore")], ignore_index=True)
display(spread[["setting", "group", "tokens", "fdr", "fdr_low", "fdr_high", "power"]].round(4))
nbu.show(plots.plot_error_rates(spread, alpha=0.2, title="BH's FDR by token spread (simulated, alpha = 0.2)"),
         OUT / "02_fdr_by_spread.png")

# %% [markdown]
# **Next:** notebook 03 routes the model with BH using this bank (for the embedded model it uses
# the bank committed under `bh_helpers/data/kde_models/`).
