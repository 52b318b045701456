"""emde-pipeline: a feature-store pipeline and the trainable EMDE classifier of Basaj et al. (SIGIR eCom'20).

The command line is `pipeline` (cli.py); from Python, `Predictor` classifies new items with a trained
work directory (pipeline/predictor.py).
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emde-pipeline")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    # `from pipeline import Predictor` without importing torch for every `import pipeline.<module>`
    if name == "Predictor":
        from pipeline.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["Predictor", "__version__"]
