"""The client's one retry policy, used by its four retry loops (preprocessing, the direct path's
Replicate prediction, Replicate's 429s, the ledger), and its one Retry-After parser.

A policy is a wait schedule for failures (the spec's 2 s, 4 s, 8 s for preprocessing), a rule for
`busy` answers (their Retry-After, plus jitter up to as much again, so callers told the same wait
do not come back together), and a deadline none of its waits may pass. A hand-written policy
rather than tenacity: the client's dependencies are pydantic, httpx and SQLAlchemy only (DESIGN.md).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from sdxl_lora_client.contract import RETRY_AFTER_MESSAGE

__all__ = ["DEFAULT_RETRY_AFTER_S", "Deadline", "RetryPolicy", "retry_after_s"]

# A busy answer that names no wait waits this long (plus jitter).
DEFAULT_RETRY_AFTER_S = 1.0
# The contract's "retry after N s", and the looser "Retry-After: 2.5" / "retry_after=4" of other senders.
_RETRY_AFTER_IN_TEXT = re.compile(r"retry[\s_-]*after\D{0,12}?(\d+(?:\.\d+)?)", re.IGNORECASE)


def retry_after_s(header: str | None, message: str = "") -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), else from a message
    ending with the contract's "retry after N s" (or a looser spelling of it); None when neither
    names a wait."""
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(header).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    match = RETRY_AFTER_MESSAGE.search(message) or _RETRY_AFTER_IN_TEXT.search(message)
    return float(match.group(1)) if match else None


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again. `waits`: the wait after the 1st, 2nd, ... failure, then give up
    (`repeat_last`: keep waiting the last one, until a deadline ends it). A busy answer waits its
    Retry-After (`busy_default_s` when it named none, at most `max_busy_wait_s`) times 1 + `jitter()`,
    outside the failure schedule."""

    waits: tuple[float, ...] = (2.0, 4.0, 8.0)
    repeat_last: bool = False
    jitter: Callable[[], float] = random.random
    busy_default_s: float = DEFAULT_RETRY_AFTER_S
    max_busy_wait_s: float | None = None

    def failure_wait(self, failures: int) -> float | None:
        """The wait after the `failures`-th failure (1-based); None: give up."""
        if failures <= len(self.waits):
            return self.waits[failures - 1]
        return self.waits[-1] if self.repeat_last and self.waits else None

    def busy_wait(self, retry_after: float | None) -> float:
        """How long a busy answer waits: its Retry-After, with jitter up to as much again."""
        wait = self.busy_default_s if retry_after is None else retry_after
        if self.max_busy_wait_s is not None:
            wait = min(wait, self.max_busy_wait_s)
        return wait * (1.0 + self.jitter())


class Deadline:
    """A moment on `clock` that no wait may pass."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.seconds = seconds
        self.at = clock() + seconds

    def left(self) -> float:
        return self.at - self.clock()

    def fits(self, wait_s: float) -> bool:
        """Whether waiting `wait_s` from now ends before the deadline."""
        return self.clock() + wait_s <= self.at
