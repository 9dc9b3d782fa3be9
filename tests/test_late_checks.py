"""Cases an independent re-run of issue 25 found after the merge: checks that came after writing,
and inputs that were accepted quietly. Each is refused before anything is written."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from bh_helpers.app import cli
from bh_helpers.models.loading import embedded_model_dir
from bh_helpers.experiments.results_file import seal_row


def _run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_info:  # argparse's own refusals
        return exit_info.code


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.fault("command line", "clear error")
def test_demo_on_a_text_file_with_the_default_split_is_refused_before_writing(tmp_path, capsys):
    """A .txt data set is one document: the default tune/confirm split cannot hold it. Refused
    before run.json, the capture or the banks are written (it used to fail after them and
    wedge the folder), naming --no-split; the corrected command then starts in the same folder."""
    text = tmp_path / "mine.txt"
    text.write_text("One paragraph of the user's own text. " * 200, encoding="utf-8")
    out = tmp_path / "run"
    rc = _run(["demo", "--out", str(out), "--datasets", str(text), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--no-split" in err and "Traceback" not in err, err
    assert not out.exists() or _files(out) == [], _files(out)


@pytest.mark.fault("bad arguments", "clear error")
def test_capture_refuses_a_window_past_the_context(tmp_path, capsys):
    """``capture --window`` larger than the model's context length (sweep and demo refuse it too)."""
    out = tmp_path / "c.safetensors"
    rc = _run(["capture", "--out", str(out), "--window", "1024", "--calibration-tokens", "2048", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--window" in err and "is longer than the model's context of 512 tokens" in err, err
    assert not out.exists()


@pytest.mark.fault("damaged files", "clear error")
def test_capture_refuses_a_model_folder_without_its_tokenizer(tmp_path, capsys):
    """Without tokenizer files the folder loads a tokenizer that turns any text into nothing: the
    capture held end-of-text markers only and exited 0. Refused, naming the missing files."""
    folder = tmp_path / "notok"
    shutil.copytree(embedded_model_dir(), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    out = tmp_path / "c.safetensors"
    rc = _run(["capture", "--model", str(folder), "--out", str(out), "--calibration-tokens", "256", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer" in err and "Traceback" not in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Issue 25, second re-run: a demo that fails after its capture and banks are written leaves them
# for the corrected command (only the settings of the outputs kept are compared on resume)
# ----------------------------------------------------------------------------------------------

#: A short demo (tests/test_cli_options.py's DEMO): 8 windows of 16 tokens, one bank, no split.
DEMO = ["--calibration-tokens", "256", "--grid-size", "256", "--alphas", "", "--statistics", "raw", "--trims", "0",
        "--topk-max", "1", "--top-ps", "", "--datasets", "prose", "--max-tokens", "128", "--window", "16",
        "--stride", "16", "--no-categories", "--no-progress", "--static-allocation", "none", "--no-split"]

#: (settings only known to be out of reach once the nulls are fitted, the corrected settings). Bonferroni,
#: BY and Holm select at most ~1.4 experts per token on the tiny model, so 7.5 (or, per layer, 0.9) is out
#: of their reach; the corrected command changes only settings of steps that never completed.
WEDGED = [
    (["--methods", "bonferroni", "--mean-ks", "7.5", "--no-k-matching"], ["--methods", "bh", "--mean-ks", "2",
                                                                          "--no-k-matching"]),
    (["--methods", "by", "--mean-ks", "7.5", "--no-k-matching"], ["--methods", "by", "--mean-ks", "",
                                                                  "--alphas", "0.5", "--no-k-matching"]),
    (["--methods", "holm", "--mean-ks", "7.5"], ["--methods", "holm", "--mean-ks", "", "--alphas", "0.5"]),
    (["--methods", "bonferroni", "--min-ks", "0", "--layer-targets", "per-layer", "--mean-ks", "0.9",
      "--no-k-matching"], ["--methods", "bonferroni", "--min-ks", "0", "--mean-ks", "", "--alphas", "0.5",
                           "--no-k-matching"]),
]


@pytest.mark.parametrize("bad,good", WEDGED, ids=[" ".join(b) for b, _ in WEDGED])
@pytest.mark.fault("command line", "recovered")
def test_a_target_out_of_reach_does_not_wedge_the_folder(bad, good, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["demo", "--out", str(out), *DEMO, *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "--mean-ks" in err and "out of reach" in err
    assert "min_k" not in err and "target_mean_k" not in err, err  # the flags, not the Python names
    if "--min-ks" not in bad:  # reach 1.0-1.4 with floor 1: no target a sweep takes (>= 1.5), so the advice is --alphas
        assert "give --alphas instead" in err and "pick a target in that range" not in err, err
    captured = (out / "captured_logits.safetensors").read_bytes()  # written before the target was found out of reach
    assert _run(["demo", "--out", str(out), *DEMO, *good]) == 0, capsys.readouterr().err
    assert "resumed" in capsys.readouterr().out
    assert (out / "captured_logits.safetensors").read_bytes() == captured, "the capture was reused, not redone"
    recorded = json.loads((out / "run.json").read_text(encoding="utf-8"))["settings"]
    targets = good[good.index("--mean-ks") + 1]
    assert recorded["methods"] == [good[1]] and recorded["mean_ks"] == [float(x) for x in targets.split(",") if x]


def test_a_kept_output_still_refuses_the_settings_it_was_made_with(tmp_path):
    """The other side: what the capture, the banks, the static allocation or the sweep depend on is still
    compared once they exist (no model: the folder check alone, on hand-made folders)."""
    from bh_helpers.app.pipeline import DemoSettings, _check_folder
    from bh_helpers.experiments.run_folder import record_settings

    base = DemoSettings(methods=("bonferroni",), mean_ks=(7.5,))
    record_settings(tmp_path, base.to_dict())
    assert _check_folder(tmp_path, DemoSettings(mean_ks=(3.0,), calibration_tokens=99)) is False  # nothing kept yet
    (tmp_path / "captured_logits.safetensors").write_bytes(b"x")
    assert _check_folder(tmp_path, DemoSettings(methods=("bh",), mean_ks=(2.0,), kernel="epanechnikov")) is True
    for change, needle in (({"calibration_tokens": 4096}, "`calibration_tokens`: 16384 there, 4096 now"),
                           ({"window": 128, "stride": 128}, "`window`: 256 there, 128 now (used by captured_logits.safetensors)")):
        with pytest.raises(ValueError, match="different settings") as err:
            _check_folder(tmp_path, DemoSettings(**change))
        assert needle in str(err.value)
    (tmp_path / "nulls").mkdir()
    with pytest.raises(ValueError, match="`kernel`: 'gaussian' there, 'epanechnikov' now .used by nulls"):
        _check_folder(tmp_path, DemoSettings(kernel="epanechnikov"))
    (tmp_path / "sweep.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"`mean_ks`: \[7.5\] there, \[2.0\] now .used by sweep.jsonl"):
        _check_folder(tmp_path, DemoSettings(methods=("bonferroni",), mean_ks=(2.0,)))
    with pytest.raises(ValueError, match="split: on there, off now"):
        _check_folder(tmp_path, DemoSettings(methods=("bonferroni",), mean_ks=(7.5,), split=False))
    assert _check_folder(tmp_path, base) is True


# ----------------------------------------------------------------------------------------------
# Files of the wrong shape, results with nothing to rank, and Python names in command-line errors
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, embedded_outputs):
    """A capture and a bank of the embedded model, a results file (tests/conftest.py), and edited copies of each."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("files")  # the edited copies
    cap, bank, results = embedded_outputs["cap"], embedded_outputs["bank"], embedded_outputs["results"]
    with safe_open(str(cap), framework="pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    def nan_row(v):
        v = v.clone()
        v[0, 3] = float("nan")
        return v

    edits = {"int": lambda k, v: v.round().to(torch.int64) if k.startswith("layer.") else v,  # edited to integers
             "nan": lambda k, v: nan_row(v) if k == "layer.2" else v,  # one token's logits NaN in layer 2
             "mixed": lambda k, v: v[:, :32] if k == "layer.2" else v,  # one layer of 32 experts
             "e32": lambda k, v: v[:, :32] if k.startswith("layer.") else v,  # a model of 32 experts
             "e1": lambda k, v: v[:, :1] if k.startswith("layer.") else v,
             "3d": lambda k, v: v[:, :, None] if k == "layer.3" else v}
    out = {"root": root, "cap": cap, "bank": bank, "results": results}
    for name, edit in edits.items():
        out[name] = root / f"{name}.safetensors"
        save_file({k: edit(k, v).contiguous() for k, v in tensors.items()}, str(out[name]), metadata=header)
    from bh_helpers.capture import CAPTURE_DIGEST, CapturedLogits

    captured, _ = CapturedLogits.load(cap)  # a capture of a 32-expert model: saved as capture writes one
    kept = {k: v for k, v in header.items() if k not in ("format", "total_tokens", CAPTURE_DIGEST)}
    CapturedLogits({layer: x[:, :32] for layer, x in captured.logits.items()}, captured.token_ids, captured.positions,
                   captured.sequence_index, captured.total_tokens).save(out["e32"], metadata=kept)
    out["bank32"] = root / "bank32"
    assert cli.main(["fit", "--captured", str(out["e32"]), "--out", str(out["bank32"]), "--grid-size", "256"]) == 0
    lines = results.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    for row in rows:  # every run overflowed
        row["metrics"].update(perplexity="inf", nll="nan")
    out["overflowed"] = root / "overflowed.jsonl"
    # sealed: rows a run could have written (an overflow), or written by an older version without checksums
    out["overflowed"].write_text("\n".join([lines[0], *(json.dumps(seal_row(r)) for r in rows)]) + "\n",
                                 encoding="utf-8")
    for name, value in (("negative", -5.0), ("text", "abc"), ("missing", None)):  # one row edited
        rows = [json.loads(line) for line in lines[1:]]
        if value is None:
            del rows[0]["metrics"]["perplexity"]
        else:
            rows[0]["metrics"]["perplexity"] = value
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("\n".join([lines[0], *(json.dumps(seal_row(r)) for r in rows)]) + "\n",
                             encoding="utf-8")
    rows = [json.loads(line) for line in lines[1:]]
    for row in rows:  # the BH row ranks best (a possible perplexity): --save-config then needs its bank
        if row["config"]["method"] == "bh":
            row["metrics"]["perplexity"] = 1.5
    out["bhwins"] = root / "bhwins.jsonl"
    out["bhwins"].write_text("\n".join([lines[0], *(json.dumps(seal_row(r)) for r in rows)]) + "\n",
                             encoding="utf-8")
    out["zscore"] = root / "bank_zscore"  # the same capture, another statistic: another bank
    assert cli.main(["fit", "--captured", str(cap), "--out", str(out["zscore"]), "--grid-size", "256",
                     "--statistic", "zscore"]) == 0
    return out


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bh-routing: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name", ["mixed", "e1", "3d", "int", "nan"])
@pytest.mark.fault("damaged files", "clear error")
def test_fit_names_a_capture_whose_layers_are_not_one_expert_count(name, files, tmp_path, capsys):
    """Layers of different widths, one expert, a 3-D layer or integer logits: the file named with the
    shapes (or type) found, instead of another option's message (`--trim must be ... <= -1`), an API
    name, or (integers) a fit that went ahead."""
    out = tmp_path / "bank"
    assert _run(["fit", "--captured", str(files[name]), "--out", str(out), "--grid-size", "256"]) == 2
    err = _one_line(capsys)
    what = {"int": "router logits of type torch.int64", "nan": "tokens with NaN/inf router logits (layer 2: 1)"}.get(
        name, "router logits of shapes")  # integer or NaN logits: edits a fit went ahead with, or named `logits`
    assert f"{str(files[name])!r} holds {what}" in err and "capture again" in err, err
    rule = {"int": "floating-point logits", "nan": "the demo captures again once the file is removed"}.get(
        name, "one number of experts (2 or more) in every layer")
    assert rule in err and "--trim" not in err, err
    assert not out.exists()


@pytest.mark.fault("mismatched null banks", "clear error")
def test_sweep_and_report_name_a_capture_or_bank_of_another_expert_count(files, tmp_path, capsys):
    sweep = ["sweep", "--results", str(tmp_path / "s.jsonl"), "--mean-ks", "2", "--topk-max", "1", "--top-ps", "",
             "--datasets", "prose", "--max-tokens", "64", "--window", "64", "--stride", "64", "--no-progress"]
    assert _run([*sweep, "--nulls", str(files["bank"]), "--captured", str(files["e32"])]) == 2
    err = _one_line(capsys)
    assert f"{str(files['e32'])!r} holds router logits of 32 experts per layer, but --model 'tiny' has 64" in err
    assert _run([*sweep, "--nulls", str(files["bank32"]), "--captured", str(files["cap"])]) == 2
    err = _one_line(capsys)
    assert "the null bank (--nulls) was fitted for 32 experts per layer, but --model 'tiny' has 64" in err, err
    assert _run(["report", "--results", str(files["results"]), "--out", str(tmp_path / "rep"), "--nulls",
                 str(files["bank"]), "--captured", str(files["e32"]), "--no-categories", "--no-progress"]) == 2
    assert f"{str(files['e32'])!r} holds router logits of 32 experts" in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["optimize", "--budget", "4"],
                                  ["optimize", "--quality-weight", "1", "--speed-weight", "1"],
                                  ["report", "--out", "{tmp}/rep", "--no-categories", "--no-progress"]],
                         ids=["optimize --budget", "optimize --quality-weight", "report"])
@pytest.mark.fault("damaged files", "clear error")
def test_results_whose_every_row_overflowed_are_refused_naming_the_file(argv, files, tmp_path, capsys):
    """Every perplexity inf or nan: optimize printed an empty pick and exited 0; report blamed a missing
    top-k. Now: no row has a finite metric, the file named."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert _run([argv[0], "--results", str(files["overflowed"]), *argv[1:]]) == 2
    err = _one_line(capsys)
    assert f"{str(files['overflowed'])!r}: no " in err and "of data set 'prose' has a finite 'perplexity'" in err
    assert "rerun the sweep" in err and not (tmp_path / "rep").exists()


@pytest.mark.fault("damaged files", "clear error")
def test_optimize_refuses_a_data_set_with_no_finite_row():
    from bh_helpers.experiments.optimize import optimize
    from bh_helpers.experiments.sweep import load_results

    import pandas as pd

    rows = [{"key": f"k{k}", "dataset": d, "label": f"top-{k}", "method": "topk", "k": k,
             "mean_experts_per_token": float(k), "perplexity": 20.0 / k if d == "prose" else math.inf}
            for d in ("prose", "code") for k in (1, 2)]
    df = pd.DataFrame.from_records(rows)
    with pytest.raises(ValueError, match="no row of data set 'code' has a finite 'perplexity'"):
        optimize(df, budget=4)
    picks = optimize(df[df["dataset"] == "prose"], budget=4)
    assert picks["label"].tolist() == ["top-2"]
    assert load_results  # the reader that records attrs["path"] for the message


#: Python names the command line must not show (it shows the flag, or leaves out an API-only remedy).
_API_WORDS = re.compile(r"`[a-z][a-z0-9_]*(=[^`]*)?`|\b\w+=(True|False)\b|\b(results_path|allow_unverified|"
                        r"allow_other_model|trust_remote_code|model_or_config|null_bank|target_mean_k|min_k|max_k|"
                        r"batch_size|overwrite)\b")


def _other_grid(files, tmp_path):
    return files["results"]  # a sweep of another grid than the row's command


def _not_results(files, tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"hello": 1}\n', encoding="utf-8")
    return path


def _custom_code_model(files, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(embedded_model_dir(), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_moe", auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _text_file(files, tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("One paragraph of the user's own text. " * 200, encoding="utf-8")
    return path


_SWEEP = ["--alphas", "0.5", "--mean-ks", "", "--topk-max", "1", "--top-ps", "", "--datasets", "prose",
          "--max-tokens", "64", "--window", "64", "--stride", "64", "--no-progress"]

#: (command line with {made} for what the maker wrote, maker, text the message must hold)
LEAKS = [
    (["sweep", "--nulls", "{bank}", "--results", "{made}", *_SWEEP], _other_grid,
     "pass another --results, or move the old file aside."),
    (["sweep", "--nulls", "{bank}", "--results", "{made}", *_SWEEP], _not_results,
     "pass another --results, or move it aside."),
    (["sweep", "--nulls", "{bank32}", "--results", "{tmp}/s.jsonl", *_SWEEP], None, "the null bank (--nulls)"),
    (["capture", "--model", "{made}", "--out", "{tmp}/c.safetensors", "--calibration-tokens", "256", "--no-progress"],
     _custom_code_model,
     "needs its own Python code"),
    (["demo", "--out", "{tmp}/run", "--datasets", "{made}", "--no-progress"], _text_file, "(--no-split)"),
    (["demo", "--out", "{tmp}/run", *DEMO, "--methods", "bonferroni", "--mean-ks", "7.5", "--no-k-matching"], None,
     "bonferroni with --min-ks 1, --max-ks 8"),
    # the third re-run: a bank folder that is not one (`directory`), and --save-config's bank named as --nulls
    (["sweep", "--nulls", "{tmp}/nope", "--results", "{tmp}/s.jsonl", *_SWEEP], None, "--nulls '"),
    (["optimize", "--results", "{bhwins}", "--budget", "8", "--save-config", "{tmp}/c.json", "--nulls", "{tmp}"], None,
     "--nulls '"),
]


@pytest.mark.parametrize("argv,maker,needle", LEAKS, ids=[f"{a[0]} {n}" for a, _, n in LEAKS])
@pytest.mark.fault("command line", "clear error")
def test_command_line_errors_name_flags_not_python_arguments(argv, maker, needle, files, tmp_path, capsys):
    """Each error path reaches the user as one line in the command's own terms: the flag that fixes it
    (`results_path` -> --results, `split=False` -> --no-split, `min_k` -> --min-ks), never a Python
    argument, and no Python-only remedy (`overwrite=True`, `trust_remote_code=True`) the command lacks."""
    places = {k: str(v) for k, v in files.items()}
    places.update(tmp=str(tmp_path), made=str(maker(files, tmp_path)) if maker else "")
    assert _run([a.format(**places) if "{" in a else a for a in argv]) == 2
    err = _one_line(capsys)
    assert needle in err, err
    shown = err.replace(str(tmp_path), "TMP").replace(str(files["root"]), "ROOT").replace(
        str(files["cap"].parent), "MADE")
    assert not _API_WORDS.search(shown), f"{_API_WORDS.search(shown).group(0)!r} in: {err}"


@pytest.mark.fault("mismatched null banks", "clear error")
def test_demo_resume_with_a_bank_without_checksum_names_the_flag_that_opts_in(tmp_path, capsys):
    """The demo said `allow_unverified` (a Python argument it had no flag for); it now names and has
    --allow-unverified-bank, which resumes with the bank as it is."""
    from bh_helpers.nulls.metadata import BANK_DIGEST

    out = tmp_path / "run"
    bad = ["--methods", "bonferroni", "--mean-ks", "7.5", "--no-k-matching"]
    assert _run(["demo", "--out", str(out), *DEMO, *bad]) == 2  # leaves the capture and the bank
    capsys.readouterr()
    meta_path = out / "nulls" / "gaussian" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != BANK_DIGEST}))  # an older bank
    good = ["demo", "--out", str(out), *DEMO, "--methods", "bh", "--mean-ks", "2", "--no-k-matching"]
    assert _run(good) == 2
    err = _one_line(capsys)
    assert "no checksum" in err and "--allow-unverified-bank" in err and "allow_unverified" not in err, err
    assert _run([*good, "--allow-unverified-bank"]) == 0
    assert "bh-routing: warning: " in capsys.readouterr().err  # the unverified bank, said once on loading


# ----------------------------------------------------------------------------------------------
# Issue 25, third re-run: edited results rows, a bank that is not the sweep's, options past what
# the machine can do (each refused before anything is written)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["negative", "text"])
@pytest.mark.fault("damaged files", "clear error")
def test_a_results_row_with_an_impossible_perplexity_is_set_aside(name, files, tmp_path, capsys):
    """A row edited to perplexity -5 (or "abc") was ranked best by optimize and reported: a perplexity
    is exp of a mean NLL >= 0, so such a row is set aside with the warning that counts them."""
    assert _run(["optimize", "--results", str(files[name]), "--budget", "3"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"bh-routing: warning: .*1 line that does not belong to its grid \(1 with a missing, "
                     r"non-numeric or impossible perplexity", err), err
    assert "-5.000" not in out and "abc" not in out, out


@pytest.mark.fault("damaged files", "clear error")
def test_a_results_row_without_a_perplexity_is_left_out_with_a_warning(files, capsys):
    """A row without a perplexity was dropped from the ranking without a word."""
    assert _run(["optimize", "--results", str(files["missing"]), "--budget", "3"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"bh-routing: warning: .*missing.jsonl'?: 1 of the \d+ rows of data set 'prose' have no "
                     r"finite 'perplexity'", err), err


@pytest.mark.fault("mismatched null banks", "clear error")
def test_save_config_refuses_a_bank_that_is_not_the_sweeps(files, tmp_path, capsys):
    """optimize --save-config wrote a config naming a zscore bank for a row the sweep measured with the
    raw one (routing with it gave mean k 1.6 instead of 2.0): refused, naming --nulls and the difference."""
    cfg = tmp_path / "cfg.json"
    argv = ["optimize", "--results", str(files["bhwins"]), "--budget", "8", "--save-config", str(cfg)]
    assert _run([*argv, "--nulls", str(files["zscore"])]) == 2
    err = _one_line(capsys)
    assert "--nulls" in err and "not the bank the sweep used" in err and "statistic" in err, err
    assert not cfg.exists()
    assert _run([*argv, "--nulls", str(files["bank"])]) == 0 and cfg.is_file()
    assert "routing config of 'bh a=0.5" in capsys.readouterr().out  # the BH row, with its own bank


@pytest.mark.parametrize("argv,flag", [(["--grid-size", "100000000000"], "--grid-size"),
                                       (["--seed", str(2**70)], "--seed"),
                                       (["--threads", "100000"], "--threads")])
@pytest.mark.fault("bad arguments", "clear error")
def test_options_past_what_the_machine_can_do_are_refused_before_writing(argv, flag, tmp_path, capsys):
    """--grid-size 1e11 failed allocating 745 GiB after the capture was written (and wedged the folder),
    --seed 2**70 overflowed after the sweep was written, --threads 100000 crashed torch: all refused first."""
    out = tmp_path / "run"
    rc = _run(["demo", "--out", str(out), *DEMO, "--alphas", "0.5", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and flag in err.splitlines()[-1] and "Traceback" not in err, err  # argparse: usage, then the error
    assert not out.exists() or _files(out) == [], _files(out)


@pytest.mark.parametrize("content,expected", [
    (b"", "holds no sweep results"),  # an empty table read as "no configuration fits the budget"
    (b"\xa9\xff\x00binary\n\x01\x02\n", "is not a sweep results file"),  # a raw UnicodeDecodeError
    (b'{"type": "header"}\n\xa9\xff\n', ":2 is a complete but corrupt line (not UTF-8 text)"),
])
@pytest.mark.parametrize("command", ["optimize", "report"])
@pytest.mark.fault("damaged files", "clear error")
def test_an_empty_or_binary_results_file_is_named_as_such(command, content, expected, tmp_path, capsys):
    """optimize on an empty file said "lacks column 'perplexity'; pass bh_helpers...load_results output",
    and a binary one printed the codec's error without naming the file."""
    results = tmp_path / "r.jsonl"
    results.write_bytes(content)
    extra = ["--budget", "3"] if command == "optimize" else ["--out", str(tmp_path / "rep")]
    assert _run([command, "--results", str(results), *extra]) == 2
    err = _one_line(capsys)
    assert expected in err and "r.jsonl" in err and "bh_helpers" not in err, err
    assert results.read_bytes() == content and not (tmp_path / "rep").exists()


@pytest.mark.fault("mismatched null banks", "clear error")
def test_a_folder_of_banks_given_as_a_bank_names_the_banks_inside(tmp_path, capsys):
    """`sweep --nulls run/nulls` (a demo's folder of one bank per kernel) said the folder must contain
    metadata.json and nulls.npz, without saying that the banks are one level down."""
    from bh_helpers.nulls.bank import NullBank

    bank = NullBank.load(Path(__file__).parents[1] / "bh_helpers" / "data" / "kde_models" / "tiny-olmoe")
    for kernel in ("tophat", "gaussian"):
        bank.save(tmp_path / "nulls" / kernel)
    results = tmp_path / "s.jsonl"
    assert _run(["sweep", "--nulls", str(tmp_path / "nulls"), "--results", str(results), "--alphas", "0.5",
                 "--mean-ks", "", "--datasets", "prose", "--no-progress"]) == 2
    err = _one_line(capsys)
    assert "--nulls" in err and "holds the banks gaussian, tophat" in err, err
    assert str(tmp_path / "nulls" / "gaussian") in err and not results.exists()


@pytest.mark.fault("mismatched null banks", "clear error")
def test_a_bank_without_a_layer_is_refused_before_the_sweep_writes(files, tmp_path, capsys):
    """A bank without layer 3 was refused only at the first BH row, after the native and top-k rows were
    written: the corrected --nulls was then refused ("different grid"). Now nothing is written."""
    from dataclasses import replace

    from bh_helpers.nulls.bank import NullBank

    bank = NullBank.load(files["bank"])
    kept = [layer for layer in bank if layer != 3]
    meta = replace(bank.metadata, layers=kept, n_samples={k: v for k, v in bank.metadata.n_samples.items() if k != 3})
    NullBank({layer: bank[layer] for layer in kept}, meta).save(tmp_path / "no3")
    results = tmp_path / "s.jsonl"
    argv = ["sweep", "--results", str(results), "--methods", "bh", "--alphas", "0.5", "--mean-ks", "", "--topk-max",
            "1", "--top-ps", "", "--datasets", "prose", "--max-tokens", "64", "--window", "64", "--stride", "64",
            "--no-progress", "--no-controls"]
    assert _run([*argv, "--nulls", str(tmp_path / "no3")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "no null for MoE layers [3]" in err and "`layers" not in err and "bh-routing fit" in err, err
    assert not results.exists()
    assert _run([*argv, "--nulls", str(files["bank"])]) == 0  # the corrected command runs


@pytest.mark.parametrize("method,value,sealed", [
    *[(m, v, sealed) for m, v in (("bh", -1.0), ("bh", 99.0), ("topk", 0.5), ("native", 0.0)) for sealed in (0, 1)],
    ("native", 2.5, 0),  # plausible: only the checksum can tell (with a valid one it is a result, not damage)
])
@pytest.mark.fault("damaged files", "clear error")
def test_a_results_row_with_a_mean_k_its_configuration_cannot_give_is_set_aside(method, value, sealed, files,
                                                                                 tmp_path, capsys):
    """A row edited to mean k -1 or 0 was ranked first by optimize (the cheapest), and 99 changed a weighted pick;
    report showed them without a word; a native row edited to a plausible 2.5 could not be told at all. An edit
    is now caught by the row's checksum; a row with a valid checksum (an older file's, or a faulty writer's) whose
    mean k its configuration cannot give is still set aside. Both with the warning that counts them."""
    lines = files["results"].read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    edited = next(r for r in rows if r["config"]["method"] == method)
    edited["metrics"]["mean_experts_per_token"] = value
    rows = [seal_row(r) for r in rows] if sealed else rows
    path = tmp_path / "edited.jsonl"
    path.write_text("\n".join([lines[0], *(json.dumps(r) for r in rows)]) + "\n", encoding="utf-8")
    assert _run(["optimize", "--results", str(path), "--budget", "8"]) == 0
    out, err = capsys.readouterr()
    why = "1 with a mean k its configuration cannot give" if sealed else \
        "1 edited after the sweep wrote them (their checksum differs or is missing)"
    assert why in err and f"| {value:.3f} |" not in out, (out, err)
    if not sealed:  # deleting the checksum does not pass either
        del rows[rows.index(edited)]["row_sha256"]
        path.write_text("\n".join([lines[0], *(json.dumps(r) for r in rows)]) + "\n", encoding="utf-8")
        assert _run(["optimize", "--results", str(path), "--budget", "8"]) == 0
        assert why in capsys.readouterr().err


@pytest.mark.fault("command line", "clear error")
def test_save_config_writes_the_weights_the_sweep_measured(files, tmp_path, capsys):
    """A sweep run with --weights renorm, then optimize --save-config, wrote "weights": "softmax" (the help said
    the default was the sweep's). The default is now the sweep's own, and another weighting is refused."""
    from bh_helpers.engines.config import RoutingConfig

    results = tmp_path / "renorm.jsonl"
    assert _run(["sweep", "--results", str(results), "--nulls", str(files["bank"]), "--methods", "bh", "--alphas",
                 "0.5", "--mean-ks", "", "--topk-max", "1", "--top-ps", "", "--datasets", "prose", "--max-tokens",
                 "64", "--window", "64", "--stride", "64", "--no-progress", "--no-controls", "--weights", "renorm"]) == 0
    argv = ["optimize", "--results", str(results), "--budget", "3", "--nulls", str(files["bank"])]
    assert _run([*argv, "--save-config", str(tmp_path / "a.json"), "--weights", "softmax"]) == 2
    err = _one_line(capsys)
    assert "--weights 'softmax' is not the weighting the sweep measured ('renorm')" in err, err
    assert not (tmp_path / "a.json").exists()
    assert _run([*argv, "--save-config", str(tmp_path / "b.json")]) == 0
    assert RoutingConfig.load(tmp_path / "b.json").weights == "renorm"


@pytest.mark.fault("mismatched null banks", "clear error")
def test_report_refuses_a_bank_that_is_not_the_sweeps(files, tmp_path, capsys):
    """report --nulls with a bank the sweep never used (another statistic) wrote its tables with it, without
    a word (optimize --save-config already refused it). Refused before anything is written; the sweep's runs."""
    argv = ["report", "--results", str(files["results"]), "--no-categories", "--no-progress"]
    assert _run([*argv, "--out", str(tmp_path / "a"), "--nulls", str(files["zscore"])]) == 2
    err = _one_line(capsys)
    assert "--nulls" in err and "is not the bank the sweep of these results used" in err, err
    assert not (tmp_path / "a").exists()
    assert _run([*argv, "--out", str(tmp_path / "b"), "--nulls", str(files["bank"])]) == 0


@pytest.mark.parametrize("edit", ["swap layers", "one huge logit", "drop fingerprint", "drop checksum"])
@pytest.mark.fault("damaged files", "clear error")
def test_an_edited_capture_is_refused_by_its_checksum(edit, files, tmp_path, capsys):
    """Layers 0 and 5 swapped in a capture, one logit edited to 3e38, or the router fingerprint deleted from its
    header were fitted and swept without a word (mean k 3.01 for 2.53; a bandwidth of 2e35; a bank that routes
    any model). A capture's checksum covers every tensor and header field; fit refuses before writing."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bh_helpers.capture import CAPTURE_DIGEST

    with safe_open(str(files["cap"]), framework="pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    if edit == "swap layers":
        tensors["layer.0"], tensors["layer.5"] = tensors["layer.5"], tensors["layer.0"]
    elif edit == "one huge logit":
        tensors["layer.1"] = tensors["layer.1"].clone()
        tensors["layer.1"][3, 7] = 3e38
    elif edit == "drop fingerprint":
        header.pop("router_fingerprint")
    else:
        header.pop(CAPTURE_DIGEST)
    edited = tmp_path / "edited.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(edited), metadata=header)
    assert _run(["fit", "--captured", str(edited), "--out", str(tmp_path / "bank"), "--grid-size", "256"]) == 2
    err = _one_line(capsys)
    expected = {"drop checksum": "has no checksum",  # a 3e38 logit is named before the checksum is computed
                "one huge logit": "holds router logits beyond +-65504 (layer 1: 1)"}.get(edit, "does not match its checksum")
    assert expected in err and "capture again" in err and "edited.safetensors" in err, err
    assert not (tmp_path / "bank").exists()


@pytest.mark.parametrize("command", ["sweep", "report"])
@pytest.mark.fault("mismatched null banks", "clear error")
def test_a_capture_of_another_model_is_refused_before_writing(command, files, tmp_path, capsys):
    """`sweep --captured` of a model with other router weights solved alpha on them: mean k 1.0 for a target
    of 2.0, without a word. The capture's router fingerprint is compared with --model's before writing."""
    from bh_helpers.capture import CAPTURE_DIGEST, CapturedLogits

    captured, header = CapturedLogits.load(files["cap"])
    other = {k: [2 * x + 1 for x in v] for k, v in json.loads(header["router_fingerprint"]).items()}
    kept = {k: v for k, v in header.items() if k not in ("format", "total_tokens", CAPTURE_DIGEST)}
    captured.save(tmp_path / "other.safetensors", metadata={**kept, "router_fingerprint": other})
    out = tmp_path / ("s.jsonl" if command == "sweep" else "rep")
    argv = (["sweep", "--results", str(out), "--methods", "bh", "--mean-ks", "2", "--topk-max", "1", "--top-ps", "",
             "--datasets", "prose", "--max-tokens", "64", "--window", "64", "--stride", "64", "--no-controls"]
            if command == "sweep" else ["report", "--results", str(files["results"]), "--out", str(out),
                                        "--no-categories"])
    assert _run([*argv, "--nulls", str(files["bank"]), "--captured", str(tmp_path / "other.safetensors"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expected = ("--captured comes from another model than the bank" if command == "sweep"  # met the bank first
                else "other.safetensors' holds router logits of another model")
    assert expected in err and "capture" in err, err
    assert not out.exists()


_TINY_BANK = Path(__file__).parents[1] / "bh_helpers" / "data" / "kde_models" / "tiny-olmoe"


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("fields, named", [
    ({"selector": "topk", "k": 4, "max_k": 2}, "`max_k`=2 contradicts `k`=4"),  # routed 4 experts
    ({"selector": "topk", "k": 4, "min_k": 6}, "`min_k`=6 contradicts `k`=4"),
    ({"selector": "topk", "k": 4, "alpha": 0.5}, "`alpha` is only used by the testing selectors"),
    ({"selector": "top_p", "p": 0.9, "alpha": [0.5] * 6}, "`alpha` is only used by the testing selectors"),
    ({"selector": "static", "ks": [3, 2, 2, 2, 2, 1], "max_k": 8}, "`max_k`=8 contradicts `ks`"),
    ({"selector": "static", "ks": [3, 2, 2, 2, 2, 1], "min_k": 2}, "`min_k`=2 contradicts `ks`"),
    ({"selector": "topk", "k": 4, "weights": "softmax", "bank": str(_TINY_BANK)}, "remove `bank`"),
    ({"selector": "top_p", "p": 0.9, "allow_other_model": True}, "remove `allow_other_model`"),
    ({"selector": "static", "ks": [2] * 6, "allow_unverified_bank": True}, "remove `allow_unverified_bank`"),
])
def test_routing_config_refuses_a_field_its_selector_ignores_or_contradicts(tmp_path, fields, named):
    """A routing config whose field is not read by its selector, or contradicts it, was accepted:
    {"selector": "topk", "k": 4, "max_k": 2} quietly routed 4 experts, an `alpha` of a top-k rule or
    a `bank` of a softmax-weighted one was ignored. Refused when the file is read, naming the field."""
    from bh_helpers.engines.config import RoutingConfig

    path = tmp_path / "routing.json"
    path.write_text(json.dumps({"format": "bh_helpers.RoutingConfig", "version": 1, **fields}), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(named)) as err:
        RoutingConfig.load(path)
    assert "remove" in str(err.value) and str(path) in str(err.value), err.value


def test_routing_config_round_trips_the_bounds_it_writes(tmp_path):
    """The consistency checks accept what to_json writes (a top-k file has min_k = max_k = k)."""
    from bh_helpers.engines.config import RoutingConfig

    for config in (RoutingConfig(selector="topk", k=4), RoutingConfig(selector="static", ks=[3, 2, 2, 2, 2, 1]),
                   RoutingConfig(selector="top_p", p=0.9, min_k=2, max_k=4),
                   RoutingConfig(selector="bh", alpha=[0.5] * 6, bank=str(_TINY_BANK))):
        assert RoutingConfig.from_json(config.to_json()) == config
    assert RoutingConfig(selector="topk", k=4, min_k=4, max_k=4).max_k == 4
    assert (RoutingConfig(selector="static", ks=[3, 2, 1]).min_k, RoutingConfig(selector="static", ks=[3, 2, 1]).max_k) \
        == (1, 3)


@pytest.mark.fault("bad arguments", "clear error")
@pytest.mark.parametrize("fields, name, named", [
    ({"selector": "bh", "bank": str(_TINY_BANK)}, "alpha", "`alpha` has a level for layers [6]"),
    ({"selector": "static"}, "ks", "`ks` has a k for layers [6]"),
])
def test_a_per_layer_routing_config_of_another_model_is_refused_when_routed(tiny_model_and_tokenizer, tmp_path,
                                                                            fields, name, named):
    """An `alpha` list or `ks` of 7 entries on the 6-layer tiny model routed without a word (the 7th
    ignored; the CLI refuses 7 --layer-alphas). Refused by route() before anything is installed;
    the same config with 6 entries routes."""
    from bh_helpers.engines.config import RoutingConfig
    from bh_helpers.routing.patch import route

    model, _ = tiny_model_and_tokenizer
    path = tmp_path / "routing.json"
    path.write_text(json.dumps({**fields, name: [0.5 if name == "alpha" else 2] * 7}), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(named)) as err:
        with route(model, RoutingConfig.load(path).to_selector()):
            pass
    assert "0..5" in str(err.value), err.value
    with route(model, RoutingConfig(**fields, **{name: [0.5 if name == "alpha" else 2] * 6}).to_selector()):
        pass


@pytest.mark.fault("controls: realised compute", "clear error")
def test_mixed_control_with_a_mean_k_for_a_layer_the_model_lacks_is_refused(tiny_model_and_tokenizer):
    """The mixed top-k control's per-layer mean k, like `alpha` and `ks`: an entry for a layer the
    routed model lacks is another model's setting (it was ignored)."""
    from bh_helpers.routing.patch import route
    from bh_helpers.selection.controls import MixedTopKSelector

    model, _ = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match=re.escape("`mean_k` has a mean k for layers [6]")):
        with route(model, MixedTopKSelector({layer: 2.0 for layer in range(7)})):
            pass


def _report(results: Path, out: Path) -> list[str]:
    return ["report", "--results", str(results), "--out", str(out), "--no-categories", "--no-progress"]


@pytest.mark.fault("command line", "clear error")
@pytest.mark.parametrize("name, text", [("summary.json", '{"mine": 1}\n'), ("report.md", "MY NOTES\n")])
def test_report_never_replaces_a_file_it_did_not_write(embedded_outputs, tmp_path, capsys, name, text):
    """`report --out FOLDER` replaced the user's own summary.json (or report.md) there without a word
    (the help says only the report's files are replaced). Refused before anything is written,
    naming --out and the fix; the user's file is unchanged."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text(text, encoding="utf-8")
    assert _run(_report(embedded_outputs["results"], out)) == 2
    err = _one_line(capsys)
    assert "--out" in err and name in err and "did not write" in err and "move it aside" in err, err
    assert (out / name).read_text(encoding="utf-8") == text and _files(out) == [name], _files(out)


@pytest.mark.fault("command line", "clear error")
def test_report_never_replaces_a_png_it_did_not_write(embedded_outputs, tmp_path, capsys):
    """The same for a figure: a PNG of the user's under a figure's file name is kept, and the report
    refuses before writing report.md or summary.json. Its own PNGs, also those saved before they
    carried the report's mark (linked from its report.md), are replaced on a rerun."""
    import matplotlib.pyplot as plt

    ours = tmp_path / "ours"
    assert _run(_report(embedded_outputs["results"], ours)) == 0
    pngs = sorted(p.name for p in ours.glob("*.png"))
    assert pngs and all(b"bh-routing report" in (ours / p).read_bytes()[:65536] for p in pngs), pngs
    fig = plt.figure()
    for folder in (ours, tmp_path / "mine"):  # a report's folder of an older bh-routing (unmarked PNG), a user's
        folder.mkdir(exist_ok=True)
        fig.savefig(folder / pngs[0])
    plt.close(fig)
    user_png = (tmp_path / "mine" / pngs[0]).read_bytes()
    assert _run(_report(embedded_outputs["results"], tmp_path / "mine")) == 2
    err = _one_line(capsys)
    assert "--out" in err and pngs[0] in err, err
    kept = [n for n in _files(tmp_path / "mine") if not n.startswith(".lock")]  # the folder's lock stays
    assert (tmp_path / "mine" / pngs[0]).read_bytes() == user_png and kept == [pngs[0]], kept
    assert _run(_report(embedded_outputs["results"], ours)) == 0  # its own files: replaced
    assert b"bh-routing report" in (ours / pngs[0]).read_bytes()[:65536]


@pytest.mark.fault("damaged files", "clear error")
def test_write_summary_never_replaces_a_summary_it_did_not_write(embedded_outputs, tmp_path):
    """The API form: write_summary into a folder holding the user's summary.json."""
    from bh_helpers.experiments.sweep import load_results
    from bh_helpers.report.assemble import write_summary

    (tmp_path / "summary.json").write_text('{"mine": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"`out_dir` .* holds summary\.json, which a bh-routing report did not"):
        write_summary(tmp_path, results=load_results(embedded_outputs["results"]))
    assert (tmp_path / "summary.json").read_text(encoding="utf-8") == '{"mine": 1}\n'
