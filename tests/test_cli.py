"""Tests for the bh-routing command line: help, a tiny demo end to end, resume, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("pandas")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from bh_helpers.app import cli  # noqa: E402
from bh_helpers.experiments.sweep import load_results  # noqa: E402

# A demo small enough for a test: 2 BH configs, top-1..3, native, one top-p; 128 tokens of prose in the
# 8 windows of 16 tokens an interval needs (MIN_WINDOWS).
TINY = ["--calibration-tokens", "512", "--grid-size", "1024", "--methods", "bh", "--alphas", "0.5,0.9",
        "--mean-ks", "", "--statistics", "raw", "--trims", "0", "--min-ks", "1",
        "--topk-max", "3", "--top-ps", "0.8", "--datasets", "prose", "--max-tokens", "128", "--window", "16",
        "--stride", "16", "--no-categories", "--no-progress", "--static-allocation", "separable",
        "--allocation-tokens", "128", "--no-split"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # main() sets 1 thread


@pytest.mark.parametrize("command", [None, "demo", "capture", "fit", "sweep", "optimize", "report"])
def test_help_documents_every_option(command, capsys):
    argv = ([command] if command else []) + ["--help"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bh-routing")
    parser = cli.build_parser()
    if command:
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        for action in sub._actions:
            assert action.help, f"{command} {action.option_strings} has no help"
            for opt in action.option_strings:
                assert opt in out


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert cli.main(["demo", "--out", str(out), *TINY]) == 0
    return out


def test_demo_end_to_end(demo_dir, capsys):
    report = (demo_dir / "report.md").read_text()
    assert "## Compute-matched frontier" in report and "bh a=0.5 k=1..8 gaussian" in report
    assert "## Evaluation protocol" in report and "## Null bank" in report
    pngs = list(demo_dir.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    assert (demo_dir / "nulls" / "gaussian" / "nulls.npz").is_file() and (demo_dir / "captured_logits.safetensors").is_file()
    df = load_results(demo_dir / "sweep.jsonl")
    # native, top-1..3, top-p, static allocations at mean k 1..3, 2 x (bh, its mixed, shuffled and static chord)
    assert len(df) == 1 + 3 + 1 + 3 + 2 * 4
    assert "## Verdict" in report and "## Against compute-matched controls" in report
    # max_k saturation (the demo's calibration logits): table of points and the figure
    assert "## max_k saturation" in report and "saturation_max_k" in report
    assert (demo_dir / "max_k_saturation.png").is_file()
    assert "## Budget optimiser" in report and "lowest perplexity with mean k <= 2" in report
    assert "## Load balance" in report and "worst layer CV" in report
    assert (demo_dir / "load_balance_per_layer_prose.png").is_file()
    assert report.index("## Verdict") < report.index("## Compute-matched frontier")
    assert df.loc[df["label"] == "top-2", "mean_experts_per_token"].item() == 2.0
    # the static control against uniform top-k on its calibration text (allocations up to max_k 8)
    assert "## The static control against uniform top-k" in report and "values of k strictly between 1 and 8" in report


def test_demo_writes_a_machine_readable_summary(demo_dir):
    from bh_helpers import __version__

    summary = json.loads((demo_dir / "summary.json").read_text())
    verdict = summary["verdict"]
    assert verdict["pairs"] == 2 and verdict["better"] + verdict["worse"] + verdict["undecided"] == 2
    assert verdict["windows"] == 8 and verdict["answer"] in verdict["text"]
    report = (demo_dir / "report.md").read_text()
    assert verdict["text"] in report  # the same verdict as the report's
    assert summary["versions"]["bh-routing"] == __version__ and summary["settings"]["demo"]["window"] == 16
    by_label = {(r["label"], r["dataset"]): r for r in summary["rows"]}
    df = load_results(demo_dir / "sweep.jsonl")
    for _, row in df.iterrows():
        assert by_label[(row["label"], row["dataset"])]["perplexity"] == row["perplexity"]
    assert {r["label"] for r in summary["comparison"]} == {"bh a=0.5 k=1..8 gaussian", "bh a=0.9 k=1..8 gaussian"}


@pytest.mark.fault("interrupted and resumed runs", "recovered")
def test_rerun_resumes_without_duplicates(demo_dir, capsys):
    before = (demo_dir / "sweep.jsonl").read_bytes()
    assert cli.main(["demo", "--out", str(demo_dir), *TINY]) == 0
    assert "resumed" in capsys.readouterr().out
    assert (demo_dir / "sweep.jsonl").read_bytes() == before  # nothing re-run, nothing appended


@pytest.mark.fault("interrupted and resumed runs", "recovered")
def test_rerun_after_capture_reuses_the_captured_logits(demo_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_dir, run)
    shutil.rmtree(run / "nulls")  # as if stopped between capture and fit: no bank, no results yet
    (run / "sweep.jsonl").unlink()
    captured = (run / "captured_logits.safetensors").read_bytes()
    assert cli.main(["demo", "--out", str(run), *TINY]) == 0
    assert (run / "captured_logits.safetensors").read_bytes() == captured  # not captured again
    assert (run / "nulls" / "gaussian" / "nulls.npz").read_bytes() == (demo_dir / "nulls" / "gaussian" / "nulls.npz").read_bytes()


@pytest.mark.fault("command line", "clear error")
def test_other_grid_is_refused_and_changes_nothing(demo_dir, capsys):
    files = {p: p.read_bytes() for p in demo_dir.rglob("*") if p.is_file()}
    other = [a if a != "0.5,0.9" else "0.5" for a in TINY]
    assert cli.main(["demo", "--out", str(demo_dir), *other]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "alphas" in err
    assert {p: p.read_bytes() for p in demo_dir.rglob("*") if p.is_file()} == files


@pytest.mark.fault("command line", "clear error")
def test_sweep_into_results_of_another_grid(demo_dir, tmp_path, capsys):
    results = demo_dir / "sweep.jsonl"
    before = results.read_bytes()
    rc = cli.main(["sweep", "--nulls", str(demo_dir / "nulls" / "gaussian"), "--results", str(results), "--methods", "by",
                   "--alphas", "0.5", "--mean-ks", "", "--topk-max", "2", "--top-ps", "", "--datasets", "prose", "--max-tokens", "128",
                   "--window", "128", "--stride", "128", "--no-progress"])
    assert rc == 2 and "different grid" in capsys.readouterr().err
    assert results.read_bytes() == before


def test_a_run_with_one_window_gets_no_verdict(tmp_path, capsys):
    """The sweep step runs what it is given; the report states that one window decides nothing."""
    results = tmp_path / "s.jsonl"
    assert cli.main(["sweep", "--results", str(results), "--methods", "bh", "--alphas", "0.5", "--mean-ks", "",
                     "--min-ks", "1", "--topk-max", "1", "--top-ps", "", "--datasets", "prose", "--max-tokens", "64",
                     "--window", "64", "--stride", "64", "--no-progress"]) == 0
    assert cli.main(["report", "--results", str(results), "--out", str(tmp_path / "rep"), "--no-progress"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    verdict = text.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert "No verdict: too few scoring windows" in verdict and "in 1 window;" in verdict
    assert "Yes" not in verdict


def test_report_subcommand(demo_dir, tmp_path, capsys):
    assert cli.main(["report", "--results", str(demo_dir / "sweep.jsonl"), "--out", str(tmp_path / "rep"),
                     "--no-progress"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Compute-matched frontier" in text and '"window": 16' in text


@pytest.mark.fault("command line", "clear error")
def test_unknown_dataset_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["demo", "--out", str(out), "--datasets", "nonsense"]) == 2
    assert "unknown data set 'nonsense'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.fault("command line", "clear error")
def test_empty_text_and_existing_outputs(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert cli.main(["capture", "--out", str(tmp_path / "c.safetensors"), "--text-file", str(empty),
                     "--no-progress"]) == 2
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()
    assert cli.main(["demo", "--out", str(tmp_path / "run"), "--datasets", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    existing = tmp_path / "x.safetensors"
    existing.write_bytes(b"keep")
    assert cli.main(["capture", "--out", str(existing)]) == 2
    assert existing.read_bytes() == b"keep"


def test_capture_fit_chain(tmp_path, capsys):
    cap = tmp_path / "c.safetensors"
    assert cli.main(["capture", "--out", str(cap), "--calibration-tokens", "256", "--window", "128",
                     "--no-progress"]) == 0
    assert cli.main(["fit", "--captured", str(cap), "--out", str(tmp_path / "nulls"), "--grid-size", "1024"]) == 0
    meta = json.loads((tmp_path / "nulls" / "metadata.json").read_text())
    assert meta["model_id"] == "tiny" and meta["kernel"] == "gaussian" and meta["n_samples"]["0"] == 256 * 64
    assert cli.main(["fit", "--captured", str(cap), "--out", str(tmp_path / "nulls")]) == 2  # never overwrites
    assert "already holds" in capsys.readouterr().err


def test_default_null_bank_dir(tmp_path, monkeypatch):
    from bh_helpers.nulls.bank import NullBank
    from bh_helpers.app.paths import default_null_bank_dir, model_slug

    assert model_slug("tiny") == "tiny-olmoe" and model_slug("allenai/OLMoE-1B-7B-0924") == "allenai--OLMoE-1B-7B-0924"
    monkeypatch.chdir(tmp_path)
    bank_dir = default_null_bank_dir("tiny")  # the committed bank, found from any working directory
    assert bank_dir.name == "tiny-olmoe"
    from pathlib import Path

    import bh_helpers
    from bh_helpers.app.paths import PACKAGED_KDE_MODELS

    assert bank_dir.parent == PACKAGED_KDE_MODELS and PACKAGED_KDE_MODELS.is_relative_to(Path(bh_helpers.__file__).parent)
    bank = NullBank.load(bank_dir, num_layers=6, num_experts=64)
    assert bank.metadata.kernel == "gaussian" and bank.metadata.model_id == "tiny"
    with pytest.raises(FileNotFoundError, match="bh-routing capture"):
        default_null_bank_dir("org/none")
    assert default_null_bank_dir("org/none", must_exist=False).name == "org--none"


# ----------------------------------------------------------------------------------------------
# Faults: one line on stderr, exit 2 (130 for Ctrl-C), nothing written, never a traceback
# ----------------------------------------------------------------------------------------------


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("bh-routing: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("argv,needles", [
    (["--max-ks", "100"], ["--max-ks 100", "64 experts", "--max-ks 64 or lower"]),
    (["--topk-max", "65"], ["--topk-max 65", "--topk-max 64 or lower"]),
    (["--min-ks", "1,100"], ["--min-ks 100 exceeds every --max-ks (8)"]),
    (["--trims", "63"], ["--trims must be an integer >= 0 and <= 62; got 63"]),
    (["--statistics", "raw,median"], ["statistic", "'median'", "zscore"]),
    (["--statistics", ""], ["--statistics is empty"]),
    (["--alphas", "", "--mean-ks", ""], ["--mean-ks", "--alphas"]),
    (["--model", "./no/such/folder"], ["--model './no/such/folder'", "--model tiny"]),
    (["--model", "not a model"], ["--model 'not a model'", "org/name"]),
    (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--device", "nonsense"],
     ["--device"]),
    # the newcomer's mistakes (issue 26): each names the flag as typed, before the model loads
    (["--alphas", "2"], ["--alphas must be in (0, 1]"]),
    (["--alphas", "0"], ["--alphas must be in (0, 1]"]),
    (["--min-ks", "9"], ["--min-ks 9 exceeds every --max-ks (8)", "floors of 8 or lower"]),
    (["--min-ks", "4", "--max-ks", "2"], ["--min-ks 4 exceeds every --max-ks (2)"]),
    (["--max-ks", "0"], ["--max-ks must be a positive integer"]),
    (["--mean-ks", "0"], ["--mean-ks 0 is not reachable", "[1.5, 8]"]),
    (["--mean-ks", "100"], ["--mean-ks 100 is not reachable"]),
    (["--top-ps", "1.5"], ["--top-ps must be in (0, 1]"]),
    (["--top-ps", "0"], ["--top-ps must be in (0, 1]"]),
    (["--topk-max", "0"], ["--topk-max must be a positive integer"]),
    (["--window", "0"], ["--window must be"]),
    (["--stride", "0"], ["--stride must be"]),
    (["--stride", "300", "--window", "256"], ["--stride (300) must not exceed --window (256)"]),
    (["--batch-size", "0"], ["--batch-size must be"]),
    (["--max-tokens", "0"], ["--max-tokens must be"]),
    (["--max-tokens", "10", "--window", "256", "--stride", "256"],
     ["--max-tokens 10 gives 1 scoring window", "at least 8", "--max-tokens 2048 or more"]),
    (["--grid-size", "1"], ["--grid-size must be an integer >= 16"]),
    (["--methods", "xx"], ["--methods must be one of"]),
    (["--methods", ""], ["--methods is empty"]),
    (["--trims", "-1"], ["--trims must be an integer >= 0"]),
    (["--seed", "-1"], ["--seed must be an integer >= 0"]),
    (["--statistics", "foo"], ["--statistics must be one of"]),
    (["--datasets", "foo"], ["unknown data set 'foo'"]),
    (["--model", "nope/nope"], ["--model 'nope/nope' cannot be found", "--model tiny"]),
])
@pytest.mark.fault("command line", "clear error")
def test_demo_bad_options_fail_before_any_work(tmp_path, capsys, argv, needles):
    out = tmp_path / "run"
    assert cli.main(["demo", "--out", str(out), *TINY, *argv]) == 2
    _one_line_error(capsys, *needles)
    assert not out.exists(), "a refused command leaves no folder behind (the corrected one must run)"


@pytest.mark.parametrize("argv,needles", [
    (["sweep", "--alphas", "2"], ["--alphas must be in (0, 1]"]),
    (["sweep", "--alphas", "0.5", "--max-ks", "100"], ["--max-ks 100 is too large", "--max-ks 64 or lower"]),
    (["sweep", "--alphas", "0.5", "--window", "0"], ["--window must be an integer >= 2"]),
    (["sweep", "--alphas", "0.5", "--stride", "512", "--window", "256"], ["--stride (512) must not exceed --window"]),
    (["sweep", "--alphas", "0.5", "--model", "nope/nope"], ["--model 'nope/nope' cannot be found"]),
    (["capture", "--calibration-tokens", "0"], ["--calibration-tokens must be an integer >= 2"]),
    (["capture", "--batch-size", "0"], ["--batch-size must be a positive integer"]),
    (["fit", "--grid-size", "1"], ["--grid-size must be an integer >= 16"]),
    (["fit", "--trim", "-1"], ["--trim must be an integer >= 0"]),
    (["report"], ["--results", "does not exist"]),
    (["optimize", "--budget", "4"], ["--results", "does not exist"]),
])
@pytest.mark.fault("command line", "clear error")
def test_step_commands_name_the_flag_before_writing(tmp_path, capsys, argv, needles):
    """The same mistakes on `capture`, `fit`, `sweep`, `report`, `optimize`: the flag typed, nothing written."""
    files = {"sweep": ["--results", str(tmp_path / "s.jsonl"), "--mean-ks", "", "--no-progress"],
             "capture": ["--out", str(tmp_path / "c.safetensors"), "--no-progress"],
             "fit": ["--captured", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "bank")],
             "report": ["--results", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "rep")],
             "optimize": ["--results", str(tmp_path / "none.jsonl")]}[argv[0]]
    assert cli.main([argv[0], *files, *argv[1:]]) == 2
    err = _one_line_error(capsys, *needles)
    assert "`" not in err.split("(")[0], err  # no Python parameter name where a flag belongs
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fault("command line", "clear error")
def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    existing = tmp_path / "report.md"
    existing.write_text("mine")
    assert cli.main(["demo", "--out", str(existing), *TINY]) == 2
    err = _one_line_error(capsys, f"--out {str(existing)!r} is a file", "pass a folder")
    assert "writable" not in err and existing.read_text() == "mine"


def test_library_names_become_the_flags_typed():
    demo = cli._options_of(cli.build_parser(), "demo")
    fit = cli._options_of(cli.build_parser(), "fit")
    assert cli.as_flags("`alpha` 2; `min_k` (9) > `max_k`; `top_p`; `statistic`", demo) == \
        "--alphas 2; --min-ks (9) > --max-ks; --top-ps; --statistics"
    assert cli.as_flags("`statistic` and `kernel` and `bandwidth`", fit) == "--statistic and --kernel and `bandwidth`"
    assert cli.as_flags("layer 0: `kernel` must be one of", fit) == "--kernel must be one of"
    assert cli.as_flags("layer 0: `bandwidth` is too small", fit) == "layer 0: `bandwidth` is too small"
    sweep = cli._options_of(cli.build_parser(), "sweep")  # a demo's results file lives in its --out
    other_grid = "'x/sweep.jsonl' holds results of a different grid; pass another `results_path`"
    assert cli.as_flags(other_grid, sweep).endswith("pass another --results")
    assert cli.as_flags(other_grid, demo).endswith("pass another --out")


def test_version(capsys):
    from bh_helpers import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"bh-routing {__version__}"


def test_device_defaults_to_auto():
    import torch

    args = cli.build_parser().parse_args(["demo"])
    assert args.device == "auto"
    from bh_helpers.models.loading import resolve_device

    assert str(resolve_device("auto")) == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.fault("command line", "clear error")
@pytest.mark.parametrize("device", ["mps", "xpu", "cuda:7"])
def test_a_device_this_machine_lacks_is_named_with_the_fix(device, tmp_path, capsys):
    """It parses (torch.device('mps') does on any machine) but cannot hold a tensor here: the catch-all said
    'RuntimeError: PyTorch is not linked with support for mps devices ... report it' (issue 25 re-run)."""
    import torch

    if device == "cuda:7" and torch.cuda.device_count() > 7 or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    assert cli.main(["capture", "--out", str(tmp_path / "c.safetensors"), "--device", device, "--no-progress"]) == 2
    _one_line_error(capsys, f"--device '{device}' is not usable here (", "use cpu (or auto)")
    assert not any(tmp_path.iterdir())
    from bh_helpers.models.loading import load_model

    with pytest.raises(ValueError, match=f"`device` '{device}' is not usable here"):  # the API says it alike
        load_model("tiny", device=device)


@pytest.mark.fault("command line", "clear error")
def test_binary_text_file_names_the_file(tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert cli.main(["capture", "--out", str(tmp_path / "c.safetensors"), "--text-file", str(binary),
                     "--calibration-tokens", "64", "--no-progress"]) == 2
    _one_line_error(capsys, str(binary), "not UTF-8 text")


@pytest.mark.fault("command line", "clear error")
def test_read_only_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    from bh_helpers.app import pipeline

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "run.json"))

    monkeypatch.setattr(pipeline, "run_demo", read_only)
    assert cli.main(["demo", "--out", str(tmp_path / "ro"), *TINY]) == 2
    _one_line_error(capsys, "Permission denied", "run.json", "writable --out")


@pytest.mark.fault("command line", "clear error")
def test_an_unexpected_failure_is_one_line_too(tmp_path, capsys, monkeypatch):
    from bh_helpers.app import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nwith a second line")

    monkeypatch.setattr(pipeline, "run_demo", broken)
    monkeypatch.delenv("BH_ROUTING_DEBUG", raising=False)
    assert cli.main(["demo", "--out", str(tmp_path / "run"), *TINY]) == 2
    _one_line_error(capsys, "RuntimeError: something inside broke", "BH_ROUTING_DEBUG=1")


@pytest.mark.fault("interrupted and resumed runs", "clear error")
def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from bh_helpers.app import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_demo", interrupted)
    assert cli.main(["demo", "--out", str(tmp_path / "run"), *TINY]) == 130
    _one_line_error(capsys, "interrupted; rerun the same command to resume")


def test_sweep_says_which_bank_it_uses(tmp_path, capsys):
    from bh_helpers.app.paths import default_null_bank_dir

    rc = cli.main(["sweep", "--results", str(tmp_path / "s.jsonl"), "--methods", "bh", "--alphas", "0.5",
                   "--mean-ks", "", "--min-ks", "1", "--topk-max", "1", "--top-ps", "", "--datasets", "prose", "--max-tokens", "64", "--window", "64",
                   "--stride", "64", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"null bank: {default_null_bank_dir('tiny')} (the committed bank of --model tiny" in out


@pytest.mark.fault("command line", "clear error")
def test_wikitext2_is_the_real_one_and_the_fixture_says_what_it_is(tmp_path, capsys, monkeypatch,
                                                                  tiny_model_and_tokenizer):
    """`--datasets wikitext2` ran on an embedded WikiText-style sample and every table called it
    wikitext2; offline it now says so and points to `wikitext2-fixture`."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["demo", "--out", str(tmp_path / "run"), *TINY, "--datasets", "wikitext2"]) == 2
    err = capsys.readouterr().err
    assert "--datasets wikitext2 is the real WikiText-2 test split" in err and "wikitext2-fixture" in err
    assert "`path=`" not in err and "embedded_fixture" not in err and "with --datasets from" not in err, err
    assert not (tmp_path / "run").exists()
    from bh_helpers.models.texts import dataset_description, evaluation_texts

    assert dataset_description("wikitext2-fixture").startswith("embedded WikiText-style fixture (a sample, not WikiText-2)")
    # describing a data set reads none of it (the report described each by loading it, wikitext2 from the hub)
    assert dataset_description("wikitext2") == "WikiText-2 (raw), test split, from the Hugging Face hub"
    docs = evaluation_texts("wikitext2-fixture", tiny_model_and_tokenizer[1], max_tokens=64)
    assert docs and all(isinstance(d, str) and d.strip() for d in docs)


@pytest.mark.fault("mismatched null banks", "recovered")
def test_sweep_with_a_bank_of_another_kernel(demo_dir, tmp_path, capsys):
    """`bh-routing sweep` built its own grid with the gaussian kernel whatever the bank was: an
    empirical bank failed at its first BH row. The grid now comes from the bank (one builder with
    the demo's, `experiments.configs.sweep_grid`)."""
    from bh_helpers.experiments.sweep import load_results

    bank_dir = tmp_path / "empirical"
    assert cli.main(["fit", "--captured", str(demo_dir / "captured_logits.safetensors"), "--kernel", "empirical",
                     "--out", str(bank_dir)]) == 0
    results = tmp_path / "s.jsonl"
    rc = cli.main(["sweep", "--nulls", str(bank_dir), "--results", str(results), "--methods", "bh", "--alphas", "0.5",
                   "--mean-ks", "", "--min-ks", "1", "--topk-max", "1", "--top-ps", "", "--datasets", "prose", "--max-tokens", "64", "--window", "64",
                   "--stride", "64", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    df = load_results(results)
    bh = df[df["method"] == "bh"]
    assert len(bh) == 1 and bh["kernel"].tolist() == ["empirical"] and bh["mean_experts_per_token"].iloc[0] > 0


@pytest.mark.fault("command line", "clear error")
def test_sweep_mean_ks_without_calibration_logits_is_one_line(tmp_path, capsys):
    assert cli.main(["sweep", "--results", str(tmp_path / "s.jsonl"), "--mean-ks", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "--mean-ks needs --captured")
    assert not (tmp_path / "s.jsonl").exists()


def test_sweep_chooses_alpha_for_mean_k_and_runs_the_controls(demo_dir, tmp_path, capsys):
    """--mean-ks with --captured: one BH row per target, each followed by its mixed and shuffled
    controls; the mixed control's realised mean k is the adaptive row's."""
    from bh_helpers.experiments.sweep import load_results

    results = tmp_path / "s.jsonl"
    assert cli.main(["fit", "--captured", str(demo_dir / "captured_logits.safetensors"), "--statistic", "zscore",
                     "--out", str(tmp_path / "z")]) == 0
    rc = cli.main(["sweep", "--nulls", str(tmp_path / "z"), "--captured", str(demo_dir / "captured_logits.safetensors"),
                   "--results", str(results), "--methods", "bh", "--mean-ks", "3", "--min-ks", "1", "--topk-max", "4", "--top-ps", "",
                   "--datasets", "prose", "--max-tokens", "256", "--window", "128", "--stride", "128", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    df = load_results(results)
    assert df["method"].tolist() == ["native", "topk", "topk", "topk", "topk", "bh", "mixed", "shuffled"]
    bh, mixed = df[df["method"] == "bh"].iloc[0], df[df["method"] == "mixed"].iloc[0]
    assert bh["statistic"] == "zscore" and "zscore" in bh["label"]
    assert abs(mixed["mean_experts_per_token"] - bh["mean_experts_per_token"]) < 0.1


def test_sweep_with_inverse_p_weights_reaches_the_frontier(demo_dir, tmp_path, capsys):
    """--weights inverse_p: top-k, adaptive and control rows all weigh by 1/p, and the frontier
    and the control comparison are computed from them like any other convention."""
    from bh_helpers.experiments.comparison import compare_with_controls
    from bh_helpers.experiments.frontier import compute_frontier
    from bh_helpers.experiments.sweep import load_results

    results = tmp_path / "s.jsonl"
    rc = cli.main(["sweep", "--nulls", str(demo_dir / "nulls" / "gaussian"), "--captured",
                   str(demo_dir / "captured_logits.safetensors"), "--results", str(results), "--weights", "inverse_p",
                   "--methods", "bh", "--mean-ks", "3", "--min-ks", "1", "--topk-max", "4", "--top-ps", "",
                   "--datasets", "prose", "--max-tokens", "256", "--window", "128", "--stride", "128", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    df = load_results(results)
    assert df["method"].tolist() == ["native", "topk", "topk", "topk", "topk", "bh", "mixed", "shuffled"]
    assert np.isfinite(df["perplexity"]).all()
    frontier = compute_frontier(df)
    assert len(frontier) == 1 and np.isfinite(frontier["value"]).all() and frontier["status"].notna().all()
    comparison = compare_with_controls(df)  # one row per adaptive configuration, both controls beside it
    assert len(comparison) == 1 and np.isfinite(comparison[["shuffled_ci_low", "shuffled_ci_high"]]).all(axis=None)


def test_demo_tunes_on_one_half_and_states_the_verdict_on_the_other(tmp_path):
    from bh_helpers.experiments.sweep import load_results

    out = tmp_path / "split"
    assert cli.main(["demo", "--out", str(out), *[a for a in TINY if a != "--no-split"]]) == 0
    tune, confirm = load_results(out / "sweep.jsonl"), load_results(out / "confirm.jsonl")
    assert set(tune["dataset"]) == {"prose:tune"} and set(confirm["dataset"]) == {"prose:confirm"}
    tuned, confirmed = set(tune.loc[tune["method"] == "bh", "key"]), set(confirm.loc[confirm["method"] == "bh", "key"])
    assert confirmed and confirmed <= tuned
    assert {"mixed", "shuffled", "static_chord", "static", "topk", "native"} <= set(confirm["method"])
    chord = confirm[confirm["method"] == "static_chord"].iloc[0]
    adaptive = confirm[(confirm["method"] == "bh")].iloc[0]
    assert chord["mean_experts_per_token"] == pytest.approx(adaptive["mean_experts_per_token"], abs=1e-9)
    report = (out / "report.md").read_text()
    verdict = report.split("## Verdict")[1].split("\n## ")[0]
    assert "prose:confirm" in verdict and "prose:tune" not in verdict.split("Tune, then confirm")[0]
    assert "## Tuning split" in report and (out / "static_allocation.json").is_file()


def _results_with_a_bh_pick(path):
    """A results file of a tiny grid (native, top-2, one BH row that is the best within budget 4)."""
    from bh_helpers.experiments.sweep import SweepConfig, run_sweep

    configs = [SweepConfig("native"), SweepConfig("topk", k=2),
               SweepConfig("bh", alpha=0.5, max_k=8, min_k=1, kernel="gaussian")]
    metrics = {"native": (8.0, 15.0), "topk": (2.0, 30.0), "bh": (3.0, 20.0)}

    def evaluate(config, name):
        k, ppl = metrics[config.method]
        return {"mean_experts_per_token": k, "perplexity": ppl}

    run_sweep(configs, ["prose"], evaluate, path, progress=False)
    return path


@pytest.mark.fault("mismatched null banks", "clear error")
def test_commands_refuse_a_bank_without_checksum_and_name_the_opt_in_flag(tmp_path, capsys):
    """`optimize --save-config`, `sweep` and `report` load --nulls: a bank without its metadata checksum is one
    line naming --allow-unverified-bank; with the flag it loads (warning) and the saved config opts in too."""
    from bh_helpers.app.paths import default_null_bank_dir
    from bh_helpers.engines.config import RoutingConfig
    from bh_helpers.nulls.metadata import BANK_DIGEST

    bank = tmp_path / "old_bank"
    shutil.copytree(default_null_bank_dir("tiny"), bank)
    meta = json.loads((bank / "metadata.json").read_text())
    (bank / "metadata.json").write_text(json.dumps({k: v for k, v in meta.items() if k != BANK_DIGEST}))
    results = _results_with_a_bh_pick(tmp_path / "r.jsonl")
    base = ["optimize", "--results", str(results), "--budget", "4", "--nulls", str(bank)]
    assert cli.main([*base, "--save-config", str(tmp_path / "a.json")]) == 2
    _one_line_error(capsys, "no checksum", "--allow-unverified-bank", str(bank / "metadata.json"))
    assert not (tmp_path / "a.json").exists()
    for argv in (["sweep", "--nulls", str(bank), "--results", str(tmp_path / "s.jsonl"), "--mean-ks", "",
                  "--alphas", "0.5", "--datasets", "prose", "--no-progress"],
                 ["report", "--results", str(results), "--out", str(tmp_path / "rep"), "--nulls", str(bank)]):
        assert cli.main(argv) == 2
        _one_line_error(capsys, "no checksum", "--allow-unverified-bank")
    assert not (tmp_path / "s.jsonl").exists()
    assert cli.main([*base, "--save-config", str(tmp_path / "b.json"), "--allow-unverified-bank"]) == 0
    warning = capsys.readouterr().err  # one line in the user's flags, no source line or Python name
    assert warning.startswith("bh-routing: warning: ") and warning.count("\n") == 1, warning
    assert "unverified as asked (--allow-unverified-bank;" in warning and "UserWarning" not in warning
    config = RoutingConfig.load(tmp_path / "b.json")
    assert config.allow_unverified_bank and config.selector == "bh"
    with pytest.warns(UserWarning, match="unverified"):
        config.to_selector()


def _results_for_ranking(path, *, grid_id=None, perplexity=None, alpha=0.5):
    """native, top-1, top-2 and one BH row on prose; ``perplexity`` overrides some rows' values by method/k."""
    from bh_helpers.experiments.sweep import SweepConfig, run_sweep

    configs = [SweepConfig("native"), SweepConfig("topk", k=1), SweepConfig("topk", k=2),
               SweepConfig("bh", alpha=alpha, max_k=8, min_k=1, kernel="gaussian")]
    values = {"native": (8.0, 15.0), "top-1": (1.0, 40.0), "top-2": (2.0, 30.0), "bh": (3.0, 20.0),
              **(perplexity or {})}

    def evaluate(config, name):
        k, ppl = values["bh" if config.method == "bh" else config.label().split(" ")[0]]
        return {"mean_experts_per_token": k, "perplexity": ppl, "nll": float(np.log(ppl))}

    run_sweep(configs, ["prose"], evaluate, path, grid_id=grid_id, progress=False)
    return path


@pytest.mark.fault("command line", "recovered")
def test_optimize_and_report_rank_inf_perplexity_last(tmp_path, capsys):
    """An overflowed row (perplexity inf, written as "inf") crashed `optimize` (TypeError) and `report`; it now
    ranks last and the report shows it as inf."""
    results = _results_for_ranking(tmp_path / "r.jsonl", perplexity={"bh": (3.0, float("inf")),
                                                                     "top-1": (1.0, float("nan"))})
    assert cli.main(["optimize", "--results", str(results), "--budget", "4"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "| top-2 | topk |" in out.out
    assert cli.main(["optimize", "--results", str(results), "--quality-weight", "1", "--speed-weight", "1"]) == 0
    assert "| native |" in capsys.readouterr().out  # scaled over the finite rows: native and top-2 tie, first wins
    assert cli.main(["report", "--results", str(results), "--out", str(tmp_path / "rep"), "--no-categories"]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert any("bh a=0.5" in line and "| inf |" in line for line in report.splitlines()), report


@pytest.mark.fault("command line", "clear error")
def test_optimize_and_report_set_aside_rows_of_another_grid(tmp_path, capsys):
    """Two results files concatenated: the other grid's (better) BH row was ranked and reported as if it belonged.
    It is now set aside with one warning that counts it."""
    ours = _results_for_ranking(tmp_path / "ours.jsonl", grid_id="model A")
    theirs = _results_for_ranking(tmp_path / "theirs.jsonl", grid_id="model B", perplexity={"bh": (3.0, 5.0)},
                                  alpha=0.3)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(ours.read_text() + theirs.read_text())
    assert cli.main(["optimize", "--results", str(mixed), "--budget", "4"]) == 0
    out, err = capsys.readouterr()
    assert "bh-routing: warning: " in err and "5 lines that do not belong to its grid" in err, err
    assert "| bh a=0.5 k=1..8 gaussian | bh | 3.000 | 20.000 |" in out, out
    assert cli.main(["report", "--results", str(mixed), "--out", str(tmp_path / "rep"), "--no-categories"]) == 0
    assert "set aside" in capsys.readouterr().err
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "bh a=0.5" in report and "a=0.3" not in report
