"""Shared test settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Run the suite on one intra-op thread.

    The models under test are tiny and gain nothing from threads, and on a busy 2-core machine
    OpenMP threads spin against other processes (a 30-token forward of the tiny model: about
    40 ms with 1 thread, over 1 s with 2 under load). Restored at the end of the session.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer():
    """The embedded tiny OLMoE in float32 on CPU, loaded once (tests must not modify it)."""
    from bh_helpers.models.loading import load_model

    model, tokenizer = load_model("tiny", device="cpu", dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def embedded_outputs(tmp_path_factory):
    """A capture, a null bank and a sweep results file of the embedded model, made once through the
    command line (tests read them, never modify them): ``{"cap", "bank", "results"}``."""
    from bh_helpers.app import cli

    root = tmp_path_factory.mktemp("embedded_outputs")
    cap, bank, results = root / "cap.safetensors", root / "bank", root / "s.jsonl"
    assert cli.main(["capture", "--out", str(cap), "--calibration-tokens", "256", "--window", "64",
                     "--no-progress"]) == 0
    assert cli.main(["fit", "--captured", str(cap), "--out", str(bank), "--grid-size", "256"]) == 0
    assert cli.main(["sweep", "--results", str(results), "--nulls", str(bank), "--methods", "bh", "--alphas", "0.5",
                     "--mean-ks", "", "--topk-max", "2", "--top-ps", "", "--datasets", "prose", "--max-tokens", "64",
                     "--window", "64", "--stride", "64", "--no-progress", "--no-controls"]) == 0
    return {"cap": cap, "bank": bank, "results": results}


# ----------------------------------------------------------------------------------------------
# The fault battery: tests marked @pytest.mark.fault(group, outcome) are bad inputs and faults.
# `pytest -m fault --fault-report FILE` writes one JSON record per test (scripts/reliability.py
# turns them into the README's reliability figure). A test that passes has shown its outcome
# ("clear error": refused with a message naming the option and the fix; "recovered": the work
# completed correctly, nothing lost); one that fails is counted as such, never as a success.
# ----------------------------------------------------------------------------------------------

FAULT_OUTCOMES = ("clear error", "recovered")


def pytest_addoption(parser):
    parser.addoption("--fault-report", default=None, help="write the fault battery's outcomes to this JSON file")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("fault")
        if marker is not None and (len(marker.args) != 2 or marker.args[1] not in FAULT_OUTCOMES):
            raise pytest.UsageError(f"{item.nodeid}: use @pytest.mark.fault(group, outcome), outcome in {FAULT_OUTCOMES}")


_FAULT_RECORDS: dict = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    if marker is None or not item.config.getoption("--fault-report"):
        return
    record = _FAULT_RECORDS.setdefault(item.nodeid, {"group": marker.args[0], "expected": marker.args[1],
                                                      "result": "passed"})
    if report.skipped and record["result"] == "passed":
        record["result"] = "skipped"
    elif report.failed:
        record["result"] = "failed"


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--fault-report")
    if path:
        import json

        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"tests": _FAULT_RECORDS}, fh, indent=1, sort_keys=True)
            fh.write("\n")
