"""`pipeline serve --model W|BUNDLE`: the classifier behind HTTP (FastAPI on uvicorn; docs/design.md "Serving").

The process binds its socket first (127.0.0.1 unless told otherwise), says so, answers /healthz at once and
/readyz once the models are loaded. SIGTERM (or Ctrl-C) stops accepting, lets the requests in flight finish
(`[serve] drain_seconds` at most) and exits 0; SIGHUP checks the model files for new ones at once.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import warnings
from pathlib import Path

from pipeline import workdir as wd
from pipeline.errors import PipelineError
from pipeline.predictor import MissingInputWarning
from pipeline.serve.app import TOKEN_VARIABLE, create_app
from pipeline.serve.metrics import Metrics
from pipeline.serve.models import Models

__all__ = ["serve", "bind", "create_app", "Models", "Metrics", "TOKEN_VARIABLE"]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), refused in one line when the address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY on a connection only when its socket says TCP, and
    # without it Nagle holds a response's body behind its headers until the client's delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise PipelineError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port or "
                            f"--host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(source: str | Path, configs: list[Path] | None = None, host: str | None = None, port: int | None = None,
          log=print, sets: list[str] | tuple = ()) -> None:
    """Serve `source` until SIGTERM or Ctrl-C; raises PipelineError when the first models do not load. `configs`
    and `sets` (`--set` arguments) apply to every load, the first and each swap. `pipeline serve` first limits
    glibc's heaps (`malloc.limit_arenas`), which only works before polars is imported: a Python caller who
    wants that calls it before importing this package."""
    import uvicorn

    source = Path(source)
    if not source.is_dir():
        raise PipelineError(f"--model {source}: no such work directory or bundle")
    opts = wd.load(source, configs, sets=sets).serve
    sock = bind(host or opts.host, opts.port if port is None else port)
    address, bound = sock.getsockname()[:2]
    where = f"http://[{address}]:{bound}" if ":" in address else f"http://{address}:{bound}"
    metrics = Metrics()
    models = Models(source, configs, metrics, log, sets)
    failed: list[str] = []

    def on_ready(err: str | None) -> None:
        if err is None:
            log(f"serve: ready on {where} (version {models.current.version})")
            return
        failed.append(err)
        server.should_exit = True

    warnings.filterwarnings("ignore", category=MissingInputWarning)  # each answer names its items' missing inputs
    token = os.environ.get(TOKEN_VARIABLE) or None
    app = create_app(models, opts, token, metrics, on_ready, reload_on_sighup=True)
    server = uvicorn.Server(uvicorn.Config(app, timeout_graceful_shutdown=math.ceil(opts.drain_seconds),
                                           log_level="warning", access_log=False, lifespan="on"))
    log(f"serve: listening on {where}, loading {source}{' (bearer token required)' if token else ''}")
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again for the handlers it found: these
    # no-ops make that a clean exit 0 instead of a death by the signal.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    if failed:
        raise PipelineError(f"--model {source}: {failed[0]}")
    log("serve: stopped")
