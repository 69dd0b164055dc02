"""One torch thread for a test module (import the fixture into the module to use it)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The fp64 loop references are thousands of tiny ops: one thread keeps them fast on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
