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
