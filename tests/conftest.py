"""Shared fixtures. The embedded models load from the user cache (built once, ~25 s for SmolLM2)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    from ranklens.lm.load import load_model

    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def minilm():
    from ranklens.lm.load import load_model

    return load_model("minilm-l6", dtype="float32")
