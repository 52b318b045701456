"""Errors a user can act on. The CLI prints their message in one line, never a traceback."""


class PipelineError(Exception):
    """An error the user can act on; the CLI prints its message in one line."""


class StaleStoreError(PipelineError):
    """An output built from other inputs, another model or other settings than this run's."""
