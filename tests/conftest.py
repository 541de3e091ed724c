import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Bitwise comparisons between runs (and with subprocesses) need the same thread count everywhere.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
