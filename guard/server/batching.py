"""Micro-batching: concurrent rail checks share engine calls.

Checks wait in a queue; one worker takes the first, lets others join it for at most `max_wait_s` (or until
`max_batch_size`), runs the batch in a worker thread and answers every waiting caller. While a batch runs, new
checks queue up, so the batch size follows the load. One batch runs at a time: the judge is one model.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Run `run_batch(items) -> results` (same length, same order) on batches of submitted items. Start it inside
    a running event loop with `start()`, stop it with `aclose()`."""

    def __init__(self, run_batch: Callable[[Sequence[Item]], Sequence[Result]], *, max_batch_size: int = 16,
                 max_wait_s: float = 0.005, on_batch: Callable[[int, float], None] | None = None,
                 others_in_flight: Callable[[int], bool] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        """Called with (batch size, seconds the engine call took) after each batch: for metrics."""
        self.others_in_flight = others_in_flight
        """Called with the batch's size so far: whether anything else may still join it. When it says no (a lone
        request), the batch runs at once instead of waiting max_wait_s for company that cannot come."""
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._batch: list[tuple[Item, asyncio.Future]] = []
        """The batch the worker is gathering or running: taken off the queue, not yet answered."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="misguard-judge")
        self.batches = 0
        self.largest_batch = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="misguard-micro-batcher")

    @property
    def running(self) -> bool:
        """Whether the worker is up (started, not stopped, not crashed)."""
        return self._worker is not None and not self._worker.done()

    async def submit(self, item: Item) -> Result:
        """The item's result once its batch has run; raises what run_batch raised for that batch."""
        if self._queue is None or not self.running:
            raise RuntimeError("the micro-batcher is not running")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            self._batch = batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                # Whatever is already queued joins at once; then wait for more until the deadline.
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0 or (self.others_in_flight is not None and not self.others_in_flight(len(batch))):
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            # Callers that gave up (timeout, disconnect) are not judged.
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            items = [item for item, _ in batch]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(items))
            self._batch = []
            if self.on_batch is not None:
                self.on_batch(len(items), time.perf_counter() - started)

    async def aclose(self) -> None:
        """Stop the worker (a batch in flight finishes in its thread) and fail whatever still waits."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
        waiting = list(self._batch)  # taken off the queue by the cancelled worker, never answered
        self._batch = []
        if self._queue is not None:
            while not self._queue.empty():
                waiting.append(self._queue.get_nowait())
        for _, future in waiting:
            if not future.done():
                future.set_exception(RuntimeError("the guard is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)
