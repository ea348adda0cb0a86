"""Batching: image requests that arrive close together run as one model call (`MicroBatcher`), and
concurrent text generations share every step's model calls (`Generations`, continuous batching, below).

An asyncio queue per served model version. One worker task takes the first waiting request,
then everything else that is already queued or arrives within `window_s` of it, up to
`max_items` rows and half of the requests in flight (`in_flight()`); it waits only while
`arriving()` says requests for this model are still being read (so a lone request runs at once,
not after the window), concatenates the rows, runs ONE call of `run` in a worker thread (the event
loop keeps accepting requests meanwhile; they queue up for the next batch) and hands each request
its own rows of the result. While a batch runs, the next one gathers: under load the batches
grow by themselves, and a lone request waits at most `window_s`. A batch that reaches half the
requests in flight while the thread is still busy is handed to it at once (at most two handed over:
the one running and the next), so the thread starts it the moment the running one ends instead of
idling while the event loop answers and gathers: binary /infer at 8 and 32 clients 2,461 -> 3,877 and
3,837 -> 4,771 requests/s, JSON /infer 1,951 -> 2,322 and 3,074 -> 3,258 (idle, 3 interleaved rounds).

Why half: serving is a two-stage pipeline, the event loop (read, decode, answer) and the batch
thread (the model), and the stages overlap only while the requests in flight form at least two
groups. A batch holding all of them leaves the loop idle during the call and the model idle while
the loop answers and reads them again: at 32 clients, 64-row batches left 35-40% of the 2 cores
idle and served ~920 requests/s; 16 per batch, 19% idle and ~1,190/s (the model's cost per
image is flat beyond 8 rows, 0.53-0.56 ms, so smaller batches lose nothing there).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

_CLOSE = object()


class MicroBatcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], window_s: float = 0.002, max_items: int = 64,
                 on_batch: Callable[[int], None] | None = None, arriving: Callable[[], int] = lambda: 1,
                 in_flight: Callable[[], int] | None = None):
        self.run, self.window_s, self.max_items, self.arriving = run, window_s, max_items, arriving
        self.in_flight = in_flight or (lambda: 2 * max_items)  # default: never the limit
        self.on_batch = on_batch or (lambda n: None)
        self.queue: asyncio.Queue = asyncio.Queue()
        # one thread: one onnxruntime call at a time, each using the session's intra-op threads
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self.worker: asyncio.Task | None = None
        self._wake: asyncio.Future | None = None  # what the worker awaits while gathering beside a running batch
        self.closed = False

    def _wake_worker(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def submit(self, rows: np.ndarray) -> asyncio.Future:
        """Queue `rows` (N x ...); the future resolves to their N rows of output. Synchronous on purpose:
        a caller that picked this batcher cannot lose the race with close() (nothing awaits in between)."""
        assert not self.closed, "submit after close"
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.put_nowait((rows, future))
        self._wake_worker()
        if self.worker is None:
            self.worker = loop.create_task(self._work())
        return future

    def close(self) -> None:
        """Finish what is queued, then stop (a swapped-out model version)."""
        self.closed = True
        if self.worker is None:
            self.executor.shutdown(wait=False)
        else:
            self.queue.put_nowait(_CLOSE)
            self._wake_worker()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        carried = None  # a request that did not fit into the previous batch
        previous: asyncio.Task | None = None  # the batch handed to the thread last
        older: asyncio.Task | None = None  # the one before it, if still running: at most two handed over
        while True:
            if older is not None and not older.done():
                await asyncio.wait({older})
            first = carried or await self.queue.get()
            carried = None
            if first is _CLOSE:
                break
            batch, rows = [first], len(first[0])
            deadline = loop.time() + self.window_s
            closing = False
            while rows < self.max_items and len(batch) < max(1, self.in_flight() // 2):  # half the requests
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    if previous is not None and not previous.done():  # the thread is busy: keep gathering
                        self._wake = loop.create_future()  # set by the next submit, or by the batch ending
                        await self._wake
                        if previous.done():  # free now: gather as after a batch, for a window at most
                            deadline = loop.time() + self.window_s
                        continue
                    elif self.arriving() == 0 or loop.time() >= deadline:
                        break
                    else:
                        await asyncio.sleep(0)  # let the requests being read reach the queue
                        continue
                if item is _CLOSE:
                    closing = True
                    break
                if rows + len(item[0]) > self.max_items:
                    carried = item
                    break
                batch.append(item)
                rows += len(item[0])
            # full while the thread is busy: handed over now, it runs as soon as the thread is free
            older, previous = previous, loop.create_task(self._run(loop, batch, rows))
            if closing:
                break
        await asyncio.gather(*(t for t in (older, previous) if t is not None))
        self.executor.shutdown(wait=False)

    async def _run(self, loop, batch: list, rows: int) -> None:
        inputs = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
        try:
            out = await loop.run_in_executor(self.executor, self.run, inputs)
        except Exception as exc:  # every waiting request gets the error, the worker lives on
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._wake_worker()  # the thread is free: the batch being gathered goes next
        self.on_batch(rows)
        start = 0
        for part, future in batch:
            if not future.done():  # a client that went away cancelled its future
                future.set_result(out[start:start + len(part)])
            start += len(part)


# -- text generation: continuous batching ------------------------------------------------------

class Generation:
    """One request's generation in a `Generations` batch: its row, how many ids it still needs, and
    the queue its ids arrive on (None after the last; an exception if a step failed)."""

    def __init__(self, seq, length: int):
        self.seq, self.left = seq, length
        self.queue: asyncio.Queue = asyncio.Queue()
        self.gone = False  # the client went away: the row leaves the batch before the next step

    async def ids(self):
        """The generated ids as they come. Whoever stops reading early sets `gone`."""
        while True:
            item = await self.queue.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item


class Generations:
    """Continuous batching of the text generations of one served model version (the way text-generation
    servers do it): every step, ONE `step(rows)` call in a worker thread draws the next id of every row
    generating now (`ptpipe.inference.step`: rows needing the same kind of model call share it); a
    request that arrives meanwhile joins at the next step (its prompt is fed then), one that has its
    length, or whose client went away, leaves before it. At most `max_rows` rows at once, the others wait
    their turn in arrival order. Each row draws from its own seeded RNG, so its text does not depend on
    the batch; the worker stops when no row is left and starts again on the next submit."""

    def __init__(self, step: Callable[[list], list[int]], max_rows: int,
                 on_step: Callable[[int], None] = lambda rows: None, on_rows: Callable[[int], None] = lambda n: None):
        self.step, self.max_rows, self.on_step, self.on_rows = step, max_rows, on_step, on_rows
        self.waiting: list[Generation] = []
        self.active: list[Generation] = []
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.worker: asyncio.Task | None = None

    def submit(self, seq, length: int) -> Generation:
        """Queue a row (an `inference.Sequence`) for `length` ids (>= 1)."""
        generation = Generation(seq, length)
        self.waiting.append(generation)
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._work())
        return generation

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self.active = [g for g in self.active if g.left > 0 and not g.gone]
                self.waiting = [g for g in self.waiting if not g.gone]
                room = self.max_rows - len(self.active)
                self.active += self.waiting[:room]
                self.waiting = self.waiting[room:]
                self.on_rows(len(self.active) + len(self.waiting))
                if not self.active:
                    return
                batch = list(self.active)
                try:
                    ids = await loop.run_in_executor(self.executor, self.step, [g.seq for g in batch])
                except Exception as exc:  # every row of the failed step gets the error; the worker lives on
                    for g in batch:
                        g.left = 0
                        g.queue.put_nowait(exc)
                    continue
                self.on_step(len(batch))
                for g, i in zip(batch, ids):
                    g.left -= 1
                    g.queue.put_nowait(i)
                    if g.left == 0:
                        g.queue.put_nowait(None)
        finally:
            self.worker = None
