"""Dynamic batching: the items of concurrent requests go to one Predictor call.

Requests wait in an asyncio queue. The batch loop takes the first, then whatever else is queued, and waits at
most `[serve] max_wait_ms` for more, until `max_batch_items` items (a request is never split: a request larger
than that goes alone). The Predictor call runs in one worker thread, so the event loop stays free to accept and
check requests meanwhile; those pile up and make the next batch. Each batch uses the models current when it
starts (pipeline.serve.models), and every answer names their version.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.serve.metrics import Metrics
from pipeline.serve.models import Models, Served


@dataclass
class Pending:
    items: list[dict]
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(self, models: Models, max_items: int, max_wait_ms: float, top_k: int, metrics: Metrics):
        self.models, self.max_items, self.max_wait, self.top_k = models, max_items, max_wait_ms / 1000, top_k
        self.metrics = metrics
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="emde-predict")
        self._held: Pending | None = None  # taken from the queue but too big for the batch it met: next first

    async def submit(self, items: list[dict]) -> tuple[Served, list[dict]]:
        """(the models that answered, one answer per item) once the batch holding these items is done."""
        pending = Pending(items)
        self.metrics.queued.inc(len(items))
        await self.queue.put(pending)
        return await pending.future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            served = self.models.current  # swaps happen between batches
            n = sum(len(p.items) for p in batch)
            self.metrics.queued.dec(n)
            self.metrics.batch_items.observe(n)
            started = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self.worker, served.predictor.top,
                                                     [it for p in batch for it in p.items], self.top_k)
            except Exception as err:  # noqa: BLE001 - the requests of this batch get it; the loop goes on
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            start = 0
            for p in batch:
                if not p.future.done():  # a client that went away leaves a cancelled future
                    p.future.set_result((served, answers[start : start + len(p.items)]))
                start += len(p.items)

    async def _next_batch(self, loop) -> list[Pending]:
        first = self._held or await self.queue.get()
        self._held = None
        batch, n = [first], len(first.items)
        deadline = loop.time() + self.max_wait
        while n < self.max_items:
            try:
                more = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    more = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
            if n + len(more.items) > self.max_items:
                self._held = more
                break
            batch.append(more)
            n += len(more.items)
        return batch

    def close(self) -> None:
        self.worker.shutdown(wait=True)
