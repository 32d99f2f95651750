"""The model replica's batch queue on a bare event loop, with a pass that only takes time.

The pass is a fake below the queue's boundary: it sleeps as a forward pass would compute, and
answers each item by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from deployments.batch_queue import (
    BatchQueue,
    callers_on_the_way,
    even_share,
    expects_arrivals,
    expects_company,
    may_start,
)
from deployments.config import BatchingConfig

PASS_S = 0.05  # the fake pass's compute time


class FakeModel:
    def __init__(self, pass_s: float = PASS_S) -> None:
        self.pass_s = pass_s
        self.batches: list[list[str]] = []
        self.alone: list[bool] = []  # whether each batch was told it runs alone
        self.running = asyncio.Event()  # set while a pass runs
        self.passes_now = 0
        self.peak_passes = 0  # the most passes that ran at once

    async def run(self, items: list[str], alone: bool) -> AsyncIterator[tuple[int, str]]:
        self.batches.append(items)
        self.alone.append(alone)
        self.running.set()
        self.passes_now += 1
        self.peak_passes = max(self.peak_passes, self.passes_now)
        await asyncio.sleep(self.pass_s)
        self.passes_now -= 1
        self.running.clear()
        if "bad" in items:
            raise RuntimeError("the pass failed")
        for position, item in enumerate(items):
            yield position, f"image of {item}"


def make_queue(
    model: FakeModel,
    max_batch_size: int = 4,
    batch_wait_timeout_s: float = 0.0,
    concurrent: int = 1,
    company_wait_s: float = 0.0,
) -> BatchQueue[str, str]:
    batching = BatchingConfig(
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        company_wait_s=company_wait_s,
    )
    return BatchQueue(model.run, batching, concurrent)


async def answer(queue: BatchQueue[str, str], item: str) -> list[str]:
    async with aclosing(queue.submit(item)) as events:
        return [event async for event in events]


async def second_during_the_first_s_pass(
    queue: BatchQueue[str, str], model: FakeModel, first: str, second: str
) -> None:
    """``first`` is submitted, and ``second`` once a pass runs; returns when both are answered."""
    first_answer = asyncio.ensure_future(answer(queue, first))
    await model.running.wait()
    second_answer = asyncio.ensure_future(answer(queue, second))
    await asyncio.wait_for(asyncio.gather(first_answer, second_answer), 10)


def test_tasks_beyond_a_full_batch_wait_for_the_next_pass_and_leave_with_later_ones() -> None:
    async def scenario() -> list[int]:
        model = FakeModel()
        queue = make_queue(model)
        first = asyncio.ensure_future(answer(queue, "first"))
        await model.running.wait()
        early = [asyncio.ensure_future(answer(queue, f"early{index}")) for index in range(6)]
        await asyncio.wait_for(first, 10)
        await model.running.wait()  # the pass of 4 of the 6 runs; the other 2 wait behind it
        late = [asyncio.ensure_future(answer(queue, f"late{index}")) for index in range(2)]
        await asyncio.wait_for(asyncio.gather(*early, *late), 10)
        return [len(batch) for batch in model.batches]

    # Serve's batch queue would have run the 2 left over as a batch of their own: 1, 4, 2, 2.
    assert asyncio.run(scenario()) == [1, 4, 4]


def test_a_partial_batch_waits_for_more_after_its_first_task() -> None:
    async def scenario() -> list[list[str]]:
        model = FakeModel()
        queue = make_queue(model, batch_wait_timeout_s=10.0)  # only a full batch leaves within 10 s
        callers = []
        for index in range(4):
            callers.append(asyncio.ensure_future(answer(queue, f"t{index}")))
            await asyncio.sleep(PASS_S)  # arrivals spread over time, as independent callers come
        await asyncio.wait_for(asyncio.gather(*callers), 10)
        return model.batches

    assert asyncio.run(scenario()) == [["t0", "t1", "t2", "t3"]]


def test_a_caller_that_leaves_the_queue_is_not_run() -> None:
    async def scenario() -> list[list[str]]:
        model = FakeModel()
        queue = make_queue(model)
        first = asyncio.ensure_future(answer(queue, "first"))
        await model.running.wait()
        leaving = asyncio.ensure_future(answer(queue, "leaving"))
        staying = asyncio.ensure_future(answer(queue, "staying"))
        await asyncio.sleep(0)  # lets both join the queue (one turn of the loop, not a wait for time)
        leaving.cancel()
        await asyncio.wait_for(asyncio.gather(first, staying), 10)
        return model.batches

    assert asyncio.run(scenario()) == [["first"], ["staying"]]


def test_a_failing_batch_reaches_each_of_its_callers_and_the_queue_goes_on() -> None:
    async def scenario() -> list[str]:
        model = FakeModel()
        queue = make_queue(model)
        failed = await asyncio.gather(answer(queue, "bad"), answer(queue, "fine"))
        assert all(isinstance(events[0], RuntimeError) for events in failed)
        return await answer(queue, "after")

    assert asyncio.run(scenario()) == ["image of after"]


@pytest.mark.parametrize(
    ("running", "running_alone", "concurrent", "expected"),
    [
        (0, False, 1, True),  # an idle replica always starts the next batch
        (1, False, 1, False),  # one at a time
        (1, False, 2, True),  # room beside a batch that shares the cores
        (1, True, 2, False),  # a batch alone has every core: the next one waits
        (2, False, 2, False),  # no room left
    ],
)
def test_when_another_batch_may_start(
    running: int, running_alone: bool, concurrent: int, expected: bool
) -> None:
    assert may_start(running, running_alone, concurrent) is expected


@pytest.mark.parametrize("concurrent", [1, 2])
def test_under_load_batches_run_side_by_side_none_of_them_alone(concurrent: int) -> None:
    async def scenario() -> FakeModel:
        model = FakeModel(pass_s=0.4)  # one at a time, the second starts well within 100 ms of its end
        queue = make_queue(model, concurrent=concurrent)
        callers = [asyncio.ensure_future(answer(queue, f"t{index}")) for index in range(8)]
        await asyncio.wait_for(asyncio.gather(*callers), 10)
        return model

    model = asyncio.run(scenario())
    assert [len(batch) for batch in model.batches] == [4, 4]
    assert model.peak_passes == concurrent
    # The first left with four behind it; the second started beside the first (or, one at a time,
    # just after it, while the first one's four callers may come back).
    assert model.alone == [False, False]


def test_a_batch_alone_keeps_later_arrivals_waiting_until_it_ends() -> None:
    async def scenario() -> FakeModel:
        model = FakeModel()
        queue = make_queue(model, concurrent=2)
        lone = asyncio.ensure_future(answer(queue, "lone"))
        await model.running.wait()
        later = [asyncio.ensure_future(answer(queue, name)) for name in ("a", "b")]
        await asyncio.wait_for(asyncio.gather(lone, *later), 10)
        return model

    model = asyncio.run(scenario())
    assert model.batches == [["lone"], ["a", "b"]]
    assert model.alone == [True, False]  # they arrived during a pass: more may come during theirs
    assert model.peak_passes == 1


@pytest.mark.parametrize(
    ("last_callers", "ended_ago", "expected"),
    [
        (0, 0.0, False),  # nothing has run yet
        (1, 0.01, False),  # one caller: a lone client's next request runs alone
        (5, 0.01, True),  # several callers, just ended: the rest of them are on their way
        (5, 0.24, True),
        (5, 0.26, False),  # a quarter of the 1 s run has gone: they are not coming soon
    ],
)
def test_when_the_last_batch_s_callers_are_expected_back(
    last_callers: int, ended_ago: float, expected: bool
) -> None:
    assert expects_company(last_callers, 10.0, 11.0, 11.0 + ended_ago) is expected


def test_callers_of_a_shared_batch_coming_back_a_few_at_a_time_run_side_by_side() -> None:
    """8 clients: their next requests come back a few at a time; the first few must not take every
    core and hold the others back (they did: batches of about 5 and 3 took turns, alone)."""

    async def scenario() -> FakeModel:
        model = FakeModel(pass_s=0.4)  # company is expected for a quarter of it: 100 ms, ample
        queue = make_queue(model, concurrent=2)
        await asyncio.wait_for(asyncio.gather(answer(queue, "a"), answer(queue, "b")), 10)
        await second_during_the_first_s_pass(queue, model, "a2", "b2")
        return model

    model = asyncio.run(scenario())
    assert model.batches == [["a", "b"], ["a2"], ["b2"]]
    assert model.alone == [True, False, False]
    assert model.peak_passes == 2


def test_one_caller_s_images_are_one_caller() -> None:
    """A request for several images comes back as one: its next batch may run alone."""

    async def scenario() -> FakeModel:
        model = FakeModel()
        batching = BatchingConfig(max_batch_size=4, batch_wait_timeout_s=0.0)
        queue = BatchQueue(model.run, batching, concurrent=2, caller=str.upper)
        await asyncio.wait_for(asyncio.gather(answer(queue, "a"), answer(queue, "A")), 10)
        await answer(queue, "a")
        return model

    model = asyncio.run(scenario())
    assert model.batches == [["a", "A"], ["a"]]
    assert model.alone == [True, True]


@pytest.mark.parametrize(
    ("last_callers", "back", "ended_ago", "expected"),
    [
        (1, 0, 0.001, 0),  # a lone client's batch: nobody else is coming
        (4, 4, 0.001, 0),  # every caller is back
        (4, 1, 0.001, 3),
        (4, 1, 0.3, 0),  # a quarter of the 1 s run has gone: nobody is expected
    ],
)
def test_how_many_callers_of_the_last_batch_are_on_their_way(
    last_callers: int, back: int, ended_ago: float, expected: int
) -> None:
    assert callers_on_the_way(last_callers, 10.0, 11.0, back, 11.0 + ended_ago) == expected


@pytest.mark.parametrize(
    ("running", "waiting", "on_the_way", "concurrent", "expected"),
    [
        (0, 1, 7, 2, 4),  # 8 clients on two lanes: 4 each, not all 8 on one lane's thread
        (8, 1, 8, 2, 8),  # 16 clients: the task left over waits for 7 more, not a pass of its own
        (4, 1, 3, 2, 4),
        (0, 1, 1, 2, 1),  # 2 clients: one each
        (0, 1, 3, 1, 4),  # one lane: everyone coming
        (8, 8, 8, 2, 8),  # never beyond a full batch
    ],
)
def test_a_batch_s_even_share_of_the_work_running_waiting_and_on_its_way(
    running: int, waiting: int, on_the_way: int, concurrent: int, expected: int
) -> None:
    assert even_share(running, waiting, on_the_way, concurrent, max_batch_size=8) == expected


def test_a_task_left_over_waits_for_the_callers_coming_back_instead_of_leaving_alone() -> None:
    """16 clients on lanes of 8 left one task over from each round, which then waited through a
    pass and left at once, alone, as the lane freed: a pass of one. It now leaves with the callers
    of the batch that just ended, who come back a few at a time."""

    async def scenario() -> list[list[str]]:
        model = FakeModel()
        queue = make_queue(model, max_batch_size=4, company_wait_s=10.0)  # exact: only full or all back
        first = [asyncio.ensure_future(answer(queue, f"a{index}")) for index in range(4)]
        await model.running.wait()
        left_over = asyncio.ensure_future(answer(queue, "left-over"))  # waits through the pass
        await asyncio.wait_for(asyncio.gather(*first), 10)
        back = []
        for index in range(3):  # the callers come back one at a time
            back.append(asyncio.ensure_future(answer(queue, f"b{index}")))
            await asyncio.sleep(0)  # each is submitted before the next comes
        await asyncio.wait_for(asyncio.gather(left_over, *back), 10)
        return model.batches

    batches = asyncio.run(scenario())
    assert batches == [["a0", "a1", "a2", "a3"], ["left-over", "b0", "b1", "b2"]]


def test_callers_that_do_not_come_back_are_waited_for_only_company_wait_s() -> None:
    async def scenario() -> list[list[str]]:
        model = FakeModel()
        queue = make_queue(model, max_batch_size=4, company_wait_s=0.05)
        await asyncio.wait_for(asyncio.gather(*(answer(queue, f"a{index}") for index in range(4))), 10)
        await asyncio.wait_for(answer(queue, "only-one-back"), 10)  # the other three never ask again
        return model.batches

    assert asyncio.run(scenario())[-1] == ["only-one-back"]


def test_callers_of_a_batch_coming_back_split_evenly_over_the_lanes() -> None:
    """8 clients on two lanes: the 8 of a batch that ran alone come back one at a time, and leave
    4 and 4, side by side (waiting for all of them held 8 on one lane while the other idled)."""

    async def scenario() -> FakeModel:
        model = FakeModel()
        queue = make_queue(model, max_batch_size=8, concurrent=2, company_wait_s=10.0)  # exact
        await asyncio.wait_for(asyncio.gather(*(answer(queue, f"a{index}") for index in range(8))), 10)
        back = []
        for index in range(8):  # the callers come back one at a time
            back.append(asyncio.ensure_future(answer(queue, f"b{index}")))
            await asyncio.sleep(0)  # each is submitted before the next comes
        await asyncio.wait_for(asyncio.gather(*back), 10)
        return model

    model = asyncio.run(scenario())
    assert [len(batch) for batch in model.batches] == [8, 4, 4]
    assert model.alone == [True, False, False]
    assert model.peak_passes == 2


@pytest.mark.parametrize(
    ("overlap_ago", "expected"),
    [
        (float("inf"), False),  # no task ever arrived during a pass: a lone client
        (0.5, True),  # half a second ago, passes of 0.1 s: arrivals overlap passes
        (1.1, False),  # over ten passes ago
    ],
)
def test_when_a_task_may_arrive_during_the_next_pass(overlap_ago: float, expected: bool) -> None:
    assert expects_arrivals(11.0 - overlap_ago, 10.9, 11.0, 11.0) is expected


def test_once_tasks_arrive_during_passes_a_lone_task_leaves_the_other_cores_to_the_next() -> None:
    """A task alone takes every core, and one arriving meanwhile waits for it to end. Under an open
    loop, arrivals overlap passes: a lone task then runs on its share, and the next starts beside
    it at once. A client alone (nothing arriving during its passes) still runs alone."""

    async def scenario() -> FakeModel:
        model = FakeModel()
        queue = make_queue(model, concurrent=2)
        await answer(queue, "lone")
        await answer(queue, "lone again")
        await second_during_the_first_s_pass(queue, model, "first", "arrives during its pass")
        await second_during_the_first_s_pass(queue, model, "after", "during")
        return model

    model = asyncio.run(scenario())
    assert model.alone == [True, True, True, False, False, False]
    assert model.batches[-2:] == [["after"], ["during"]]
    assert model.peak_passes == 2  # "during" ran beside "after", not behind it
