"""Every option of every `bh-routing` command, given a bad value, is refused before anything is written.

Issue 25, class 3: a late check (after ``run.json``, the capture or the banks were written) left a
folder that refused the corrected command. Each row of :data:`BAD` is one option of one command
with one bad value: the exit status is 2, stderr names the flag in one line (or argparse's usage
and error), no traceback, and the folder the command was pointed at is byte for byte unchanged (a
folder that did not exist still does not), so the corrected command runs. A test checks that the
table covers every option of every subcommand. Class 7: a requested configuration that cannot run
is refused, never dropped. Class 9: a full disk, truncated weights and an edited capture file are
one line each.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("pandas")

from bh_helpers.app import cli  # noqa: E402

SMALL = ["--max-tokens", "64", "--window", "64", "--stride", "64", "--no-progress"]
# The demo of tests/test_cli.py (8 windows of 16 tokens: the fewest an interval takes).
DEMO = ["--calibration-tokens", "256", "--grid-size", "256", "--methods", "bh", "--alphas", "0.5", "--mean-ks", "",
        "--statistics", "raw", "--trims", "0", "--topk-max", "1", "--top-ps", "", "--datasets", "prose",
        "--max-tokens", "128", "--window", "16", "--stride", "16", "--no-categories", "--no-progress",
        "--static-allocation", "none", "--no-split", "--no-k-matching"]
SWEEP = ["--nulls", "{bank}", "--captured", "{cap}", "--methods", "bh", "--alphas", "0.5", "--mean-ks", "",
         "--topk-max", "1", "--top-ps", "", "--datasets", "prose", "--no-controls", *SMALL]
BASE = {
    "demo": ["--out", "{tmp}/run", *DEMO],
    "capture": ["--out", "{tmp}/c.safetensors", "--calibration-tokens", "64", "--window", "64", "--no-progress"],
    "fit": ["--captured", "{cap}", "--out", "{tmp}/bank", "--grid-size", "256"],
    "sweep": ["--results", "{tmp}/s.jsonl", *SWEEP],
    "optimize": ["--results", "{results}", "--budget", "4"],
    "report": ["--results", "{results}", "--out", "{tmp}/rep", "--no-categories", "--no-progress"],
}

def _fixed(command: str, argv: list[str], needle: str):
    """A row that issue 25 fixed (late, unnamed or silently dropped before): a case of the fault battery."""
    return pytest.param(command, argv, needle, marks=pytest.mark.fault("bad arguments", "clear error"),
                        id=f"{command} {' '.join(argv)}")


#: (command, bad arguments, text the one-line error must hold); the other rows were refused in time before
BAD = [
    ("demo", ["--out", "{file}"], "--out"),
    ("demo", ["--model", "./no/such/folder"], "--model './no/such/folder'"),
    ("demo", ["--device", "nonsense"], "--device"),
    ("demo", ["--threads", "-1"], "--threads must be between 0"),
    _fixed("demo", ["--calibration-tokens", "1"], "--calibration-tokens must be an integer >= 2"),
    ("demo", ["--kernel", "bogus"], "argument --kernel: invalid choice"),
    ("demo", ["--statistics", "median"], "--statistics must be one of"),
    ("demo", ["--trims", "-1"], "--trims must be an integer >= 0"),
    ("demo", ["--trims", "63"], "--trims must be an integer >= 0 and <= 62"),
    ("demo", ["--grid-size", "8"], "--grid-size must be an integer >= 16"),
    ("demo", ["--methods", "fdr_bh"], "--methods must be one of"),
    ("demo", ["--alphas", "0"], "--alphas must be in (0, 1]"),
    _fixed("demo", ["--layer-alphas", "{la2}"], "--layer-alphas has 2 levels for the 6 layers"),
    ("demo", ["--layer-alphas", "{file}"], "argument --layer-alphas"),
    ("demo", ["--layer-targets", "bogus"], "argument --layer-targets: invalid choice"),
    ("demo", ["--mean-ks", "20"], "--mean-ks 20 is not reachable"),
    ("demo", ["--mean-ks", "1.2", "--min-ks", "1"], "--mean-ks 1.2 is not reachable"),
    ("demo", ["--max-ks", "100"], "--max-ks 100 is too large"),
    ("demo", ["--min-ks", "9"], "--min-ks 9 exceeds every --max-ks"),
    ("demo", ["--topk-max", "0"], "--topk-max must be a positive integer"),
    ("demo", ["--top-ps", "0"], "--top-ps must be in (0, 1]"),
    ("demo", ["--datasets", "nonsense"], "unknown data set 'nonsense'"),
    ("demo", ["--max-tokens", "10"], "--max-tokens 10 gives 1 scoring window"),
    # the same for a text too short for an interval: it ran to the end before, and only report.md said "no verdict"
    _fixed("demo", ["--datasets", "{short}"], "--datasets '{short}' holds 7 tokens: 1 scoring window of 16; a "
           "paired-bootstrap interval needs at least 8: give it at least 128 tokens of text (or a smaller --window)"),
    _fixed("demo", ["--window", "1", "--stride", "1"], "--window must be an integer >= 2"),
    _fixed("demo", ["--window", "100000", "--stride", "100000", "--max-tokens", "800000"], "is longer than the model's context of 512 tokens"),
    ("demo", ["--stride", "0"], "--stride must be"),
    ("demo", ["--batch-size", "0"], "--batch-size must be"),
    ("demo", ["--weights", "bogus"], "argument --weights: invalid choice"),
    ("demo", ["--static-allocation", "bogus"], "argument --static-allocation: invalid choice"),
    _fixed("demo", ["--static-allocation", "separable", "--allocation-tokens", "3"],
     "--allocation-tokens must be an integer >= 4"),
    # 4 tokens chose an allocation without a word: less than one window of each half
    _fixed("demo", ["--static-allocation", "separable", "--allocation-tokens", "31"],
           "--allocation-tokens must be an integer >= 32; got 31. (a static allocation is chosen by perplexity on "
           "windows of 16 tokens"),
    ("demo", ["--seed", "-1"], "--seed must be an integer >= 0"),
    ("capture", ["--out", "{file}"], "--out '{file}' exists"),
    _fixed("capture", ["--out", "{dir}"], "--out '{dir}' is a folder"),
    ("capture", ["--model", "nope/nope"], "--model 'nope/nope' cannot be found"),
    ("capture", ["--device", "nonsense"], "--device"),
    ("capture", ["--threads", "-1"], "--threads must be between 0"),
    _fixed("capture", ["--calibration-tokens", "1"], "--calibration-tokens must be an integer >= 2"),
    ("capture", ["--text-file", "{missing}"], "does not exist"),
    _fixed("capture", ["--text-file", "{dir}"], "text file '{dir}' is a folder; pass a file in it"),
    _fixed("capture", ["--device", "{no_device}"], "--device '{no_device}' is not usable here"),
    ("capture", ["--window", "0"], "--window must be a positive integer"),
    ("capture", ["--batch-size", "0"], "--batch-size must be a positive integer"),
    ("fit", ["--captured", "{missing}"], "does not exist"),
    ("fit", ["--captured", "{file}"], "not a readable safetensors file"),
    _fixed("fit", ["--captured", "{dir}"], "captured logits file '{dir}' is a folder; pass a file in it"),
    # found only while fitting (under the --out lock): it left an empty --out folder behind
    _fixed("fit", ["--captured", "{const2}"], "layer 2: the logits have zero variance (all values equal 0.0); a null "
           "cannot be fitted to a constant: capture more or different calibration text"),
    _fixed("fit", ["--out", "{file}"], "--out '{file}' is a file"),
    ("fit", ["--out", "{bank}"], "already holds a null bank"),
    ("fit", ["--kernel", "bogus"], "argument --kernel: invalid choice"),
    ("fit", ["--grid-size", "8"], "--grid-size must be an integer >= 16"),
    ("fit", ["--statistic", "median"], "argument --statistic: invalid choice"),
    ("fit", ["--trim", "63"], "--trim must be an integer >= 0 and <= 62"),
    ("sweep", ["--nulls", "{missing}"], "{missing}"),
    _fixed("sweep", ["--results", "{dir}"], "--results '{dir}' is a folder"),
    ("sweep", ["--captured", "{missing}", "--mean-ks", "2"], "does not exist"),
    ("sweep", ["--model", "nope/nope"], "--model 'nope/nope' cannot be found"),
    ("sweep", ["--device", "nonsense"], "--device"),
    ("sweep", ["--threads", "-1"], "--threads must be between 0"),
    ("sweep", ["--methods", "fdr_bh"], "--methods must be one of"),
    ("sweep", ["--alphas", "0"], "--alphas must be in (0, 1]"),
    _fixed("sweep", ["--layer-alphas", "{la2}"], "--layer-alphas has 2 levels for the 6 layers"),
    _fixed("sweep", ["--layer-alphas", "{la8}"], "--layer-alphas has 8 levels for the 6 layers"),
    ("sweep", ["--layer-targets", "bogus"], "argument --layer-targets: invalid choice"),
    _fixed("sweep", ["--mean-ks", "20"], "--mean-ks 20 is not reachable"),
    _fixed("sweep", ["--mean-ks", "1.2", "--min-ks", "1"], "--mean-ks 1.2 is not reachable"),
    ("sweep", ["--max-ks", "100"], "--max-ks 100 is too large"),
    _fixed("sweep", ["--min-ks", "9"], "--min-ks 9 exceeds every --max-ks"),
    _fixed("sweep", ["--topk-max", "0"], "--topk-max must be a positive integer"),
    ("sweep", ["--top-ps", "0"], "--top-ps must be in (0, 1]"),
    ("sweep", ["--datasets", "nonsense"], "unknown data set 'nonsense'"),
    ("sweep", ["--max-tokens", "0"], "--max-tokens must be"),
    _fixed("sweep", ["--window", "1", "--stride", "1"], "--window must be an integer >= 2"),
    _fixed("sweep", ["--window", "100000", "--stride", "100000"], "is longer than the model's context of 512 tokens"),
    ("sweep", ["--stride", "0"], "--stride must be"),
    ("sweep", ["--batch-size", "0"], "--batch-size must be"),
    ("sweep", ["--weights", "bogus"], "argument --weights: invalid choice"),
    ("optimize", ["--results", "{missing}"], "does not exist"),
    _fixed("optimize", ["--results", "{dir}"], "--results '{dir}' is a folder; pass a file in it"),
    _fixed("optimize", ["--results", "{header_only}"], "--results '{header_only}' has no rows (the sweep stopped"),
    ("optimize", ["--budget", "x"], "argument --budget: invalid float value"),
    ("optimize", ["--quality-weight", "1"], "give either --budget"),
    ("optimize", ["--speed-weight", "-1"], "give either --budget"),
    ("optimize", ["--save-config", "{file}"], "--save-config '{file}' exists"),
    ("optimize", ["--save-config", "{tmp}/cfg.json", "--nulls", "{missing}"], "{missing}"),
    ("optimize", ["--weights", "bogus"], "argument --weights: invalid choice"),
    ("report", ["--results", "{missing}"], "does not exist"),
    _fixed("report", ["--out", "{file}"], "--out '{file}' is a file"),
    _fixed("report", ["--results", "{dir}"], "--results '{dir}' is a folder; pass a file in it"),
    ("report", ["--nulls", "{missing}"], "{missing}"),
    ("report", ["--nulls", "{bank}", "--model", "nope/nope"], "--model 'nope/nope' cannot be found"),
    ("report", ["--nulls", "{bank}", "--device", "nonsense"], "--device"),
    ("report", ["--threads", "-1"], "--threads must be between 0"),
    ("report", ["--captured", "{cap}"], "--captured (for the max_k saturation table) needs --nulls"),
]

BAD = [row if hasattr(row, "values") else pytest.param(*row, id=f"{row[0]} {' '.join(row[1])}") for row in BAD]

#: Options that take no value (nothing to get wrong) or any text (a label).
NO_BAD_VALUE = {"--help", "--no-progress", "--no-categories", "--no-split", "--no-k-matching", "--no-controls",
                "--model-id", "--allow-unverified-bank"}  # switches take no value (the bank opt-in: tests/test_cli.py)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A capture, a bank and a results file of the embedded model (read, never written, by the table)."""
    root = tmp_path_factory.mktemp("env")
    cap, bank, results = root / "cap.safetensors", root / "bank", root / "s.jsonl"
    assert cli.main(["capture", "--out", str(cap), "--calibration-tokens", "256", "--window", "64",
                     "--no-progress"]) == 0
    assert cli.main(["fit", "--captured", str(cap), "--out", str(bank), "--grid-size", "256"]) == 0
    assert cli.main(["sweep", "--results", str(results), *[_fill(a, {"bank": bank, "cap": cap}) for a in SWEEP]]) == 0
    import torch

    from bh_helpers.capture import CAPTURE_DIGEST, CapturedLogits

    captured, header = CapturedLogits.load(cap)  # one layer's logits all equal: no null can be fitted to it
    captured.logits[2] = torch.zeros_like(captured.logits[2])
    captured.save(root / "const2.safetensors",
                  metadata={k: v for k, v in header.items() if k not in ("format", "total_tokens", CAPTURE_DIGEST)})
    return {"cap": cap, "bank": bank, "results": results, "root": root, "const2": root / "const2.safetensors"}


def _fill(arg: str, places: dict) -> str:
    return arg.format(**{k: str(v) for k, v in places.items()}) if "{" in arg else arg


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_info:  # argparse's own refusals (usage + one error line)
        return exit_info.code


def _places(tmp_path: Path, env: dict) -> dict:
    (tmp_path / "a_file").write_text("not what the option wants")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "la2.json").write_text("[0.1, 0.2]")
    (tmp_path / "la8.json").write_text(json.dumps([0.1] * 8))
    (tmp_path / "short.txt").write_text("a text of seven tokens")
    # a sweep stopped before its first row: the header line alone
    (tmp_path / "header_only.jsonl").write_text(env["results"].read_text().splitlines()[0] + "\n")
    import torch

    no_device = "xpu" if not (hasattr(torch, "xpu") and torch.xpu.is_available()) else "cuda:99"
    return {"tmp": tmp_path, "file": tmp_path / "a_file", "dir": tmp_path / "a_dir", "missing": tmp_path / "none",
            "la2": tmp_path / "la2.json", "la8": tmp_path / "la8.json", "header_only": tmp_path / "header_only.jsonl",
            "short": tmp_path / "short.txt",
            "no_device": no_device, **env}


@pytest.mark.parametrize("command,argv,needle", BAD)
def test_a_bad_option_is_refused_before_anything_is_written(command, argv, needle, tmp_path, env, capsys):
    places = _places(tmp_path, env)
    before, env_before = _tree(tmp_path), _tree(env["root"])
    rc = _run([command, *[_fill(a, places) for a in BASE[command]], *[_fill(a, places) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and needle.format(**{k: str(v) for k, v in places.items()}) in err, err
    if not err.startswith("usage:"):
        assert len(err.splitlines()) == 1 and err.startswith("bh-routing: error: "), err
    assert _tree(tmp_path) == before, "the refused command wrote nothing (the corrected one must run)"
    assert _tree(env["root"]) == env_before


def test_the_table_covers_every_option_of_every_command():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    rows = [getattr(row, "values", row) for row in BAD]
    tested = {(c, a) for c, argv, _ in rows for a in argv if a.startswith("--")}
    missing = [(name, opt) for name, sub in commands.items() for action in sub._actions
               for opt in action.option_strings[-1:] if opt not in NO_BAD_VALUE and (name, opt) not in tested]
    assert not missing, f"options without a bad-value case in BAD: {missing}"


# ----------------------------------------------------------------------------------------------
# Checks that once came after the first write: refused, folder unchanged, corrected command runs
# ----------------------------------------------------------------------------------------------

LATE = [
    ("demo", ["--calibration-tokens", "1"], ["--calibration-tokens", "256"]),
    ("demo", ["--static-allocation", "separable", "--allocation-tokens", "2"], ["--static-allocation", "none"]),
    ("demo", ["--layer-alphas", "{la2}", "--alphas", ""], ["--layer-alphas", "{la6}", "--alphas", ""]),
    ("sweep", ["--layer-alphas", "{la2}", "--alphas", ""], ["--layer-alphas", "{la6}", "--alphas", ""]),
    ("sweep", ["--window", "1000", "--stride", "1000", "--max-tokens", "1000"], []),
]


@pytest.mark.parametrize("command,bad,good", LATE, ids=[f"{c} {' '.join(b)}" for c, b, _ in LATE])
@pytest.mark.fault("command line", "clear error")
def test_a_late_check_now_comes_first_and_the_corrected_command_runs(command, bad, good, tmp_path, env, capsys):
    places = _places(tmp_path, env)
    (tmp_path / "la6.json").write_text(json.dumps([0.5] * 6))
    places["la6"] = tmp_path / "la6.json"
    base = [_fill(a, places) for a in BASE[command]]
    before = _tree(tmp_path)
    assert _run([command, *base, *[_fill(a, places) for a in bad]]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert _tree(tmp_path) == before
    assert _run([command, *base, *[_fill(a, places) for a in good]]) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Class 7: a configuration that cannot run is refused or named, never dropped
# ----------------------------------------------------------------------------------------------


@pytest.mark.fault("bad arguments", "clear error")
def test_a_target_one_floor_cannot_reach_is_named(env):
    from bh_helpers.experiments.grids import sweep_grid
    from bh_helpers.nulls.bank import NullBank
    from bh_helpers.capture import CapturedLogits

    bank = NullBank.load(env["bank"])
    calibration, _ = CapturedLogits.load(env["cap"])
    with pytest.warns(UserWarning, match=r"1 combination of the grid cannot run .*`mean_k` 1.2 with `min_k` 1, "
                                         r"`max_k` 8"):
        configs = sweep_grid(banks={"gaussian": bank}, calibration=calibration, methods=["bh"], alphas=[],
                             mean_ks=[1.2], max_ks=[8], min_ks=[0, 1], topk_max=1, top_ps=[], controls=False)
    assert [(c.min_k, c.method) for c in configs if c.method == "bh"] == [(0, "bh")]
    with pytest.raises(ValueError, match="`mean_k` 20 is not reachable"):
        sweep_grid(banks={"gaussian": bank}, calibration=calibration, methods=["bh"], alphas=[], mean_ks=[20],
                   max_ks=[8], min_ks=[1], topk_max=1, top_ps=[])


@pytest.mark.fault("bad arguments", "clear error")
def test_expand_grid_names_the_pairs_it_leaves_out():
    from bh_helpers.experiments.grids import expand_grid

    with pytest.warns(UserWarning, match="`min_k` 6 > `max_k` 4"):
        grid = expand_grid(methods=["bh"], alphas=[0.1], max_ks=[4, 8], min_ks=[1, 6], topk=False, native=False)
    assert sorted((c.min_k, c.max_k) for c in grid) == [(1, 4), (1, 8), (6, 8)]


# ----------------------------------------------------------------------------------------------
# Class 9: what reaches the user is one line
# ----------------------------------------------------------------------------------------------


@pytest.mark.fault("damaged files", "clear error")
def test_capture_onto_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    real_fsync = os.fsync

    def full(fd):  # the disk fills while the capture is written (a tmpfs of this size needs root)
        real_fsync(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "c.safetensors"
    assert cli.main(["capture", "--out", str(out), "--calibration-tokens", "64", "--window", "64",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bh-routing: error: No space left on device") and len(err.splitlines()) == 1, err
    assert "free space or choose another --out" in err
    assert not out.exists() and not (tmp_path / "c.safetensors.tmp").exists(), "no half-written capture"


@pytest.mark.fault("damaged files", "clear error")
def test_truncated_weights_are_one_line_naming_the_model(tmp_path, capsys):
    import shutil

    from bh_helpers.models.loading import EMBEDDED_MODEL_DIR

    folder = tmp_path / "truncated"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / name, folder / name)
    weights = (EMBEDDED_MODEL_DIR / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 3])  # a download cut short
    out = tmp_path / "c.safetensors"
    assert cli.main(["capture", "--model", str(folder), "--out", str(out), "--calibration-tokens", "64",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--model {str(folder)!r}: its weights cannot be read" in err and "download or save the model again" in err
    assert "unexpected failure" not in err and not out.exists()


@pytest.mark.fault("damaged files", "clear error")
def test_a_capture_without_token_ids_names_the_file(tmp_path, env, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    edited = tmp_path / "edited.safetensors"
    with safe_open(str(env["cap"]), framework="pt") as f:  # the real file, one tensor taken out
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "token_ids"}
        header = f.metadata()
    save_file(tensors, str(edited), metadata=header)
    out = tmp_path / "bank"
    assert cli.main(["fit", "--captured", str(edited), "--out", str(out), "--grid-size", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "KeyError" not in err, err
    assert f"{str(edited)!r} lacks token_ids" in err and "capture again" in err
    assert not out.exists()


@pytest.mark.parametrize("flag,values,repeated", [("--top-ps", "0.8,0.8", "0.8"), ("--max-ks", "8,8", "8"),
                                                  ("--alphas", "0.5,0.50", "0.5"), ("--datasets", "prose,prose", "prose"),
                                                  ("--mean-ks", "2 2.0", "2.0"), ("--methods", "bh,bh", "bh")])
@pytest.mark.fault("bad arguments", "clear error")
def test_a_value_given_twice_in_any_list_option_is_refused_naming_it(flag, values, repeated, tmp_path, capsys):
    """--top-ps 0.8,0.8 was refused as "`configs` has duplicates" while --alphas 0.5,0.5 was merged quietly:
    every list option now refuses a repeat alike, naming the option, before anything is written."""
    results = tmp_path / "s.jsonl"
    assert _run(["sweep", "--results", str(results), flag, values]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"argument {flag}: {repeated} is given twice; give each value once"), err
    assert not results.exists()


@pytest.mark.parametrize("argv,flag", [(["demo", "--out", ""], "--out"), (["report", "--results", "r.jsonl", "--out", ""],
                                                                           "--out"),
                                       (["fit", "--captured", "c.safetensors", "--out", ""], "--out"),
                                       (["fit", "--captured", "c.safetensors", "--out", "b", "--model-id", ""],
                                        "--model-id")])
@pytest.mark.fault("bad arguments", "clear error")
def test_an_empty_path_or_name_is_refused(argv, flag, tmp_path, monkeypatch, capsys):
    """`demo --out ''` and `fit --out ''` wrote into the current folder (report replaced a report.md there);
    `fit --model-id ''` stored an empty id. Refused by name before anything is read or written."""
    monkeypatch.chdir(tmp_path)
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"{flag} is empty; pass a name (for a path, '.' is the current folder)"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fault("command line", "clear error")
def test_ctrl_c_while_the_cli_is_still_importing_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the first seconds of any command (torch and transformers importing) printed a
    KeyboardInterrupt traceback; the console script now answers it like an interrupt mid-command."""
    import sys

    from bh_helpers.app import console

    class Interrupted:  # the import of the CLI module is where the user's Ctrl-C lands
        def find_spec(self, name, path=None, target=None):
            if name == "bh_helpers.app.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "bh_helpers.app.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    assert console.main() == 130
    assert capsys.readouterr().err == "bh-routing: interrupted; rerun the same command to resume.\n"


@pytest.mark.fault("command line", "clear error")
def test_ctrl_c_while_importing_is_one_line_under_python_m_too(tmp_path):
    """`python -m bh_helpers.app.cli` runs cli.py's own imports before any handler (a traceback, issue 25 re-run):
    the module form is `python -m bh_helpers`, which answers like the console script. The interrupt is injected
    at the import of scipy (deep in the CLI's imports) by a sitecustomize."""
    import os
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Interrupted:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'scipy':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupted())\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "bh_helpers", "fit", "--help"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr == "bh-routing: interrupted; rerun the same command to resume.\n", \
        proc.stderr[-2000:]


@pytest.mark.fault("command line", "clear error")
def test_a_budget_below_every_row_is_said_in_words(env, tmp_path, capsys):
    """``--budget 0.5`` printed a row of empty cells and exited 0 without a word (issue 25 re-run)."""
    assert cli.main(["optimize", "--results", str(env["results"]), "--budget", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert err.strip() == ("bh-routing: warning: no configuration of 'prose' has mean k <= 0.5: the cheapest measured "
                           "is top-1 at mean k 1; raise --budget."), err
    assert cli.main(["optimize", "--results", str(env["results"]), "--budget", "0.5",
                     "--save-config", str(tmp_path / "cfg.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "bh-routing: error: --save-config: nothing fits --budget 0.5; nothing was saved.", err
    assert err[0].startswith("bh-routing: warning: no configuration of 'prose'") and len(err) == 2, err
    assert not (tmp_path / "cfg.json").exists()


@pytest.mark.fault("mismatched null banks", "clear error")
def test_a_demo_resumed_after_the_model_folders_weights_changed_says_to_use_a_new_out(tmp_path, capsys):
    """Same settings, same --model path, other router weights: the folder's bank was refused with
    'Fit a bank for this model (`bh-routing capture` + `bh-routing fit`)', advice for another command."""
    import torch

    from bh_helpers.models.loading import load_model

    model, tok = load_model("tiny", device="cpu", dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    argv = ["demo", "--out", str(tmp_path / "run"), *DEMO, "--model", str(tmp_path / "m")]
    assert cli.main(argv) == 0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    before = _tree(tmp_path / "run")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"bh-routing: error: --out '{tmp_path / 'run'}' holds a run of other weights than --model "
                   f"'{tmp_path / 'm'}' has now (its routers differ: weights or routing settings): pass a new --out."), err
    assert _tree(tmp_path / "run") == before


@pytest.mark.fault("bad arguments", "clear error")
def test_a_calibration_text_shorter_than_asked_is_said(tmp_path, capsys):
    """`--calibration-tokens 64` on a 9-token text (or 100000 on the embedded slice's 39k) captured what there was
    and printed only the count: the null and every alpha were calibrated on less than asked, without a word."""
    text = tmp_path / "short.txt"
    text.write_text("a calibration text of a dozen tokens or so, not more")
    out = tmp_path / "c.safetensors"
    assert cli.main(["capture", "--out", str(out), "--text-file", str(text), "--calibration-tokens", "64",
                     "--window", "16", "--no-progress"]) == 0
    err = capsys.readouterr().err.strip()
    from bh_helpers.capture import CapturedLogits

    n = CapturedLogits.load(out)[0].num_tokens
    assert n < 64 and err == (f"bh-routing: warning: the calibration text holds {n} tokens, fewer than the 64 of "
                              f"--calibration-tokens: all {n} are captured (pass a longer --text-file for more).")
    assert cli.main(["fit", "--captured", str(out), "--out", str(tmp_path / "bank"), "--grid-size", "256"]) == 0
    assert capsys.readouterr().err.strip() == (f"bh-routing: warning: {str(out)!r} holds {n} calibration tokens, fewer "
                                               "than the 64 its capture asked for (its text was shorter): the null is "
                                               "fitted on those.")


@pytest.mark.fault("damaged files", "clear error")
def test_a_demo_resumed_after_its_capture_was_replaced_is_refused(tmp_path, capsys):
    """A capture file swapped in a run folder after its banks were fitted: the resumed demo solved alphas and the
    saturation table on logits the banks never saw (issue 25 re-run). A bank fitted from a file records its
    checksum."""
    argv = ["demo", "--out", str(tmp_path / "run"), *DEMO]
    assert cli.main(argv) == 0
    assert cli.main(["capture", "--out", str(tmp_path / "other.safetensors"), "--calibration-tokens", "300",
                     "--window", "16", "--no-progress"]) == 0
    (tmp_path / "run" / "captured_logits.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    capsys.readouterr()
    before = _tree(tmp_path / "run")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "captured_logits.safetensors' is not the capture the bank in" in err and "pass a new --out" in err, err
    assert _tree(tmp_path / "run") == before
