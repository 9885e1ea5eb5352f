"""ForegroundPacer: background disk work rests for the disks' I/O that comes while it runs,
keeps its share of the time then, and does not rest for I/O that ended before it began."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio
import trio.testing

from snapfs.write.pacing import BUSY_WINDOW, UPLOAD_SHARE_WHEN_BUSY, ForegroundPacer

T = TypeVar("T")


def with_mock_clock(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


class Disks:
    """The disks' last I/O, set by the test."""

    def __init__(self) -> None:
        self.last = -1e9

    def io_now(self) -> None:
        self.last = trio.current_time()


def test_quiet_disks_cost_no_rest() -> None:
    async def main() -> float:
        disks = Disks()
        pacer = ForegroundPacer(lambda: disks.last)
        start = trio.current_time()
        for _ in range(10):
            await pacer.pace(0.1)
        return trio.current_time() - start

    assert with_mock_clock(main) == 0


def test_while_the_disks_stay_in_use_the_work_keeps_its_share() -> None:
    async def main() -> float:
        disks = Disks()
        pacer = ForegroundPacer(lambda: disks.last)

        async def foreground(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                             ) -> None:
            disks.io_now()
            task_status.started()
            while True:  # I/O every 0.1 s, closer than the busy window
                await trio.sleep(0.1)
                disks.io_now()

        async with trio.open_nursery() as nursery:
            await nursery.start(foreground)
            began = trio.current_time()
            work = 0.0
            for _ in range(5):  # five steps of 0.2 s of work each, the rest owed jointly
                await trio.sleep(0.2)
                work += 0.2
                await pacer.pace(0.2, since=began)
            nursery.cancel_scope.cancel()
        return work / (trio.current_time() - began)

    assert with_mock_clock(main) == pytest.approx(UPLOAD_SHARE_WHEN_BUSY, rel=0.05)


def test_the_rest_ends_when_the_disks_fall_quiet() -> None:
    async def main() -> float:
        disks = Disks()
        pacer = ForegroundPacer(lambda: disks.last)
        began = trio.current_time()
        disks.io_now()  # one I/O while the work runs, then nothing
        await pacer.pace(1.0, since=began)  # would owe 9 s while busy
        return trio.current_time() - began

    waited = with_mock_clock(main)
    assert BUSY_WINDOW <= waited <= BUSY_WINDOW + 0.06  # (it looks every REST_SLICE)


def test_io_that_ended_before_the_work_began_costs_no_rest() -> None:
    # a script that writes, syncs and snapshots: the upload begins right after the writes,
    # within the busy window of the last one, and the disk is not in use any more
    async def main() -> tuple[float, bool, bool]:
        disks = Disks()
        pacer = ForegroundPacer(lambda: disks.last)
        disks.io_now()
        await trio.sleep(0.01)
        began = trio.current_time()
        await pacer.pace(1.0, since=began)
        rested = trio.current_time() - began
        # the same I/O counts for work that does not say when it began (staging)
        busy_for_staging = pacer.busy()
        disks.io_now()  # and I/O once the work runs counts
        return rested, busy_for_staging, pacer.busy(since=began)

    rested, busy_for_staging, busy_now = with_mock_clock(main)
    assert rested == 0
    assert busy_for_staging and busy_now
