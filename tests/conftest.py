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


# ---------------------------------------------------------------------- helpers shared by the test files
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def quiet(*_a, **_k) -> None:
    """A `log` that drops every line."""


class Log(list):
    """A `log` that keeps every line."""

    def __call__(self, msg: str) -> None:
        self.append(msg)

    def text(self) -> str:
        return "\n".join(self)


def cli(*args, timeout: float | None = None):
    """`pipeline ARGS...` in a subprocess from the project root: a CompletedProcess with text output."""
    import subprocess
    import sys

    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def reader_settings(**over):
    """The [train_reader] table of configs/default.toml with `over` replacing some of its values."""
    from pipeline.config import load_config

    return load_config().train_reader.model_copy(update=over)


def store_layout() -> dict:
    """FeatureStore.create's chunk and compression settings, as [stores] in configs/default.toml has them."""
    from pipeline.config import load_config

    stores = load_config().stores
    return {"chunk_bytes": stores.chunk_bytes, "gzip_level": stores.gzip_level}
