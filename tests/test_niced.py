"""NicedWorkers: jobs run on the pool's own threads at nice 19, and every other thread keeps
its priority."""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio

from snapfs.niced import NICENESS, NicedWorkers


def my_priority() -> tuple[int, int]:
    """(this thread's native id, its nice value): Linux keeps one per thread."""
    tid = threading.get_native_id()
    return tid, os.getpriority(os.PRIO_PROCESS, tid)


def test_jobs_run_at_the_lowest_priority_and_nothing_else_does() -> None:
    process_nice = os.getpriority(os.PRIO_PROCESS, 0)

    async def main() -> None:
        cpu = NicedWorkers(2)
        try:
            async with trio.open_nursery() as nursery:
                seen: list[tuple[int, int]] = []

                async def job() -> None:
                    seen.append(await cpu.run(my_priority))

                for _ in range(6):
                    nursery.start_soon(job)
            assert {nice for _tid, nice in seen} == {NICENESS}
            assert threading.get_native_id() not in {tid for tid, _nice in seen}
            # trio's own worker threads, and this one, are left as they were
            assert (await trio.to_thread.run_sync(my_priority))[1] == process_nice
            assert my_priority()[1] == process_nice
        finally:
            cpu.close()

    trio.run(main)


def test_a_job_returns_its_result_and_raises_its_error() -> None:
    async def main() -> None:
        cpu = NicedWorkers(1)
        try:
            assert await cpu.run(sum, [1, 2, 3]) == 6
            with pytest.raises(ZeroDivisionError):
                await cpu.run(lambda: 1 // 0)
            assert await cpu.run(len, b"after an error") == 14  # the thread is still there
        finally:
            cpu.close()

    trio.run(main)


def test_a_cancelled_caller_waits_for_its_job_to_end() -> None:
    # the job holds buffers its caller owns: the caller returns only once it has ended
    ended: list[float] = []

    def job() -> None:
        time.sleep(0.3)
        ended.append(time.monotonic())

    async def main() -> float:
        cpu = NicedWorkers(1)
        try:
            with trio.move_on_after(0.01):
                await cpu.run(job)
            return time.monotonic()
        finally:
            cpu.close()

    returned = trio.run(main)
    assert len(ended) == 1 and ended[0] <= returned


def test_close_ends_the_threads() -> None:
    cpu = NicedWorkers(2)
    both = threading.Barrier(2, timeout=10)  # so that the two jobs take the two threads

    def tid_when_both_run() -> int:
        both.wait()
        return threading.get_native_id()

    async def two_jobs() -> list[int]:
        tids: list[int] = []

        async def job() -> None:
            tids.append(await cpu.run(tid_when_both_run))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(job)
            nursery.start_soon(job)
        return tids

    def alive(tids: list[int]) -> list[int]:
        return [tid for tid in tids if os.path.exists(f"/proc/self/task/{tid}")]

    tids = trio.run(two_jobs)
    assert len(set(tids)) == 2 and alive(tids) == tids
    cpu.close()
    deadline = time.monotonic() + 10  # (joined, a thread may be in the kernel's list an instant)
    while alive(tids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert alive(tids) == []
    again = trio.run(two_jobs)  # a closed pool starts again when used
    assert set(again).isdisjoint(tids)
    cpu.close()
