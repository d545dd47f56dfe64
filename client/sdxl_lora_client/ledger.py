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
from collections.abc import Callable
from typing import TypeVar

from sdxl_lora_client.errors import LedgerError
from sdxl_lora_client.retry import Deadline, RetryPolicy

log = logging.getLogger("sdxl_lora_client")
T = TypeVar("T")
# 0.1 s doubling to 2 s, then every 2 s until the call's wait is over.
LEDGER_RETRY = RetryPolicy(waits=(0.1, 0.2, 0.4, 0.8, 1.6, 2.0), repeat_last=True)


class LedgerCalls:
    def __init__(self, threads: concurrent.futures.ThreadPoolExecutor, wait_s: float,
                 policy: RetryPolicy = LEDGER_RETRY):
        self.threads = threads
        self.wait_s = wait_s
        self.policy = policy

    async def call(self, fn: Callable[..., T], *args, wait_s: float | None = None) -> T:
        """`fn(*args)` in a thread, retried for up to `wait_s` (default: the ledger's) while the
        database is unavailable; LedgerError when it still is, or for any other failure."""
        deadline = Deadline(self.wait_s if wait_s is None else wait_s)
        failures = 0
        while True:
            try:
                return await self.attempt(fn, *args)
            except LedgerError as exc:
                failures += 1
                wait = self.policy.failure_wait(failures) if exc.retryable else None
                if wait is None or not deadline.fits(wait):
                    raise
                log.info("ledger %s attempt %d failed (%s); again in %.1f s", fn.__name__, failures, exc, wait)
            await asyncio.sleep(wait)

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
