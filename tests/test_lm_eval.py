"""Tests for bh_helpers.evaluation.lm_eval: a routed model evaluated by lm-evaluation-harness.

One local task (``bh_hellaswag_style``, lm-eval's own HellaSwag processing over the committed
fixture) runs on the embedded tiny OLMoE three times: untouched, routed by its native top-8 and
routed by BH. Checks: native-routed = untouched (accuracies identical, log-likelihoods equal to
float32 rounding), lm-eval = our independent oracle
:func:`bh_helpers.evaluation.tasks.multiple_choice_accuracy` on the same documents, and BH changes
the number of experts per token while giving finite scores. Offline: local JSON only.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bh_helpers.evaluation import lm_eval as lea  # noqa: E402  (no lm_eval import at module load)

TASK = "bh_hellaswag_style"
LIMIT = 20  # documents (x 4 endings = 80 requests per run)
EMBEDDED = Path(__file__).resolve().parents[1] / "bh_helpers" / "data" / "tiny_olmoe" / "model.safetensors"


def _lm_eval_importable() -> bool:
    try:
        lea._require_lm_eval()
    except ImportError:
        return False
    return True


needs_lm_eval = pytest.mark.skipif(
    not _lm_eval_importable(), reason="lm-eval not installed (optional extra: pip install bh-routing[lmeval])"
)
needs_embedded = pytest.mark.skipif(not EMBEDDED.is_file(), reason="embedded tiny model weights not in this checkout")


# ----------------------------------------------------------------------------------------------
# Without lm_eval
# ----------------------------------------------------------------------------------------------


@pytest.mark.fault("bad arguments", "clear error")
def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(ImportError, match=r"pip install bh-routing\[lmeval\]"):
        lea.make_lm(object(), object())


@pytest.mark.fault("bad arguments", "clear error")
def test_make_lm_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="`batch_size`"):
        lea.make_lm(object(), object(), batch_size=0)


def test_resolved_task_dir_makes_data_paths_absolute(tmp_path):
    assert (lea.local_task_dir() / f"{TASK}.yaml").is_file()
    out = lea.resolved_task_dir(tmp_path)
    written = yaml.safe_load((out / f"{TASK}.yaml").read_text())
    assert written["task"] == TASK
    assert Path(written["include"]) == lea.local_task_dir() / f"{TASK}.yaml"
    data = Path(written["dataset_kwargs"]["data_files"]["validation"])
    assert data.is_absolute() and data.is_file()
    assert data == (lea.local_task_dir().parent / "fixtures" / "hellaswag_style.jsonl").resolve()
    with pytest.raises(FileNotFoundError, match="`dest`"):
        lea.resolved_task_dir(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# With lm_eval, on the embedded model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs():
    """lm-eval on the embedded model: untouched, native top-8 routed, BH routed; plus our oracle."""
    import torch

    from bh_helpers.capture import capture_router_logits
    from bh_helpers.models.datasets import FIXTURE_DIR, load_hellaswag
    from bh_helpers.evaluation.tasks import multiple_choice_accuracy
    from bh_helpers.models.loading import load_corpus_slice, load_model
    from bh_helpers.nulls.fit import fit_null_bank
    from bh_helpers import BHSelector, NativeSelector

    model, tok = load_model("tiny", device="cpu", dtype=torch.float32)
    kw = {"limit": LIMIT, "log_samples": True, "bootstrap_iters": 0}
    out = {
        "native": lea.evaluate_routed(model, tok, None, [TASK], **kw),
        "native_routed": lea.evaluate_routed(model, tok, NativeSelector.for_model(model), [TASK], **kw),
    }
    texts = [row["text"] for row in load_corpus_slice("calibration")[:8]]
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    captured = capture_router_logits(model, [batch], progress=False)
    bank = fit_null_bank(captured, kernel="empirical", model_id="tiny", calibration="8 calibration texts")
    out["bh"] = lea.evaluate_routed(model, tok, BHSelector(bank, alpha=0.05, max_k=8), [TASK], **kw)
    examples = load_hellaswag(path=FIXTURE_DIR / "hellaswag_style.jsonl")[:LIMIT]
    out["oracle"] = multiple_choice_accuracy(model, tok, examples, batch_size=8, progress=False)
    return out


def _loglik(result: dict) -> list[float]:
    """Summed log-likelihood of each ending, documents in doc_id order, flattened."""
    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    return [float(r[0]) for s in samples for r in s["filtered_resps"]]


@pytest.mark.slow
@needs_lm_eval
@needs_embedded
def test_native_routing_equals_untouched_model(runs):
    native, routed = runs["native"], runs["native_routed"]
    assert native["routing"] is None
    assert routed["routing"]["mean_k"] == 8.0
    assert native["n-samples"][TASK]["effective"] == routed["n-samples"][TASK]["effective"] == LIMIT
    for metric in ("acc,none", "acc_norm,none"):
        assert routed["results"][TASK][metric] == native["results"][TASK][metric]
    # The patched block recomputes routing in float32 and dispatches itself: equal up to rounding.
    assert _loglik(routed) == pytest.approx(_loglik(native), rel=1e-5, abs=1e-4)


@pytest.mark.slow
@needs_lm_eval
@needs_embedded
def test_lm_eval_matches_our_multiple_choice_oracle(runs):
    native, oracle = runs["native"], runs["oracle"]
    assert oracle.n_examples == LIMIT
    assert native["results"][TASK]["acc,none"] == oracle.acc
    assert native["results"][TASK]["acc_norm,none"] == oracle.acc_norm
    # Same prompt, " " + ending continuation and tokens: the same log-likelihoods.
    assert _loglik(native) == pytest.approx([x for row in oracle.loglik for x in row], rel=1e-5, abs=1e-4)


@pytest.mark.slow
@needs_lm_eval
@needs_embedded
def test_bh_routing_changes_experts_per_token(runs):
    bh = runs["bh"]
    summary = bh["routing"]
    assert summary["mode"] == "patch" and summary["tokens"]
    assert math.isfinite(summary["mean_k"]) and 1.0 <= summary["mean_k"] <= 8.0
    assert summary["mean_k"] != 8.0
    for metric in ("acc,none", "acc_norm,none"):
        assert 0.0 <= bh["results"][TASK][metric] <= 1.0
    assert all(math.isfinite(x) for x in _loglik(bh))
