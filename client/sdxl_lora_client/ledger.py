"""The applicator's calls into the ledger: off the event loop, retried while the database is
briefly away, and never left running behind a cancelled caller.

A database that restarts drops every connection and refuses new ones for a second or more; each
call retries a retryable `LedgerError` with backoff (0.1 s doubling to 2 s) until `wait_s` has
passed, then gives up with the last error. A call that is cancelled while its attempt runs in a
thread waits for that attempt to finish before the cancellation goes on, and starts no other: no
write lands after the caller has been told the job is over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sdxl_lora_client.errors import LedgerError

log = logging.getLogger("sdxl_lora_client")
T = TypeVar("T")
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0


class LedgerCalls:
    def __init__(self, threads: concurrent.futures.ThreadPoolExecutor, wait_s: float):
        self.threads = threads
        self.wait_s = wait_s

    async def call(self, fn: Callable[..., T], *args, wait_s: float | None = None) -> T:
        """`fn(*args)` in a thread, retried for up to `wait_s` (default: the ledger's) while the
        database is unavailable; LedgerError when it still is, or for any other failure."""
        give_up_at = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        backoff = FIRST_BACKOFF_S
        attempt = 1
        while True:
            try:
                return await self.attempt(fn, *args)
            except LedgerError as exc:
                if not exc.retryable or time.monotonic() + backoff > give_up_at:
                    raise
                log.info("ledger %s attempt %d failed (%s); again in %.1f s", fn.__name__, attempt, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            attempt += 1

    async def attempt(self, fn: Callable[..., T], *args) -> T:
        """One `fn(*args)` in a thread; a cancelled caller waits for it to end, then is cancelled."""
        future = asyncio.get_running_loop().run_in_executor(self.threads, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await _settled(future)
            raise


async def _settled(future: asyncio.Future) -> None:
    """Wait until `future` is done, whatever it ends with and however often we are cancelled meanwhile."""
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            continue
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning
