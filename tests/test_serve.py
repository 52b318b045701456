"""`pipeline serve` over one small trained work directory: every endpoint, batching, bad input, the token, a hot
swap under load, SIGTERM draining."""
from __future__ import annotations

import base64
import errno
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pipeline import Predictor
from pipeline.catalog import load_catalog
from pipeline.fuse import fuse
from tests.conftest import ROOT, Log, process, quiet, serving

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow  # the session's trained work directory, servers that load its models
MODALITIES = {"title_cam", "desc_cam", "title_bpe", "image", "bias"}


@pytest.fixture(scope="module")
def photo(trained_workdir) -> bytes:
    return next(iter(sorted((trained_workdir / "catalog" / "image_train").glob("*.jpg")))).read_bytes()


def item(photo: bytes | None = None, **fields) -> dict:
    return {"item_id": 1, "title": "Piscine tubulaire 3 m", "description": "avec pompe",
            "image": base64.b64encode(photo).decode() if photo else None} | fields


@pytest.fixture(scope="module")
def server(trained_workdir):
    with serving(trained_workdir, max_body_bytes=200_000, max_request_items=16) as (url, app):
        yield url, app


def test_predict_answers_each_item_with_its_classes_and_every_modalitys_share(server, photo):
    url, app = server
    answer = httpx.post(f"{url}/v1/predict", json={"items": [item(photo), item(None, item_id="sku-2")]}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    version = app.state.models.current.version
    assert body["model_version"] == version and body["share_of"] == "logit"
    assert [a["item_id"] for a in body["items"]] == [1, "sku-2"]
    for a in body["items"]:
        assert len(a["top"]) == 5 and a["code"] == a["top"][0]["code"] and a["missing_inputs"] == []
        assert all(set(c["shares"]) == MODALITIES for c in a["top"])
        probabilities = [c["probability"] for c in a["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    files = {"image": ("photo.jpg", photo, "image/jpeg")}
    form = httpx.post(f"{url}/v1/predict", data={"title": "Piscine tubulaire 3 m", "description": "avec pompe"},
                      files=files, timeout=60)
    assert form.status_code == 200, form.text
    got, want = form.json()["items"][0]["top"], body["items"][0]["top"]  # the same item as a form
    assert [c["code"] for c in got] == [c["code"] for c in want]
    np.testing.assert_allclose([c["probability"] for c in got], [c["probability"] for c in want], rtol=1e-4)


def test_a_model_is_warmed_with_a_photo_before_it_serves(trained_workdir, monkeypatch):
    """A Predictor imports the photo decoder with its first photo: the server's load runs one, decoded (no
    missing input), so that its first client does not wait for it."""
    import pipeline.serve.models as models

    answers, real = [], models.warm
    monkeypatch.setattr(models, "warm", lambda predictor: answers.append(real(predictor)))
    served = models.Models(trained_workdir, None, None, quiet).load()
    assert served.version and len(answers) == 1
    (warm,) = answers[0]
    assert warm["missing_inputs"] == [] and set(warm["top"][0]["shares"]) == MODALITIES


def test_a_model_without_photos_is_warmed_without_one():
    """No photo bytes for a model that reads none: they would only need a temporary file (a full or read-only
    /tmp would then stop a text-only server from starting)."""
    from types import SimpleNamespace

    import pipeline.serve.models as models

    seen = []
    text_only = SimpleNamespace(branches={"title_bpe": None}, top=lambda items: seen.extend(items) or [{}])
    models.warm(text_only)
    with_photos = SimpleNamespace(branches={"title_bpe": None, "image": None}, top=lambda items: seen.extend(items))
    models.warm(with_photos)
    assert [it["image"] is None for it in seen] == [True, False] and seen[1]["image"][:2] == b"\xff\xd8"  # a JPEG


def test_health_readiness_metrics_openapi_and_the_page(server):
    url, app = server
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json() == {"status": "ready", "model_version": app.state.models.current.version}
    httpx.post(f"{url}/v1/predict", content=b"{", headers={"content-type": "application/json"})
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("emde_requests_total", "emde_request_seconds_bucket", "emde_batch_items_bucket",
                 'emde_errors_total{kind="bad_json"}', "emde_model_info{version="):
        assert name in metrics, name
    spec = httpx.get(f"{url}/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert httpx.get(f"{url}/docs").status_code == 200
    page = httpx.get(f"{url}/").text
    assert all(f'id="{f}"' in page for f in ("title", "description", "image", "classify"))


def test_concurrent_requests_reach_one_predictor_call(trained_workdir):
    with serving(trained_workdir, max_wait_ms=1500, max_batch_items=64) as (url, app):
        predictor = app.state.models.current.predictor
        calls = []
        top = predictor.top
        predictor.top = lambda items, k: calls.append(len(items)) or top(items, k)  # counts the calls
        start = threading.Barrier(8)
        answers = []

        def post(k: int) -> None:
            start.wait()
            answers.append(httpx.post(f"{url}/v1/predict", json={"items": [item(None, item_id=k)]}, timeout=60))
        threads = [threading.Thread(target=post, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [a.status_code for a in answers] == [200] * 8
    assert calls == [8]  # eight requests, one Predictor call


def test_a_batch_of_several_requests_holds_a_power_of_two_items_the_rest_goes_next(trained_workdir):
    with serving(trained_workdir, max_wait_ms=1500, max_batch_items=64) as (url, app):
        predictor = app.state.models.current.predictor
        calls, top = [], predictor.top
        predictor.top = lambda items, k: calls.append(len(items)) or top(items, k)
        start = threading.Barrier(6)
        answers = {}

        def post(k: int) -> None:
            start.wait()
            answers[k] = httpx.post(f"{url}/v1/predict", json={"items": [item(None, item_id=k)]}, timeout=60)
        threads = [threading.Thread(target=post, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(calls) == [2, 4]  # six requests: four, then the two left
    assert {k: a.json()["items"][0]["item_id"] for k, a in answers.items()} == {k: k for k in range(6)}


def test_batches_run_side_by_side_the_lead_with_every_thread_the_other_with_one(trained_workdir):
    import torch

    with serving(trained_workdir, max_wait_ms=0, parallel_batches=2) as (url, app):
        predictor = app.state.models.current.predictor
        calls, top = [], predictor.top

        def slow_top(items, k):  # holds each batch long enough for the next request to arrive meanwhile
            start = time.perf_counter()
            threads = torch.get_num_threads()
            time.sleep(1.0)
            answers = top(items, k)
            calls.append((start, time.perf_counter(), threads, [it["title"] for it in items]))
            return answers
        predictor.top = slow_top
        answers, sent = {}, [item(None, item_id=k, title=f"Lampe {k}") for k in range(3)]

        def post(k: int) -> None:
            answers[k] = httpx.post(f"{url}/v1/predict", json={"items": [sent[k]]}, timeout=60)
        threads = []
        for k in range(3):  # the third waits for a free slot
            threads.append(threading.Thread(target=post, args=(k,)))
            threads[-1].start()
            time.sleep(0.3)
        for t in threads:
            t.join()
        alone = top([{k: it[k] for k in ("title", "description", "image")} for it in sent], 5)  # in one call
    assert sorted(c[3][0] for c in calls) == ["Lampe 0", "Lampe 1", "Lampe 2"]  # one batch each
    (s0, e0, t0, _), (s1, e1, t1, _), (s2, _, t2, _) = sorted(calls)
    assert s1 < e0 and s2 >= min(e0, e1)  # two at once, the third after one of them
    assert t0 == torch.get_num_threads() and t1 == 1  # alone: every thread (the lead); beside another: one
    assert not [t for t in threading.enumerate() if t.name.startswith("emde-load")]  # loads end with their thread
    for k in range(3):
        assert answers[k].status_code == 200 and answers[k].json()["items"][0]["item_id"] == k
        assert answers[k].json()["items"][0]["code"] == alone[k]["code"]


def test_an_unexpected_failure_is_a_500_of_one_line_and_counted(server):
    url, app = server
    predictor = app.state.models.current.predictor
    top = predictor.top

    def broken(items, k):
        raise RuntimeError("boom\nsecond line")
    predictor.top = broken
    try:
        answer = httpx.post(f"{url}/v1/predict", json={"items": [item(None)]}, timeout=60)
    finally:
        predictor.top = top
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error (RuntimeError: boom); the server log has the details"}
    assert 'emde_requests_total{path="/v1/predict",status="500"} 1.0' in httpx.get(f"{url}/metrics").text
    assert httpx.post(f"{url}/v1/predict", json={"items": [item(None)]}, timeout=60).status_code == 200  # it goes on


BAD = [  # (body or form, status, the one line's start)
    (b'{"items": [', 400, "body: not valid JSON"),
    (json.dumps({"items": [{"description": "x"}]}), 422, "items[0].title: missing"),
    (json.dumps({"items": [{"title": 7}]}), 422, "items[0].title: input should be a valid string"),
    (json.dumps({"items": [{"title": "x", "image": 3}]}), 422, "items[0].image: input should be a valid string"),
    (json.dumps({"items": [{"title": "x", "image_path": "/etc/hostname"}]}), 422, "items[0].image_path: unknown field"),
    (json.dumps({"items": [{"title": "x"}, {"title": "y", "image": "@@@"}]}), 422, "items[1].image: not valid base64"),
    (json.dumps({"items": [{"title": "x", "image": base64.b64encode(b"GIF? no").decode()}]}), 422,
     "items[0].image: not an image"),
    (json.dumps({"items": []}), 422, "items: list should have at least 1 item"),
    (json.dumps({"items": [{"title": "x"}] * 17}), 413, "items: 17 items, at most 16 in one request"),
    (json.dumps([{"title": "x"}]), 422, "body: expected a JSON object"),
    (json.dumps({"items": [{"title": "x", "description": "é" * 120_000}]}), 413, "body: "),
]


@pytest.mark.parametrize("body,status,message", BAD)
def test_bad_json_is_a_4xx_with_one_line_naming_the_item_and_field(server, body, status, message):
    url, _ = server
    answer = httpx.post(f"{url}/v1/predict", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == status and answer.json()["error"].startswith(message), answer.text
    assert "\n" not in answer.json()["error"] and "Traceback" not in answer.text


def test_bad_forms_and_bodies_too(server, photo):
    url, _ = server
    cases = [({"description": "x"}, {"image": ("p.jpg", photo)}, 422, "form.title: missing"),
             ({"title": "x", "image": "/etc/hostname"}, None, 422, "form.image: expected a file part"),
             ({"title": "x"}, {"image": ("p.jpg", b"%PDF-1.4 not a photo")}, 422, "form.image: not an image"),
             ({"title": "x", "colour": "red"}, None, 422, "form.colour: unknown field")]
    for data, files, status, message in cases:
        answer = httpx.post(f"{url}/v1/predict", data=data, files=files, timeout=60)
        assert answer.status_code == status and answer.json()["error"].startswith(message), answer.text
    chunks = (b"x" * 50_000 for _ in range(6))  # no Content-Length: counted as it arrives
    answer = httpx.post(f"{url}/v1/predict", content=chunks, headers={"content-type": "application/json"})
    assert answer.status_code == 413 and answer.json()["error"].startswith("body: "), answer.text
    answer = httpx.post(f"{url}/v1/predict", content=b"title=x", headers={"content-type": "text/plain"})
    assert answer.status_code == 415 and answer.json()["error"].startswith("content-type: text/plain")
    assert httpx.post(f"{url}/v1/predict", json={"items": [item(photo)]}, timeout=60).status_code == 200  # still fine


def test_a_path_a_client_sends_is_never_opened(server, tmp_path, photo):
    url, _ = server
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)  # reading it would block until someone writes: the request would never end
    real = tmp_path / "real.jpg"
    real.write_bytes(photo)
    for body in ({"items": [{"title": "x", "image": str(fifo)}]}, {"items": [{"title": "x", "image": str(real)}]},
                 {"items": [{"title": "x", "image_path": str(real)}]}):
        answer = httpx.post(f"{url}/v1/predict", json=body, timeout=10)
        assert answer.status_code == 422 and "never opens a path" in answer.json()["error"], answer.text
    with pytest.raises(OSError) as no_reader:  # nobody ever opened the FIFO for reading
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert no_reader.value.errno == errno.ENXIO


def test_a_bearer_token_guards_predictions(trained_workdir):
    with serving(trained_workdir, token="s3cret") as (url, _):
        assert httpx.post(f"{url}/v1/predict", json={"items": [item()]}).status_code == 401
        wrong = httpx.post(f"{url}/v1/predict", json={"items": [item()]}, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "EMDE_SERVE_TOKEN" in wrong.json()["error"]
        right = httpx.post(f"{url}/v1/predict", json={"items": [item()]}, headers={"authorization": "Bearer s3cret"},
                           timeout=60)
        assert right.status_code == 200
        assert httpx.post(f"{url}/admin/reload").status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/readyz").status_code == 200


def _load(url: str, stop: threading.Event, answers: list, body: dict) -> None:
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            r = client.post(f"{url}/v1/predict", json=body)
            answers.append((r.status_code, r.json()))


def test_a_hot_swap_under_load_fails_no_request(trained_workdir, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(trained_workdir, w, ignore=shutil.ignore_patterns("catalog"))
    cfg = Predictor.load(w).cfg
    rows = load_catalog(trained_workdir / "catalog", cfg).items.head(3)
    body = {"items": [{"title": t, "description": d} for t, d in zip(rows["title"], rows["description"])]}
    log, answers, stop = Log(), [], threading.Event()
    model = w / "models" / "title_bpe" / "model.pt"
    with serving(w, log=log, watch_seconds=0.2) as (url, app):
        old = app.state.models.current
        threads = [threading.Thread(target=_load, args=(url, stop, answers, body)) for _ in range(3)]
        for t in threads:
            t.start()
        good = model.read_bytes()
        model.write_bytes(good + b"retrained")  # not the checkpoint the fusion recorded: the load fails
        _wait(lambda: "kept version" in log.text())
        model.write_bytes(good)
        fuse(w, cfg.merged({"seed": cfg.seed + 1}), progress=False, log=quiet)  # new heads swapped in
        _wait(lambda: app.state.models.current.version != old.version)
        new = app.state.models.current
        _wait(lambda: sum(a[1].get("model_version") == new.version for a in answers) >= 3)
        stop.set()
        for t in threads:
            t.join()
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:3]
    expected = {s.version: s.predictor.top(body["items"], 5) for s in (old, new)}
    assert {a["model_version"] for _, a in answers} == set(expected)
    for _, a in answers:  # every answer is entirely one version's: never old heads with new sketches
        got = [[c["probability"] for c in i["top"]] for i in a["items"]]
        want = [[c["probability"] for c in i["top"]] for i in expected[a["model_version"]]]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert "is not the title_bpe model the fusion was trained over" in log.text()


def test_a_new_model_pointed_at_is_swapped_in_on_reload(trained_workdir, tmp_path):
    first, second = tmp_path / "v1", tmp_path / "v2"
    for w in (first, second):
        shutil.copytree(trained_workdir, w, ignore=shutil.ignore_patterns("catalog", "features", "sketches"))
    cfg = Predictor.load(second).cfg
    shutil.copytree(trained_workdir / "sketches", second / "sketches")  # fuse reads them
    fuse(second, cfg.merged({"seed": cfg.seed + 1}), progress=False, log=quiet)
    served = tmp_path / "current"
    served.symlink_to(first)
    with serving(served, watch_seconds=0) as (url, app):  # no watcher: swaps on POST /admin/reload only
        v1 = httpx.post(f"{url}/v1/predict", json={"items": [item()]}, timeout=60).json()["model_version"]
        assert httpx.post(f"{url}/admin/reload", timeout=120).json() == {"model_version": v1, "error": None}
        served.unlink()
        served.symlink_to(second)  # a new model is pointed at
        reloaded = httpx.post(f"{url}/admin/reload", timeout=300).json()
        v2 = httpx.post(f"{url}/v1/predict", json={"items": [item()]}, timeout=60).json()["model_version"]
    assert reloaded == {"model_version": v2, "error": None} and v2 != v1


def _wait(condition, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sigterm_stops_accepting_finishes_what_is_in_flight_and_exits_0(trained_workdir, photo, tmp_path):
    """(Its settings come from --set: a batch waits 3 s, so the request is in flight at SIGTERM, and answers
    name their top 2 classes.)"""
    w = tmp_path / "w"
    shutil.copytree(trained_workdir, w, ignore=shutil.ignore_patterns("catalog", "features", "sketches"))
    proc = process("serve", "--model", w, "--port", "0", "--set", "serve.max_wait_ms=3000", "--set", "serve.top_k=2")
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        said = _until(lines, "ready on ")
        url = said.split("ready on ")[1].split()[0]
        body = {"items": [item(photo, item_id=k, title=f"article {k}") for k in range(16)]}
        answers = []
        sent = time.monotonic()
        inflight = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/predict", json=body,
                                                                             timeout=120)))
        inflight.start()
        time.sleep(0.5)  # the request is in flight
        proc.send_signal(signal.SIGTERM)
        inflight.join()
        assert proc.wait(120) == 0
        assert answers[0].status_code == 200 and len(answers[0].json()["items"]) == 16
        assert all(len(answer["top"]) == 2 for answer in answers[0].json()["items"])
        assert time.monotonic() - sent > 2.5  # it was answered after the signal
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
        _until(lines, "serve: stopped")
    finally:
        if proc.poll() is None:
            proc.kill()


def _until(lines: queue.Queue, text: str, seconds: float = 300) -> str:
    deadline = time.monotonic() + seconds
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if text in line:
            return line


def test_answers_leave_at_once_on_a_kept_alive_connection():
    """The listening socket says TCP, so asyncio sets TCP_NODELAY on each connection: without it, Nagle held
    every answer's body behind its headers until the client's delayed ACK (40 ms more per request on a
    kept-alive connection, which every HTTP client library keeps)."""
    import asyncio
    import socket

    from pipeline.serve import bind

    async def accepted_nodelay() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = bind("127.0.0.1", 0)
        server = await asyncio.start_server(handle, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        await server.wait_closed()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


HEAPS = """
import ctypes, sys, tempfile, threading
import torch
from pipeline.malloc import limit_arenas
limited = limit_arenas(3) if sys.argv[1] == "limit" else False
import polars  # its pool's threads allocate at once, as in the server

def allocate():
    for _ in range(2000):
        torch.ones(50_000).add_(1)  # torch lets go of the GIL: the threads allocate side by side

threads = [threading.Thread(target=allocate) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
out = ctypes.c_void_p(libc.fopen(path.encode(), b"w"))
libc.malloc_info(0, out)
libc.fclose(out)
print(limited, open(path).read().count("<heap nr="))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc heaps (arenas) are glibc's")
def test_limit_arenas_caps_the_heaps_threads_open_and_yields_to_malloc_arena_max():
    def heaps(*args: str, env: dict | None = None) -> tuple[str, int]:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | {"OMP_NUM_THREADS": "1"} | (env or {})
        out = subprocess.run([sys.executable, "-c", HEAPS, *args], env=env | {"PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])

    done, limited = heaps("limit")
    assert done == "True" and limited <= 3
    assert heaps("free")[1] > 3  # without the limit, the same threads open more
    assert heaps("limit", env={"MALLOC_ARENA_MAX": "5"})[0] == "False"  # the user's own setting stands
