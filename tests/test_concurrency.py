"""One writer per output: a second process on the same results file or demo folder is refused at
once with a message naming the target and the other process, and writes nothing; a killed holder
never wedges the next run (the OS drops its lock). Before the lock, two sweeps into one new file
both exited 0 with 18 duplicated rows, and two demos on one fresh folder left it refusing every rerun.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bh_helpers.experiments.sweep import expand_grid, load_results, run_sweep

pytest.importorskip("pandas")

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bh_helpers._locks import exclusive
    lock, release = Path(sys.argv[1]), Path(sys.argv[2])
    with exclusive(lock, what="held", flag="--out"):
        print("HOLDING", flush=True)
        while not release.exists():
            time.sleep(0.05)
    """
)


def _hold(lock: Path, release: Path) -> subprocess.Popen:
    """Another process that holds ``lock`` until ``release`` exists."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(release)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HOLDING"
    return proc


def _evaluate(config, name):
    return {"perplexity": 10.0 + config.alpha, "dataset_name": name}


@pytest.mark.fault("concurrency", "clear error")
def test_second_sweep_on_one_results_file_is_refused_then_runs(tmp_path):
    results = tmp_path / "sweep.jsonl"
    configs = expand_grid(methods=["bh"], alphas=[0.1, 0.2], max_ks=[8], topk=False, native=False)
    release = tmp_path / "release"
    holder = _hold(tmp_path / ".sweep.jsonl.lock", release)
    try:
        with pytest.raises(ValueError, match=rf"results file '{results}' is being written by another bh-routing "
                                             rf"process \(pid {holder.pid}\)"):
            run_sweep(configs, ["a", "b"], _evaluate, results, progress=False)
        assert not results.exists(), "the refused process wrote nothing"
    finally:
        release.touch()
        holder.wait(timeout=30)
    df = run_sweep(configs, ["a", "b"], _evaluate, results, progress=False)
    assert len(df) == 4 and not df.duplicated(["key", "dataset"]).any()


@pytest.mark.fault("concurrency", "recovered")
def test_a_killed_holder_does_not_wedge_the_next_run(tmp_path):
    results = tmp_path / "sweep.jsonl"
    configs = expand_grid(methods=["bh"], alphas=[0.1], max_ks=[8], topk=False, native=False)
    holder = _hold(tmp_path / ".sweep.jsonl.lock", tmp_path / "never")
    holder.kill()
    holder.wait(timeout=30)
    assert len(run_sweep(configs, ["a"], _evaluate, results, progress=False)) == 1


@pytest.mark.fault("concurrency", "clear error")
def test_second_demo_on_one_folder_is_refused_and_writes_nothing(tmp_path, capsys):
    from bh_helpers.app import cli

    out = tmp_path / "run"
    out.mkdir()
    release = tmp_path / "release"
    holder = _hold(out / ".lock", release)
    try:
        argv = ["demo", "--out", str(out), "--calibration-tokens", "256", "--grid-size", "256", "--methods", "bh",
                "--alphas", "0.5", "--topk-max", "1", "--top-ps", "", "--datasets", "prose", "--max-tokens", "64",
                "--window", "8", "--stride", "8", "--no-categories", "--no-progress"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"bh-routing: error: output folder '{out}' is being written by another bh-routing process "
                       f"(pid {holder.pid}); wait for it to finish, or pass another --out folder.")
        assert sorted(p.name for p in out.iterdir()) == [".lock", ".lock.pid"], "nothing else was written"
    finally:
        release.touch()
        holder.wait(timeout=30)


@pytest.mark.fault("concurrency", "recovered")
def test_repeated_rows_are_read_once(tmp_path):
    results = tmp_path / "sweep.jsonl"
    configs = expand_grid(methods=["bh"], alphas=[0.1], max_ks=[8], topk=False, native=False)
    run_sweep(configs, ["a"], _evaluate, results, progress=False)
    lines = results.read_text().splitlines()
    row = next(line for line in lines if json.loads(line).get("type") == "row")
    results.write_text("\n".join([*lines, row]) + "\n")  # a row written twice, as two racing writers did
    with pytest.warns(UserWarning, match="1 repeated"):
        df = load_results(results)
    assert len(df) == 1


# ----------------------------------------------------------------------------------------------
# Every command that writes takes the same lock (issue 25, class 4): two `fit` or two `capture`
# into one output both exited 0 with one result overwritten.
# ----------------------------------------------------------------------------------------------

ENV = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bh_helpers.app.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("command", ["fit", "capture"])
@pytest.mark.fault("concurrency", "clear error")
def test_two_writers_at_once_one_wins_and_the_other_is_refused(command, embedded_outputs, tmp_path):
    out = tmp_path / ("bank" if command == "fit" else "c.safetensors")
    cap = embedded_outputs["cap"]
    argv = (["fit", "--captured", str(cap), "--out", str(out), "--grid-size", "256"] if command == "fit" else
            ["capture", "--out", str(out), "--calibration-tokens", "128", "--window", "64", "--no-progress"])
    procs = [_cli(*argv), _cli(*argv)]  # two real processes, started together
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [rc for rc, _ in outcomes] == [0, 2], outcomes
    err = outcomes[1][1].strip().splitlines()[-1]
    assert "is being written by another bh-routing process" in err or "pass a new name" in err, err
    assert "Traceback" not in outcomes[1][1] and "--out" in err
    if command == "fit":
        from bh_helpers.nulls.bank import NullBank

        assert len(NullBank.load(out)) == 6
    else:
        from bh_helpers.capture import CapturedLogits

        assert CapturedLogits.load(out)[0].num_tokens == 128
    # the lock files stay (see bh_helpers._locks.lock_path) but hidden: the folder shows the outputs only
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [out.name]


WRITERS = {  # command line, and the lock file it takes
    "fit": (lambda m, t: ["fit", "--captured", str(m["cap"]), "--out", str(t / "out"), "--grid-size", "256"],
            lambda t: t / "out" / ".lock"),
    "capture": (lambda m, t: ["capture", "--out", str(t / "out"), "--calibration-tokens", "64", "--window", "64",
                              "--no-progress"], lambda t: t / ".out.lock"),
    "report": (lambda m, t: ["report", "--results", str(m["results"]), "--out", str(t / "out"), "--no-categories",
                             "--no-progress"], lambda t: t / "out" / ".lock"),
    "optimize --save-config": (lambda m, t: ["optimize", "--results", str(m["results"]), "--budget", "2",
                                             "--save-config", str(t / "out")], lambda t: t / ".out.lock"),
}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.fault("concurrency", "clear error")
def test_every_writer_takes_the_lock_and_writes_nothing_while_it_is_held(writer, embedded_outputs, tmp_path, capsys):
    from bh_helpers.app import cli

    argv, lock = WRITERS[writer][0](embedded_outputs, tmp_path), WRITERS[writer][1](tmp_path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    release = tmp_path / "release"
    holder = _hold(lock, release)
    try:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"is being written by another bh-routing process (pid {holder.pid})" in err
        assert "--out" in err or "--save-config" in err, err
        assert not (tmp_path / "out").exists() or {p.name for p in (tmp_path / "out").iterdir()} <= {".lock", ".lock.pid"}
    finally:
        release.touch()
        holder.wait(timeout=30)
    assert cli.main(argv) == 0, capsys.readouterr().err  # the lock released, the same command runs
    if writer != "report":  # a report replaces its folder's report; the others never overwrite
        capsys.readouterr()
        assert cli.main(argv) == 2 and "nothing is overwritten" in capsys.readouterr().err
