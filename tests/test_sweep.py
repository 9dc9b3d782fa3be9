"""Tests for bh_helpers.experiments.sweep (resumable sweeps) and bh_helpers.models.datasets (loaders)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bh_helpers.models import datasets as bds
from bh_helpers.experiments.sweep import SweepConfig, expand_grid, grid_hash, load_results, run_sweep
from bh_helpers.experiments.configs import with_controls
from bh_helpers.experiments.results_file import seal_row as sealed

pd = pytest.importorskip("pandas")

ROOT = Path(__file__).resolve().parents[1]

# A sweep run in a subprocess: deterministic metrics, an optional delay per row.
SWEEP_SCRIPT = r'''
import hashlib, sys, time
from bh_helpers.experiments.sweep import expand_grid, run_sweep

path, delay = sys.argv[1], float(sys.argv[2])
configs = expand_grid(methods=["bh", "by"], alphas=[0.01, 0.05, 0.1], max_ks=[4, 8], min_ks=[1],
                      kernels=["gaussian"], topk=True, top_ps=[0.9])

def evaluate(config, name):
    time.sleep(delay)
    h = int(hashlib.sha256((config.key() + name).encode()).hexdigest()[:8], 16)
    return {"perplexity": 1 + h / 2**32, "n_tokens": h % 97, "protocol": {"window": 64, "tag": name}}

run_sweep(configs, ["wikitext2", "lambada"], evaluate, path, progress=False)
'''
N_ROWS = (1 + 8 + 1 + 2 * 3 * 2) * 2  # native, top-1..8, top-p, bh/by x 3 alphas x 2 max_k; 2 data sets


@pytest.fixture(scope="module")
def sweep_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "sweep.py"
    path.write_text(SWEEP_SCRIPT)
    return path


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_script(script, results, delay=0.0):
    subprocess.run([sys.executable, str(script), str(results), str(delay)], check=True, env=_env(), timeout=120)


def _rows(path):
    """(key, dataset, metrics) per row, in file order, and the header without its timestamp."""
    lines = Path(path).read_text().splitlines()
    header = json.loads(lines[0])
    header.pop("created")
    rows = [json.loads(line) for line in lines[1:]]
    return header, [(r["key"], r["dataset"], r["metrics"]) for r in rows]


@pytest.fixture(scope="module")
def reference(sweep_script, tmp_path_factory):
    """An uninterrupted run of the sweep."""
    path = tmp_path_factory.mktemp("ref") / "results.jsonl"
    _run_script(sweep_script, path)
    return path


def test_reference_run_is_complete(reference):
    header, rows = _rows(reference)
    assert header["type"] == "header" and header["datasets"] == ["wikitext2", "lambada"]
    assert len(rows) == N_ROWS
    assert len({(k, d) for k, d, _ in rows}) == N_ROWS
    df = load_results(reference)
    assert len(df) == N_ROWS
    assert {"key", "dataset", "label", "method", "alpha", "perplexity", "protocol.window"} <= set(df.columns)
    assert df.attrs["header"]["grid_hash"] == header["grid_hash"]


@pytest.mark.fault("interrupted and resumed runs", "recovered")
@pytest.mark.parametrize("kill_after", [0, 3, 17])
def test_sigkill_and_resume_gives_same_results(sweep_script, reference, tmp_path, kill_after):
    results = tmp_path / "results.jsonl"
    proc = subprocess.Popen([sys.executable, str(sweep_script), str(results), "0.03"], env=_env())
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            n_lines = results.read_bytes().count(b"\n") if results.exists() else 0
            if n_lines - 1 >= kill_after:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if results.exists():
        _, partial = _rows(results) if results.read_bytes().count(b"\n") else ({}, [])
        assert len(partial) < N_ROWS
    _run_script(sweep_script, results)
    assert _rows(results) == _rows(reference)


@pytest.mark.fault("interrupted and resumed runs", "recovered")
@pytest.mark.parametrize("cut", ["half_line", "newline_only", "half_header"])
def test_truncated_last_line_is_dropped_safely(sweep_script, reference, tmp_path, cut):
    data = reference.read_bytes()
    lines = data.split(b"\n")[:-1]
    if cut == "half_line":  # killed in the middle of writing row 10
        broken = b"\n".join(lines[:10]) + b"\n" + lines[10][: len(lines[10]) // 2]
    elif cut == "newline_only":  # row 10 written but not its newline: it is dropped and redone
        broken = b"\n".join(lines[:11])
    else:  # killed while writing the header
        broken = lines[0][:20]
    results = tmp_path / "results.jsonl"
    results.write_bytes(broken)
    _run_script(sweep_script, results)
    assert _rows(results) == _rows(reference)
    if cut != "half_header":  # complete rows were kept, not recomputed: their bytes are unchanged
        assert results.read_bytes().startswith(b"\n".join(lines[:10]) + b"\n")


def _metric(config, name):
    return {"value": len(config.key()) + len(name), "ok": True}


@pytest.mark.fault("damaged files", "clear error")
def test_different_grid_raises_and_leaves_file_untouched(reference, tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_bytes(reference.read_bytes())
    before = results.read_bytes()
    other = expand_grid(methods=["bh"], alphas=[0.2], max_ks=[8], topk=False, native=False)
    with pytest.raises(ValueError, match="different grid"):
        run_sweep(other, ["wikitext2", "lambada"], _metric, results, progress=False)
    assert results.read_bytes() == before
    same_configs_other_datasets = expand_grid(
        methods=["bh", "by"], alphas=[0.01, 0.05, 0.1], max_ks=[4, 8], min_ks=[1], topk=True, top_ps=[0.9]
    )
    with pytest.raises(ValueError, match="different grid"):
        run_sweep(same_configs_other_datasets, ["wikitext2"], _metric, results, progress=False)
    assert results.read_bytes() == before
    # overwrite=True moves the old file aside (byte-identical) and starts afresh.
    df = run_sweep(other, ["wikitext2"], _metric, results, overwrite=True, progress=False)
    backups = list(tmp_path.glob("results.jsonl.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == before
    assert len(df) == 1 and df["method"].tolist() == ["bh"]


@pytest.mark.fault("damaged files", "clear error")
def test_non_results_file_raises(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="not a sweep results file"):
        run_sweep([SweepConfig("native")], ["x"], _metric, path, progress=False)
    assert path.read_text() == "hello\nworld\n"


@pytest.mark.fault("interrupted and resumed runs", "recovered")
def test_failing_evaluation_keeps_finished_rows(tmp_path):
    path = tmp_path / "r.jsonl"
    configs = [SweepConfig("topk", k=k) for k in (1, 2, 3)]
    calls = []

    def flaky(config, name):
        calls.append((config.k, name))
        if config.k == 2 and calls.count((2, name)) == 1:  # fails the first time only
            raise RuntimeError("boom")
        return {"k": config.k}

    with pytest.raises(RuntimeError, match="boom"):
        run_sweep(configs, ["a"], flaky, path, progress=False)
    assert len(load_results(path)) == 1
    df = run_sweep(configs, ["a"], flaky, path, progress=False)
    assert df["k"].tolist() == [1, 2, 3]
    assert calls == [(1, "a"), (2, "a"), (2, "a"), (3, "a")]  # k=1 was not recomputed


def test_grid_id_is_part_of_identity(tmp_path):
    path = tmp_path / "r.jsonl"
    configs = [SweepConfig("native")]
    run_sweep(configs, ["a"], _metric, path, grid_id="run-1", progress=False)
    with pytest.raises(ValueError, match="different grid"):
        run_sweep(configs, ["a"], _metric, path, grid_id="run-2", progress=False)
    assert grid_hash(configs, ["a"], "run-1") != grid_hash(configs, ["a"], "run-2")


def test_protocol_is_its_own_header_field(tmp_path):
    """The report read the perplexity protocol back out of a JSON string packed into ``grid_id``;
    it is now a header field of its own, which the report states, whatever ``grid_id`` is."""
    from bh_helpers.report.assemble import _protocol_from_results

    path = tmp_path / "r.jsonl"
    protocol = {"window": 64, "stride": 32, "max_tokens": 128, "weights": "softmax"}
    df = run_sweep([SweepConfig("native")], ["prose"], _metric, path, grid_id="an opaque label", protocol=protocol,
                   progress=False)
    assert df.attrs["header"]["protocol"] == protocol and df.attrs["header"]["grid_id"] == "an opaque label"
    stated = _protocol_from_results(load_results(path))
    assert (stated["window"], stated["stride"], stated["tokens_per_dataset_cap"]) == (64, 32, 128)
    assert stated["weights"] == "softmax" and stated["weights_of_selected_experts"].startswith("softmax (router")
    # the protocol is not the grid's identity: another protocol with the same grid_id resumes the same file
    run_sweep([SweepConfig("native")], ["prose"], _metric, path, grid_id="an opaque label",
              protocol={**protocol, "window": 128}, progress=False)


def test_sweep_config_keys_and_validation():
    a = SweepConfig("bh", alpha=0.05, max_k=8, min_k=1, kernel="gaussian")
    assert a.key() == SweepConfig("bh", alpha=0.05, max_k=8.0, min_k=1, kernel="gaussian").key()
    assert a.key() == "b4249553cccc"  # stable across runs and versions: results files depend on it
    assert a.key() != SweepConfig("by", alpha=0.05, max_k=8, min_k=1, kernel="gaussian").key()
    assert SweepConfig.from_dict(a.to_dict()) == a
    assert a.selector_kwargs() == {"method": "bh", "alpha": 0.05, "min_k": 1, "max_k": 8}
    with pytest.raises(ValueError, match="`method`"):
        SweepConfig("magic")
    with pytest.raises(ValueError, match="needs `alpha`"):
        SweepConfig("bh", max_k=8, min_k=1, kernel="gaussian")
    with pytest.raises(ValueError, match="does not use `alpha`"):
        SweepConfig("topk", k=2, alpha=0.1)
    with pytest.raises(ValueError, match="`alpha`"):
        SweepConfig("bh", alpha=1.5, max_k=8, min_k=1, kernel="gaussian")
    with pytest.raises(ValueError, match="`min_k`"):
        SweepConfig("bh", alpha=0.1, max_k=2, min_k=3, kernel="gaussian")


def test_expand_grid():
    with pytest.warns(UserWarning, match="`min_k` 6 > `max_k` 4"):  # named, not dropped silently
        grid = expand_grid(methods=["bh", "by"], alphas=[0.05, 0.1], max_ks=[4, 8], min_ks=[1, 6],
                           kernels=["gaussian"], topk=True, top_ps=[0.5, 0.9])
    methods = [c.method for c in grid]
    assert methods[0] == "native"
    assert [c.k for c in grid if c.method == "topk"] == list(range(1, 9))
    assert [c.top_p for c in grid if c.method == "top_p"] == [0.5, 0.9]
    fdr = [c for c in grid if c.method in ("bh", "by")]
    assert len(fdr) == 2 * 2 * (2 * 2 - 1)  # (min_k=6, max_k=4) skipped
    assert len({c.key() for c in grid}) == len(grid)
    with pytest.raises(ValueError, match="`methods`"):
        expand_grid(methods=["topk"])
    with pytest.raises(ValueError, match="duplicates"):
        run_sweep([SweepConfig("native"), SweepConfig("native")], ["a"], _metric, "unused.jsonl", progress=False)


# ---------------------------------------------------------------------------------------------
# Data set loaders
# ---------------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


WIKI_ROWS = [
    "", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", "",
    " = = Career = = \n", "", " He had a role in 2000 . \n",
    " = Du Fu = \n", "", " Du Fu was a Chinese poet . \n",
]


def test_load_wikitext2_local_files(tmp_path):
    jsonl = _write_jsonl(tmp_path / "wiki.jsonl", [{"text": t} for t in WIKI_ROWS])
    articles = bds.load_wikitext2(path=jsonl)
    assert len(articles) == 2
    assert articles[0].startswith(" = Robert Boulter = \n") and " = = Career = = \n" in articles[0]
    assert articles[1] == " = Du Fu = \n Du Fu was a Chinese poet . \n"
    txt = tmp_path / "wiki.test.raw.txt"
    raw = " \n = Robert Boulter = \n \n Robert Boulter is an actor . \n \n = Du Fu = \n \n A poet . \n"
    txt.write_text(raw, encoding="utf-8")
    articles = bds.load_wikitext2(path=txt)
    assert len(articles) == 2
    assert "".join(articles) == raw.removeprefix(" \n")  # the blank line before the first title is dropped


def test_load_lambada_local_files(tmp_path):
    rows = [{"text": "He picked up the ball and threw the ball"}, {"text": "  She said hello to Anna  "}]
    assert bds.load_lambada(path=_write_jsonl(tmp_path / "l.jsonl", rows)) == [
        {"text": "He picked up the ball and threw the ball"}, {"text": "She said hello to Anna"},
    ]
    txt = tmp_path / "l.txt"
    txt.write_text("one two three\n\nfour five\n", encoding="utf-8")
    assert bds.load_lambada(path=txt) == [{"text": "one two three"}, {"text": "four five"}]


def test_load_hellaswag_local_file_preprocesses_like_lm_eval(tmp_path):
    row = {
        "ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
        "ctx_b": "then", "ctx": "...", "endings": [", the man [step] cleans.", " stops.", "x [title] y", "z"],
        "source_id": "a", "split": "val", "split_type": "indomain", "label": "3",
    }
    normalised = {"context": "Already normalised", "endings": ["a", "b"], "label": 1}
    out = bds.load_hellaswag(path=_write_jsonl(tmp_path / "h.jsonl", [row, normalised]))
    assert out[0] == {
        "context": "Removing ice from car: Then, the man writes over the snow. Then",
        "endings": [", the man cleans.", "stops.", "x. y", "z"],
        "label": 3,
    }
    assert out[1] == normalised
    unlabeled = dict(row, label="")
    with pytest.raises(ValueError, match="label"):
        bds.load_hellaswag(path=_write_jsonl(tmp_path / "t.jsonl", [unlabeled]))


@pytest.mark.fault("bad arguments", "clear error")
def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match=r"known names: \['hellaswag', 'lambada', 'wikitext2'\]"):
        bds.embedded_fixture("imagenet")
    with pytest.raises(ValueError, match="`path`"):
        bds.load_lambada(path=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        bds.load_lambada(path=bad)
    with pytest.raises(ValueError, match="unknown data set"):
        bds.embedded_fixture("imagenet")


FIXTURES_BUILT = all((bds.FIXTURE_DIR / f).is_file() for f in bds.FIXTURES.values())


@pytest.mark.skipif(not FIXTURES_BUILT, reason="fixtures not built yet (scripts/build_fixtures.py)")
def test_embedded_fixtures_are_normalised():
    wiki = bds.embedded_fixture("wikitext2")
    assert wiki and all(isinstance(t, str) and t.strip() for t in wiki)
    lam = bds.embedded_fixture("lambada")
    assert 10 <= len(lam) <= 500
    assert all(set(ex) == {"text"} and len(ex["text"].split()) >= 2 for ex in lam)
    hs = bds.embedded_fixture("hellaswag")
    assert 10 <= len(hs) <= 500
    for ex in hs:
        assert set(ex) == {"context", "endings", "label"}
        assert len(ex["endings"]) == 4 and 0 <= ex["label"] < 4
        assert all(isinstance(e, str) and e for e in ex["endings"])
    total = sum((bds.FIXTURE_DIR / f).stat().st_size for f in bds.FIXTURES.values())
    assert total < 200_000


def test_to_selector_builds_patching_selectors():
    patching = pytest.importorskip("bh_helpers")
    nulls = pytest.importorskip("bh_helpers.nulls")
    import torch

    assert SweepConfig("topk", k=3).to_selector() == patching.TopKSelector(k=3)
    top_p = SweepConfig("top_p", top_p=0.9, min_k=1, max_k=4).to_selector()
    assert isinstance(top_p, patching.TopPSelector) and (top_p.p, top_p.max_k) == (0.9, 4)
    torch.manual_seed(0)
    bank = nulls.fit_null_bank({0: torch.randn(2000, 8), 1: torch.randn(2000, 8)})
    config = SweepConfig("by", alpha=0.1, max_k=4, min_k=1, kernel="gaussian")
    selector = config.to_selector(null_bank={"gaussian": bank})
    assert isinstance(selector, patching.BHSelector)
    assert (selector.method, selector.alpha, selector.min_k, selector.max_k) == ("by", 0.1, 1, 4)
    counts = selector(torch.randn(5, 8) * 3, 0).counts
    assert counts.shape == (5,) and bool(((counts >= 1) & (counts <= 4)).all())
    with pytest.raises(ValueError, match="no bank 'gaussian'"):
        config.to_selector(null_bank={"tophat": bank})
    with pytest.raises(ValueError, match="needs `null_bank`"):
        config.to_selector()
    with pytest.raises(ValueError, match="needs `model`"):
        SweepConfig("native").to_selector()
    # inverse-p weights: static rows and controls weigh by the bank (a mapping's only raw one)
    banks = {"gaussian": bank, "gaussian/zscore": bank}
    top = SweepConfig("topk", k=3).to_selector(null_bank=banks, weights="inverse_p")
    assert top.null_bank is bank and top.weights == "inverse_p"
    mixed = [c for c in with_controls([config]) if c.method == "mixed"][0]
    control = mixed.to_selector(null_bank=banks, weights="inverse_p", mean_k=2.0)
    assert control.null_bank is bank and float(control(torch.randn(5, 8), 0).weights.sum(-1).mean()) == pytest.approx(1)
    with pytest.raises(ValueError, match="one raw bank"):
        SweepConfig("topk", k=3).to_selector(null_bank={"gaussian": bank, "tophat": bank}, weights="inverse_p")
    with pytest.raises(ValueError, match="needs `null_bank`"):
        SweepConfig("topk", k=3).to_selector(weights="inverse_p")


# ----------------------------------------------------------------------------------------------
# Results files read back exactly: non-finite metrics, foreign rows, replaced data files (issue 25)
# ----------------------------------------------------------------------------------------------

_NON_FINITE_METRICS = {1: float("inf"), 2: float("nan"), 3: float("-inf")}


def _overflowing(config, name):
    """top-1 overflows (inf), top-2 is undefined (nan), top-3 a -inf log-likelihood; the rest finite."""
    value = _NON_FINITE_METRICS.get(config.k, 10.0 + (config.k or 0))
    return {"perplexity": value, "mean_experts_per_token": float(config.k or 8),
            "window_nll": [1.0, value], "per_layer_mean_k": {"0": value}}


@pytest.mark.fault("damaged files", "recovered")
def test_non_finite_metrics_read_back_as_floats(tmp_path):
    """Written as "inf"/"nan" strings (strict JSON has no such numbers), they were read back as strings and
    crashed every consumer (TypeError); they now read back as the floats they were."""
    import math

    path = tmp_path / "r.jsonl"
    configs = [SweepConfig("topk", k=k) for k in (1, 2, 3, 4)]
    run_sweep(configs, ["a"], _overflowing, path, progress=False)
    assert '"perplexity":"inf"' in path.read_text()  # the format on disk: strict JSON
    for df in (load_results(path), run_sweep(configs, ["a"], _overflowing, path, progress=False)):
        assert df["perplexity"].dtype == float
        got = df["perplexity"].tolist()
        assert got[0] == math.inf and math.isnan(got[1]) and got[2] == -math.inf and got[3] == 14.0
        assert df["window_nll"].iloc[0] == [1.0, math.inf] and df["per_layer_mean_k.0"].iloc[0] == math.inf
    assert load_results(path)["label"].tolist() == [c.label() for c in configs]


def _two_grids(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run_sweep([SweepConfig("topk", k=k) for k in (1, 2)], ["prose"], _metric, a, grid_id="model A", progress=False)
    run_sweep([SweepConfig("topk", k=k) for k in (1, 3)], ["prose"], _metric, b, grid_id="model B", progress=False)
    return a, b


@pytest.mark.fault("damaged files", "clear error")
def test_rows_of_another_grid_are_set_aside_with_one_warning(tmp_path):
    """Two results files concatenated (another model's grid: same configuration keys), a row of a data set the
    header does not list, and a row whose key is not its configuration: none is ranked or reported, one warning
    counts them, and a resume into the file is refused without changing it."""
    import warnings

    a, b = _two_grids(tmp_path)
    mixed = tmp_path / "mixed.jsonl"
    row_a = json.loads(a.read_text().splitlines()[1])  # top-1 on prose
    # rows a sweep could have written (sealed with their checksum): the grid checks must catch them, not the checksum
    foreign_set = sealed(row_a | {"dataset": "code"})
    forged = sealed(row_a | {"key": SweepConfig("topk", k=2).key()})  # top-1's configuration under top-2's key
    mixed.write_text(a.read_text() + json.dumps(foreign_set) + "\n" + json.dumps(forged) + "\n" + b.read_text())
    before = mixed.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load_results(mixed)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "5 lines that do not belong to its grid" in message and "set aside" in message
    for reason in ("1 header of another grid", "2 after the header of another grid",
                   "1 of a data set the header does not list", "1 of a configuration the header does not list"):
        assert reason in message, message
    assert df["key"].tolist() == load_results(a)["key"].tolist() and df["dataset"].tolist() == ["prose", "prose"]
    with pytest.raises(ValueError, match="5 lines that do not belong to its grid.*one sweep"):
        run_sweep([SweepConfig("topk", k=k) for k in (1, 2)], ["prose"], _metric, mixed, grid_id="model A",
                  progress=False)
    assert mixed.read_bytes() == before
    # A foreign data-set row after the file's own rows, no second header.
    lone = tmp_path / "lone.jsonl"
    lone.write_text(a.read_text() + json.dumps(sealed(json.loads(a.read_text().splitlines()[1]) | {"dataset": "code"}))
                    + "\n")
    with pytest.warns(UserWarning, match="1 line that does not belong to its grid \\(1 of a data set the header"):
        assert load_results(lone)["dataset"].tolist() == ["prose", "prose"]
    # Another model's row of the same configuration and data set, pasted without its header.
    pasted = tmp_path / "pasted.jsonl"
    pasted.write_text(a.read_text() + b.read_text().splitlines()[1] + "\n")
    with pytest.warns(UserWarning, match="1 line that does not belong to its grid \\(1 of another grid\\)"):
        assert len(load_results(pasted)) == 2


@pytest.mark.fault("interrupted and resumed runs", "clear error")
def test_a_replaced_text_file_is_refused_on_resume(tmp_path, tiny_model_and_tokenizer):
    """A ``.txt`` data set was identified by its path only: replaced between a run and its resume, its new text's
    rows were appended to the old ones. Its sha256 is now part of the grid: the resume is refused, naming it."""
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.experiments.evaluate import perplexity_sweep, sweep_grid_id
    from bh_helpers.models.texts import data_file_sha256, dataset_description
    from bh_helpers.nulls.bank import NullBank

    model, tok = tiny_model_and_tokenizer
    bank = NullBank.load(default_null_bank_dir("tiny"))
    text = tmp_path / "notes.txt"
    text.write_text("The river rose in the spring and the town moved to the hill above it. " * 4)
    results = tmp_path / "r.jsonl"
    kwargs = dict(null_bank=bank, results_path=results, datasets=[str(text)], max_tokens=48, window=16, stride=16,
                  progress=False)
    perplexity_sweep(model, tok, [SweepConfig("topk", k=1)], **kwargs)
    grid = dict(model_id="tiny", null_bank=bank, datasets=[str(text)], max_tokens=48, window=16, stride=16,
                weights="softmax")
    first = sweep_grid_id(**grid)
    assert json.loads(first)["data_files"] == {str(text): data_file_sha256(str(text))}
    assert dataset_description(str(text)) == f"file {text} (sha256 {data_file_sha256(str(text))[:12]})"
    assert "data_files" not in json.loads(sweep_grid_id(**{**grid, "datasets": ["prose"]}))  # named sets: as before
    text.write_text("def parse(line):\n    return line.split(',')\n" * 6)  # same path, other text
    assert sweep_grid_id(**grid) != first
    before = results.read_bytes()
    with pytest.raises(ValueError, match=f"data file '{text}' changed since these results were written"):
        perplexity_sweep(model, tok, [SweepConfig("topk", k=1), SweepConfig("topk", k=2)], **kwargs)
    assert results.read_bytes() == before
