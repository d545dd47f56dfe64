"""Answers kept per idempotency key, so a repeated request is answered without rendering again.

A key's first request renders. A repeat with the same body (compared by a hash of the validated
request) gets the kept answer; a repeat while the first still runs waits for it, holding no place
in the queue; a repeat with another body is `invalid_request`. Only successful answers are kept: a
first request that fails leaves nothing behind, and a repeat (one already waiting included) renders
afresh. Kept answers expire IDEMPOTENCY_TTL_S after they were given, and the least recently used
go first once their total size passes IDEMPOTENCY_MAX_BYTES.

The store is per process: a repeat that a load balancer sends to another worker renders there.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from sdxl_lora_client.contract import GenerateRequest, GenerateResponse
from inference.deadline import Deadline, timed_out
from inference.errors import ErrorCode, ServiceError
from inference.settings import Settings

# 1..200 visible ASCII characters: what an HTTP header carries unchanged (no spaces, which HTTP
# trims from a value's ends).
KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"
WAITING = "while waiting for the first request with the same idempotency key"


def check_key(key: object) -> str:
    """A RunPod input's `idempotency_key` (the HTTP header is checked by FastAPI with KEY_PATTERN)."""
    if not isinstance(key, str) or not re.fullmatch(KEY_PATTERN, key):
        raise ServiceError(ErrorCode.INVALID_REQUEST, "idempotency_key: must be 1..200 visible ASCII characters (no spaces)")
    return key


def request_hash(request: GenerateRequest) -> str:
    """The body's identity: the validated request, so spelling (key order, defaults given or not) does not count."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


@dataclass(eq=False)
class _Entry:
    key: str
    body_hash: str
    # The first request's answer, or None when it failed. Waiters only read it: never cancel it.
    outcome: Future = field(default_factory=Future)
    size: int = 0  # bytes of the kept answer; 0 while the first request runs


@dataclass(frozen=True)
class Claim:
    entry: _Entry
    first: bool  # the caller renders, then calls keep() or drop()

    @property
    def outcome(self) -> Future:
        return self.entry.outcome


class IdempotencyStore:
    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._expiry: deque[tuple[float, _Entry]] = deque()  # kept answers, in the order they expire
        self.bytes = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> IdempotencyStore:
        return cls(settings.idempotency_ttl_s, settings.idempotency_max_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, key: str, request: GenerateRequest) -> Claim:
        """The key's entry: a new one that the caller renders for (`first`), or the one a request with
        the same body made (its outcome kept or still to come). Another body is `invalid_request`."""
        body_hash = request_hash(request)
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(key, body_hash)
                return Claim(entry, first=True)
            if entry.body_hash != body_hash:
                raise ServiceError(ErrorCode.INVALID_REQUEST, f"the idempotency key {key!r} was used for another "
                                   f"request body; a new request needs a new key")
            self._entries.move_to_end(key)
            return Claim(entry, first=False)

    def keep(self, claim: Claim, response: GenerateResponse) -> None:
        """The first request succeeded: keep its answer and hand it to those waiting."""
        entry = claim.entry
        size = len(response.model_dump_json(exclude_none=True))
        with self._lock:  # a running first request's entry is never expired nor evicted: it is still there
            entry.size = size
            self.bytes += size
            self._expiry.append((self.clock() + self.ttl_s, entry))
            while self.bytes > self.max_bytes:
                self._forget(next(e for e in self._entries.values() if e.size))
        entry.outcome.set_result(response)

    def drop(self, claim: Claim) -> None:
        """The first request failed: forget the key, so the next request with it renders."""
        with self._lock:
            self._forget(claim.entry)
        claim.outcome.set_result(None)

    def answer(self, key: str, request: GenerateRequest, render: Callable[[], GenerateResponse],
               deadline: Deadline) -> GenerateResponse:
        """For a synchronous caller: the kept answer, the one a running first request gives (waited for
        until `deadline`), or `render()`'s, kept for the next repeat."""
        while True:
            claim = self.claim(key, request)
            if claim.first:
                try:
                    response = render()
                except BaseException:
                    self.drop(claim)
                    raise
                self.keep(claim, response)
                return response
            try:
                kept = claim.outcome.result(timeout=max(0.0, deadline.remaining()))
            except FutureTimeout:
                raise timed_out(deadline, WAITING) from None
            if kept is not None:
                return kept

    def _expire(self) -> None:
        now = self.clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, entry = self._expiry.popleft()
            if self._entries.get(entry.key) is entry:
                self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        del self._entries[entry.key]
        self.bytes -= entry.size
