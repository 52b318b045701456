"""The models the server answers with, and their hot swap.

The work directory's (or bundle's) model files are watched (their stat, every `[serve] watch_seconds`; at once
on SIGHUP or POST /admin/reload). When they change, a new Predictor is loaded beside the one serving (in a
thread: the old one goes on answering), and `current` is replaced between two batches: a batch holds the
Predictor it started with, so requests in flight finish on the old models. A load that fails (a modality
retrained but not yet fused, a damaged bundle) keeps the old models and says why in one log line; the same
files are not tried again until they change.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import workdir as wd
from pipeline.distributed import use_threads
from pipeline.errors import PipelineError
from pipeline.predictor import Predictor, model_stamp
from stores import StoreError


@dataclass(frozen=True)
class Served:
    predictor: Predictor
    version: str
    loaded_seconds: float


def one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(err, (PipelineError, StoreError)) else f"{type(err).__name__}: {text}"[:500]


async def in_a_passing_thread(fn):
    """fn() in a thread that ends with it. A load runs torch ops, and a thread that ran them with several threads
    keeps an OpenMP pool while it lives, which slows every later torch op of the batches (pipeline.serve.batching)."""
    worker = ThreadPoolExecutor(1, thread_name_prefix="emde-load")
    try:
        return await asyncio.get_running_loop().run_in_executor(worker, fn)
    finally:
        worker.shutdown(wait=False)


def warm(predictor: Predictor) -> list[dict]:
    """One item with a title, a description and (for a model that reads photos) a photo through the models (its
    answer): the server answers its first request as fast as the next (a Predictor imports the photo decoder,
    torchvision, with its first photo)."""
    import io

    from PIL import Image

    image = None
    if "image" in predictor.branches:
        photo = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 80, 40)).save(photo, "JPEG")
        image = photo.getvalue()
    return predictor.top([{"item_id": 0, "title": "warm-up", "description": "warm-up", "image": image}])


class Models:
    def __init__(self, source: Path, configs: list[Path] | None, metrics, log, sets: list[str] | tuple = ()):
        self.source, self.configs, self.sets, self.metrics, self.log = Path(source), configs, tuple(sets), metrics, log
        self.current: Served | None = None
        self.threads = torch.get_num_threads()  # the process's, for every load
        self._seen: tuple | None = None
        self._checking = asyncio.Lock()

    def load(self) -> Served:
        """A new Predictor of the source, as its files are now, with the process's torch threads (blocking: run it
        in a thread of its own, `in_a_passing_thread`)."""
        started = time.perf_counter()
        use_threads(self.threads)
        predictor = Predictor.load(self.source, config=self.config())
        predictor.warn_on_change = False  # the watcher swaps new models in
        warm(predictor)
        return Served(predictor, predictor.version, time.perf_counter() - started)

    def config(self):
        """The source's configuration as it is now (a swapped-in work directory may record another)."""
        return wd.load(self.source, self.configs, sets=self.sets)

    def stamp(self) -> tuple:
        cfg = self.current.predictor.cfg if self.current else self.config()
        return model_stamp(self.source.resolve(), cfg)

    async def start(self) -> None:
        """The first models (raises what stops the server: there is nothing to answer with)."""
        self._seen = await asyncio.to_thread(self.stamp)
        self._use(await in_a_passing_thread(self.load))

    def _use(self, served: Served) -> None:
        old = self.current
        self.current = served
        if old is not None:
            self.metrics.version.remove(old.version)
            self.metrics.swaps.inc()
        self.metrics.version.labels(served.version).set(1)
        was = f" (was {old.version})" if old else ""
        self.log(f"serve: version {served.version} loaded from {self.source} in {served.loaded_seconds:.1f} s{was}")

    async def check(self, force: bool = False) -> str | None:
        """Load and swap in the source's models if their files changed (or `force`); the reason a load failed."""
        async with self._checking:
            try:
                stamp = await asyncio.to_thread(self.stamp)
            except (PipelineError, StoreError, OSError) as err:
                return self._kept(err)
            if stamp == self._seen and not force:
                return None
            self._seen = stamp
            try:
                served = await in_a_passing_thread(self.load)
            except Exception as err:  # noqa: BLE001 - any failure keeps the models that work
                return self._kept(err)
            if self.current is None or served.version != self.current.version:
                self._use(served)
            return None

    def _kept(self, err: BaseException) -> str:
        self.metrics.errors.labels("swap_failed").inc()
        reason = one_line(err)
        self.log(f"serve: kept version {self.current.version if self.current else '(none)'}: new models from "
                 f"{self.source} did not load: {reason}")
        return reason

    async def watch(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self.check()

