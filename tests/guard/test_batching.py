"""The micro-batcher with a plain Python run_batch: every caller gets its own result, batches stay within the
size limit, waits are bounded, failures reach exactly the callers of the failed batch, and callers that gave up
are not judged."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from misguard.guard.server.batching import MicroBatcher


class Recorder:
    """run_batch that doubles each item and records every batch it saw; `fail_on` items make it raise, `delay_s`
    makes it slow, `gate` (a threading.Event) makes it wait until set."""

    def __init__(self, *, fail_on: frozenset = frozenset(), delay_s: float = 0.0, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.delay_s = delay_s
        self.gate = gate

    def __call__(self, items):
        self.batches.append(list(items))
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on & set(items):
            raise ValueError(f"judge failed on {sorted(self.fail_on & set(items))}")
        return [x * 2 for x in items]


async def started(run_batch, **kwargs) -> MicroBatcher:
    batcher = MicroBatcher(run_batch, **kwargs)
    batcher.start()
    return batcher


def test_concurrent_submits_each_get_their_own_result():
    record = Recorder(delay_s=0.01)
    sizes = []

    async def main():
        batcher = await started(record, max_batch_size=8, max_wait_s=0.02, on_batch=lambda n, s: sizes.append(n))
        try:
            return await asyncio.gather(*(batcher.submit(x) for x in range(50))), batcher
        finally:
            await batcher.aclose()

    results, batcher = asyncio.run(main())
    assert results == [x * 2 for x in range(50)]
    assert sorted(x for batch in record.batches for x in batch) == list(range(50))
    assert max(len(batch) for batch in record.batches) <= 8
    assert len(record.batches) < 50
    assert sizes == [len(batch) for batch in record.batches]
    assert (batcher.batches, batcher.largest_batch) == (len(record.batches), max(sizes))


def test_batch_size_one_judges_each_item_alone():
    record = Recorder()

    async def main():
        batcher = await started(record, max_batch_size=1, max_wait_s=0.05)
        try:
            return await asyncio.gather(*(batcher.submit(x) for x in range(5)))
        finally:
            await batcher.aclose()

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]
    assert sorted(record.batches) == [[0], [1], [2], [3], [4]]


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(Recorder(), max_batch_size=0)


async def until(condition, poll_s: float = 0.01) -> None:
    """Return once condition() is true (callers bound the wait with asyncio.wait_for, as a safety net)."""
    while not condition():
        await asyncio.sleep(poll_s)


def test_a_gathering_batch_takes_in_what_arrives_while_it_waits():
    record = Recorder()

    async def main():
        batcher = await started(record, max_batch_size=3, max_wait_s=60.0)
        try:
            waiting = []
            for x in (1, 2, 3):  # one at a time: the worker holds the first and waits for company
                waiting.append(asyncio.ensure_future(batcher.submit(x)))
                await asyncio.sleep(0.05)
            return await asyncio.wait_for(asyncio.gather(*waiting), 10)
        finally:
            await batcher.aclose()

    assert asyncio.run(main()) == [2, 4, 6]
    assert record.batches == [[1, 2, 3]]


def test_a_batch_short_of_company_runs_at_its_deadline():
    record = Recorder()

    async def main():
        batcher = await started(record, max_batch_size=8, max_wait_s=0.2)
        try:
            # 10 s: a safety net (a batch kept waiting for a full eight would never come back), not a speed goal.
            return await asyncio.wait_for(batcher.submit(21), 10)
        finally:
            await batcher.aclose()

    assert asyncio.run(main()) == 42
    assert record.batches == [[21]]  # run alone, seven short of a full batch


def test_lone_submit_runs_at_once_when_nothing_else_is_in_flight():
    asked = []
    record = Recorder()

    def nobody_else(batched: int) -> bool:
        asked.append(batched)
        return False

    async def main():
        # A minute of max_wait_s: were the lone item kept waiting for company, `until` would time out (10 s).
        batcher = await started(record, max_batch_size=2, max_wait_s=60.0, others_in_flight=nobody_else)
        try:
            lone = asyncio.ensure_future(batcher.submit(21))
            await asyncio.wait_for(until(lambda: record.batches), 10)
            later = asyncio.ensure_future(batcher.submit(22))
            return await asyncio.wait_for(asyncio.gather(lone, later), 10)
        finally:
            await batcher.aclose()

    assert asyncio.run(main()) == [42, 44] and asked == [1, 1]
    # The lone item's batch was already running when the second came: each ran in a batch of its own.
    assert record.batches == [[21], [22]]


def test_a_full_batch_does_not_wait_for_the_deadline():
    record = Recorder()

    async def main():
        batcher = await started(record, max_batch_size=4, max_wait_s=30.0)
        try:
            return await asyncio.wait_for(asyncio.gather(*(batcher.submit(x) for x in range(4))), 5)
        finally:
            await batcher.aclose()

    assert asyncio.run(main()) == [0, 2, 4, 6]
    assert record.batches == [[0, 1, 2, 3]]


def test_run_batch_error_reaches_every_caller_of_that_batch_and_the_next_batch_works():
    record = Recorder(fail_on=frozenset({3}))

    async def main():
        batcher = await started(record, max_batch_size=8, max_wait_s=0.05)
        try:
            failed = await asyncio.gather(*(batcher.submit(x) for x in range(5)), return_exceptions=True)
            after = await asyncio.gather(*(batcher.submit(x) for x in (10, 11)))
            return failed, after
        finally:
            await batcher.aclose()

    failed, after = asyncio.run(main())
    assert record.batches[0] == [0, 1, 2, 3, 4]  # gathered together, so one failure fails all of them
    assert all(isinstance(error, ValueError) and "judge failed on [3]" in str(error) for error in failed)
    assert after == [20, 22]


def test_wrong_result_count_fails_the_callers():
    async def main():
        batcher = await started(lambda items: [1] * (len(items) + 1), max_batch_size=4, max_wait_s=0.05)
        try:
            return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        finally:
            await batcher.aclose()

    errors = asyncio.run(main())
    assert all(isinstance(error, RuntimeError) and "3 results for 2 items" in str(error) for error in errors)


def test_caller_that_timed_out_is_not_judged():
    gate = threading.Event()
    record = Recorder(gate=gate)

    async def main():
        batcher = await started(record, max_batch_size=8, max_wait_s=0.0)
        try:
            blocker = asyncio.ensure_future(batcher.submit(1))  # holds the one judge until the gate opens
            await asyncio.sleep(0.1)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(batcher.submit(2), 0.1)  # queued behind the blocker, then gives up
            patient = asyncio.ensure_future(batcher.submit(3))
            await asyncio.sleep(0.05)
            gate.set()
            return await asyncio.wait_for(asyncio.gather(blocker, patient), 5)
        finally:
            gate.set()
            await batcher.aclose()

    assert asyncio.run(main()) == [2, 6]
    assert record.batches == [[1], [3]]


def test_submit_before_start_or_after_close_raises():
    async def main():
        batcher = MicroBatcher(Recorder())
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit(1)
        batcher.start()
        assert await batcher.submit(1) == 2
        await batcher.aclose()
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit(1)

    asyncio.run(main())


def test_aclose_fails_queued_callers():
    gate = threading.Event()
    record = Recorder(gate=gate)

    async def main():
        batcher = await started(record, max_batch_size=1, max_wait_s=0.0)
        running = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.1)  # the worker is inside run_batch for item 1
        queued = [asyncio.ensure_future(batcher.submit(x)) for x in (2, 3)]
        await asyncio.sleep(0.05)
        try:
            await batcher.aclose()
            return await asyncio.wait_for(asyncio.gather(running, *queued, return_exceptions=True), 5)
        finally:
            gate.set()

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "shutting down" in str(r) for r in results)
    assert record.batches == [[1]]


def test_aclose_fails_callers_of_a_batch_still_gathering():
    record = Recorder()

    async def main():
        batcher = await started(record, max_batch_size=8, max_wait_s=30.0)
        waiting = [asyncio.ensure_future(batcher.submit(x)) for x in (1, 2)]
        await asyncio.sleep(0.1)  # the worker holds both and waits up to 30 s for more
        await batcher.aclose()
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "shutting down" in str(r) for r in results)
    assert record.batches == []
