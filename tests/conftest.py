"""Shared pytest setup. Keep it small and additive: each test file owns its own fixtures where it can."""

import os

# Tests never reach the real Hub. huggingface_hub reads this once, at import, so it must be set before any
# test module imports transformers / huggingface_hub (conftest is imported first).
os.environ["HF_HUB_OFFLINE"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models spend their time synchronising threads, not computing: one intra-op thread runs a test file
    several times faster, and keeps it fast when other processes share a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_mara():
    """MaraProcessor factory whose processors are detached from their models after the test."""
    from mara_hf import MaraProcessor

    made = []

    def make(agent, model, **kwargs):
        mara = MaraProcessor(agent, model=model, **kwargs)
        made.append(mara)
        return mara

    yield make
    for mara in made:
        mara.remove()
