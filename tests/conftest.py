"""Shared test setup: no model hub, ever (every miss would wait on retries)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for a test's duration: on tiny tensors a second thread only spins
    (badly so on a busy 2-core machine), and subprocesses run under OMP_NUM_THREADS=1 give the same floats."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
