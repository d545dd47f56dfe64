"""Concurrent `apply()` of one job in one process share each clip's request.

Keyed by the request's idempotency key (job, clip, content), per event loop: the first caller
sends the request (with its retries), the others await its answer. When the first caller is
cancelled, the next waiter sends the request itself; an error is shared like an answer.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Future]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _table() -> dict[str, asyncio.Future]:
    loop = asyncio.get_running_loop()
    with _lock:
        return _by_loop.setdefault(loop, {})


async def shared(key: str, send: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
    """`(await send(), True)`, or `(the answer another caller's send() got for key, False)`."""
    table = _table()
    while (running := table.get(key)) is not None:
        try:
            return await asyncio.shield(running), False
        except asyncio.CancelledError:
            if not running.cancelled():
                raise  # we were cancelled, not the sender
    mine = asyncio.get_running_loop().create_future()
    table[key] = mine
    try:
        answer = await send()
    except asyncio.CancelledError:
        mine.cancel()
        raise
    except BaseException as exc:
        mine.set_exception(exc)
        mine.exception()  # retrieved: no warning when nobody else was waiting
        raise
    else:
        mine.set_result(answer)
        return answer, True
    finally:
        if table.get(key) is mine:
            del table[key]
