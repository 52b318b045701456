"""Dynamic batching: the items of concurrent requests go to one Predictor call.

Requests wait in an asyncio queue. The batch loop takes the first, then whatever else is queued, and waits at
most `[serve] max_wait_ms` for more, until `max_batch_items` items (a request is never split: a request larger
than that goes alone). A batch of several requests then keeps a power-of-two number of items where the
requests allow, the last ones going first into the next batch: the forwards see few shapes, and with every
size from 1 to 64 a bundle's server held more memory the longer it ran, and was slower (docs/design.md
"Serving"). Up to `[serve] parallel_batches` batches are predicted at once, each in a worker thread,
so the event loop stays free to accept and check requests meanwhile; those pile up and make the next batch. A
batch goes to the lead worker whenever it is free, with the process's torch threads divided by the batches then
running (alone: all of them, the lowest latency); otherwise to a side worker, with one thread. On 2 cores,
under load, that is two batches of one thread each: they keep both cores computing, where two threads of one
batch wait at each other's barriers whenever the event loop or a client takes a core. (A lead batch that began
alone keeps its threads when a side batch joins it: one thread more than the cores, until it ends.)

Only the lead worker ever runs more than one thread: libgomp keeps a pool of threads for each thread that ran a
parallel region, for as long as it lives, and once it manages more threads than there are cores it stops
spinning at barriers, so that every torch op of every thread waits on a futex (one item: 32 -> 40 ms,
docs/design.md "Serving"). Each batch uses the models current when it starts (pipeline.serve.models), and every
answer names their version.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pipeline.distributed import use_threads
from pipeline.serve.metrics import Metrics
from pipeline.serve.models import Models, Served


@dataclass
class Pending:
    items: list[dict]
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(self, models: Models, max_items: int, max_wait_ms: float, top_k: int, metrics: Metrics,
                 parallel: int = 1):
        self.models, self.max_items, self.max_wait, self.top_k = models, max_items, max_wait_ms / 1000, top_k
        self.metrics = metrics
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.lead = ThreadPoolExecutor(1, thread_name_prefix="emde-predict-lead")  # every thread when alone
        self.side = ThreadPoolExecutor(max(1, parallel - 1), thread_name_prefix="emde-predict")  # one thread each
        self.threads = torch.get_num_threads()  # the process's, shared among the batches running
        self.running, self.lead_busy, self.free = 0, False, asyncio.Semaphore(parallel)
        self._held: deque[Pending] = deque()  # taken from the queue but left out of the batch it met: next first
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, items: list[dict]) -> tuple[Served, list[dict]]:
        """(the models that answered, one answer per item) once the batch holding these items is done."""
        pending = Pending(items)
        self.metrics.queued.inc(len(items))
        await self.queue.put(pending)
        return await pending.future

    async def run(self) -> None:
        while True:
            await self.free.acquire()  # released when a batch is done
            batch = await self._next_batch(asyncio.get_running_loop())
            self.running += 1
            lead = not self.lead_busy  # the lead takes every batch it is free for
            self.lead_busy = self.lead_busy or lead
            threads = max(1, self.threads // self.running) if lead else 1
            task = asyncio.create_task(self._predict(batch, lead, threads))
            self._tasks.add(task)  # held until done (the loop keeps only weak references to tasks)
            task.add_done_callback(self._tasks.discard)

    async def _predict(self, batch: list[Pending], lead: bool, threads: int) -> None:
        try:
            served = self.models.current  # swaps happen between batches
            n = sum(len(p.items) for p in batch)
            self.metrics.queued.dec(n)
            self.metrics.batch_items.observe(n)
            started = time.perf_counter()
            answers = await asyncio.get_running_loop().run_in_executor(
                self.lead if lead else self.side, _top, served.predictor, [it for p in batch for it in p.items],
                self.top_k, threads)
        except Exception as err:  # noqa: BLE001 - the requests of this batch get it; the loop goes on
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        finally:
            self.running -= 1
            if lead:
                self.lead_busy = False
            self.free.release()
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        start = 0
        for p in batch:
            if not p.future.done():  # a client that went away leaves a cancelled future
                p.future.set_result((served, answers[start : start + len(p.items)]))
            start += len(p.items)

    async def _next_batch(self, loop) -> list[Pending]:
        first = self._held.popleft() if self._held else await self.queue.get()
        batch, n = [first], len(first.items)
        deadline = loop.time() + self.max_wait
        while n < self.max_items and (more := await self._more(deadline - loop.time())) is not None:
            if n + len(more.items) > self.max_items:
                self._held.appendleft(more)
                break
            batch.append(more)
            n += len(more.items)
        while len(batch) > 1 and n & (n - 1):  # not a power of two: the last requests wait for the next batch
            last = batch.pop()
            self._held.appendleft(last)
            n -= len(last.items)
        return batch

    async def _more(self, left: float) -> Pending | None:
        """The next request: one left out of the last batch, else one queued, else one arriving within `left`
        seconds; None when none does."""
        if self._held:
            return self._held.popleft()
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            if left <= 0:
                return None
        try:
            return await asyncio.wait_for(self.queue.get(), left)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.lead.shutdown(wait=True)
        self.side.shutdown(wait=True)


def _top(predictor, items: list[dict], k: int, threads: int) -> list[dict]:
    use_threads(threads)  # this worker thread's OpenMP team (each thread keeps its own)
    return predictor.top(items, k)
