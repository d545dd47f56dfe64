"""Request slots shared by an applicator's jobs, served oldest job first.

A plain semaphore wakes its waiters in arrival order, so under many jobs every job's clips
interleave and every job finishes near the end of the run. Here a freed slot goes to the waiter
with the smallest priority (its job's start, then its clip's place), so the earliest job finishes
first and a job's latency does not grow with the number of jobs queued behind it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["OldestFirstSlots", "Priority"]

Priority = tuple[float, int, int]  # the job's deadline, the job's order, the clip's place


class OldestFirstSlots:
    """`slots` holders at a time; a freed slot goes to the waiter of smallest priority."""

    def __init__(self, slots: int):
        self._free = slots
        self._waiters: list[tuple[Priority, int, asyncio.Future[None]]] = []
        self._order = itertools.count()  # ties: first come first served

    @asynccontextmanager
    async def hold(self, priority: Priority) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: Priority) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (priority, next(self._order), waiter)
        heapq.heappush(self._waiters, entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot as we were cancelled: pass it on
            elif entry in self._waiters:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():  # a cancelled waiter that has not yet left is passed over
                waiter.set_result(None)
                return
        self._free += 1
