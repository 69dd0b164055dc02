"""Shared test setup: Triton kernels run in the interpreter on the CPU; tiny model factories."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers.tiny import tiny_config, tiny_model  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def make_tiny_model():
    """Factory fixture: make_tiny_model("qwen3", num_hidden_layers=3) -> a random eval-mode model."""
    return tiny_model
