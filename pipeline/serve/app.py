"""The HTTP API of `pipeline serve` (FastAPI): every route, the limits, the token, errors as one JSON line.

    POST /v1/predict     JSON items or a multipart form -> per item: code, name, top-k classes with every
                         modality's share, missing inputs; the model version that answered
    GET  /               a page to try one product (title, description, photo)
    GET  /healthz        the process answers;   GET /readyz: models loaded (503 before)
    GET  /metrics        Prometheus;            GET /docs: the OpenAPI page
    POST /admin/reload   check the model files now and swap in new ones

With `EMDE_SERVE_TOKEN` set, /v1/* and /admin/* need `Authorization: Bearer <token>`. Any refusal is a 4xx
whose body is {"error": "<one line naming the item and field>"}; an unexpected failure is a 500 with one line
and no traceback (the traceback goes to the log).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from pipeline.schema import Serve
from pipeline.serve.batching import Batcher
from pipeline.serve.metrics import Metrics
from pipeline.serve.models import Models, one_line
from pipeline.serve.requests import FIELDS, PredictRequest, Refused, parse_form, parse_json

TOKEN_VARIABLE = "EMDE_SERVE_TOKEN"
log = logging.getLogger("pipeline.serve")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """A body over `limit` bytes is refused (413) by its Content-Length, or as soon as more arrives."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            self.metrics.errors.labels("too_large").inc()
            return await error(413, self._message(int(length)))(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise Refused(413, self._message(seen), "too_large")
            return message
        await self.app(scope, limited, send)

    def _message(self, n: int) -> str:
        return f"body: {n} bytes or more, at most {self.limit} ([serve] max_body_bytes)"


class Counted:
    """Every response counted by path and status, the 500 of an unexpected failure included (Starlette's outermost
    middleware sends that one, past this). Plain ASGI: BaseHTTPMiddleware costs a task group and a stream per
    request."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _PATHS else "other"
        started = False

        async def counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)
        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:
                self.metrics.requests.labels(path, "500").inc()
            raise


def create_app(models: Models, opts: Serve, token: str | None, metrics: Metrics | None = None,
               on_ready=None, reload_on_sighup: bool = False) -> FastAPI:
    """The app serving `models` (loaded when it starts); `on_ready(error)` is called once the first models
    are loaded (error None) or failed to load. `reload_on_sighup`: SIGHUP checks the model files at once
    (the main thread's loop only)."""
    metrics = metrics or models.metrics
    batcher = Batcher(models, opts.max_batch_items, opts.max_wait_ms, opts.top_k, metrics, opts.parallel_batches)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(_start(models, opts, on_ready))]
        if reload_on_sighup and threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: tasks.append(asyncio.create_task(models.check(force=True))))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            batcher.close()

    app = FastAPI(title="emde-pipeline", summary="Product type classification (trainable EMDE, Figure 2)",
                  lifespan=lifespan)
    app.state.models, app.state.batcher, app.state.metrics = models, batcher, metrics
    app.add_middleware(BodyLimit, limit=opts.max_body_bytes, metrics=metrics)
    app.add_middleware(Counted, metrics=metrics)  # outside BodyLimit: its refusals are counted too
    _errors(app, metrics)
    _routes(app, models, batcher, opts, token, metrics)
    return app


async def _start(models: Models, opts: Serve, on_ready) -> None:
    try:
        await models.start()
    except Exception as err:  # noqa: BLE001 - nothing to answer with: the server stops, saying why
        if on_ready:
            on_ready(one_line(err))
        return
    if on_ready:
        on_ready(None)
    if opts.watch_seconds > 0:
        await models.watch(opts.watch_seconds)


def _errors(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(Refused)
    async def refused(request: Request, err: Refused):
        metrics.errors.labels(err.kind).inc()
        return error(err.status, err.message)

    @app.exception_handler(HTTPException)
    async def http(request: Request, err: HTTPException):
        metrics.errors.labels(f"http_{err.status_code}").inc()
        return error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        metrics.errors.labels("bad_field").inc()
        e = err.errors()[0]
        return error(422, f"{'.'.join(map(str, e['loc']))}: {e['msg']}")

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):
        metrics.errors.labels("internal").inc()
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return error(500, f"internal error ({one_line(err)}); the server log has the details")


def _authorized(request: Request, token: str | None) -> None:
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Refused(401, f"authorization: a bearer token is required (the server's {TOKEN_VARIABLE})",
                      "unauthorized")


def _body_doc() -> dict:
    schema = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    form = {"type": "object", "required": ["title"], "properties": {
        "item_id": {"type": "string"}, "title": {"type": "string"}, "description": {"type": "string"},
        "image": {"type": "string", "format": "binary"}}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {k: v for k, v in schema.items() if k != "$defs"} | {
            "properties": {"items": {"type": "array", "items": schema["$defs"]["Item"]}}}},
        "multipart/form-data": {"schema": form}}}}


def _routes(app: FastAPI, models: Models, batcher: Batcher, opts: Serve, token: str | None, metrics: Metrics):
    @app.post("/v1/predict", openapi_extra=_body_doc(), summary="Classify items (JSON) or one item (multipart form)")
    async def predict(request: Request):
        started = time.perf_counter()
        _authorized(request, token)
        if models.current is None:
            raise Refused(503, "models: still loading; retry when GET /readyz answers 200", "not_ready")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            async with request.form(max_files=1, max_fields=len(FIELDS), max_part_size=opts.max_body_bytes) as form:
                ids, items = await parse_form(form)
        elif kind in ("application/json", ""):
            ids, items = parse_json(await request.body(), opts.max_request_items)
        else:
            raise Refused(415, f"content-type: {kind} is not taken; send application/json or a form "
                               f"(multipart/form-data with the photo as a file)",
                          "bad_content_type")
        served, answers = await batcher.submit(items)
        metrics.latency.labels("/v1/predict").observe(time.perf_counter() - started)
        share_of = "logit" if served.predictor.heads.method == "joint" else "probability"
        # serialized here: the answers are JSON-ready, FastAPI's encoder would walk them again
        return Response(json.dumps({"model_version": served.version, "share_of": share_of,
                                    "items": [{"item_id": i} | a for i, a in zip(ids, answers)]},
                                   ensure_ascii=False, allow_nan=False, separators=(",", ":")),
                        media_type="application/json")

    @app.get("/healthz", summary="The process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Models loaded")
    async def readyz():
        if models.current is None:
            return error(503, "models: still loading")
        return {"status": "ready", "model_version": models.current.version}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", summary="Check the model files now; swap in new ones")
    async def reload(request: Request):
        _authorized(request, token)
        reason = await models.check(force=True)
        return {"model_version": models.current.version if models.current else None, "error": reason}

    @app.get("/", response_class=HTMLResponse, summary="A page to try one product")
    async def page():
        return resources.files("pipeline.serve").joinpath("page.html").read_text(encoding="utf-8")


_PATHS = {"/v1/predict", "/", "/healthz", "/readyz", "/metrics", "/admin/reload", "/docs", "/openapi.json"}
