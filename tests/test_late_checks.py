"""Cases an independent re-run of issue 25 found after the merge: checks that came after writing,
and inputs that were accepted quietly. Each is refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bh_helpers.app import cli
from bh_helpers.models.loading import embedded_model_dir


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
    assert rc == 2 and "--window" in err and "context length" in err, err
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
