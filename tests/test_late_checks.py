"""Cases an independent re-run of issue 25 found after the merge: checks that came after writing,
and inputs that were accepted quietly. Each is refused before anything is written."""

from __future__ import annotations

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
