"""Errors a user can act on. The CLI prints their message in one line, never a traceback."""


class PipelineError(Exception):
    """An error the user can act on; the CLI prints its message in one line."""


class StaleStoreError(PipelineError):
    """An output built from other inputs, another model or other settings than this run's."""


class ModelNotFoundError(PipelineError):
    """A model or weights file is missing (or unreadable) where the configuration points."""


class WeightsMismatchError(PipelineError):
    """A weights file exists but does not fit the model it is loaded into."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (to quote a library's error)."""
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."
