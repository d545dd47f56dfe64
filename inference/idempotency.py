"""Answers kept per idempotency key, so a repeated request is answered without rendering again.

A key's first request renders. A repeat with the same body (compared by a hash of the validated
request) gets the kept answer; a repeat while the first still runs waits for it, holding no place
in the queue; a repeat with another body is `invalid_request`. Only successful answers are kept: a
first request that fails leaves nothing behind, and a repeat (one already waiting included) renders
afresh. Kept answers expire IDEMPOTENCY_TTL_S after they were given, and the oldest go first once
their total size passes IDEMPOTENCY_MAX_BYTES (0 keeps nothing).

IDEMPOTENCY_STORE picks where the keys live: `memory` (this process: MemoryStore, below), or the
fleet's `volume` / `s3` (every worker of the endpoint: inference/idempotency_stores.py); `auto` =
s3 when S3_BUCKET is set, else the cache volume when it is RunPod's, else memory.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from sdxl_lora_client.contract import GenerateRequest, GenerateResponse
from inference.deadline import Deadline
from inference.errors import ErrorCode, ServiceError

# 1..200 visible ASCII characters: what an HTTP header carries unchanged (no spaces, which HTTP
# trims from a value's ends).
KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"
log = logging.getLogger("sdxl_lora.idempotency")


def still_running(key: str) -> ServiceError:
    """A repeat whose deadline passed while the first request with its key still ran (here or on
    another worker): `busy`, so the caller retries after Retry-After and gets the kept answer."""
    return ServiceError(ErrorCode.BUSY, f"the first request with idempotency key {key[:40]!r} is still "
                        "running; its answer is kept for a repeat")


def check_key(key: object) -> str:
    """A RunPod input's `idempotency_key` (the HTTP header is checked by FastAPI with KEY_PATTERN).
    `null` is refused like any other non-string: a caller that sends the field means a key."""
    if not isinstance(key, str) or not re.fullmatch(KEY_PATTERN, key):
        raise ServiceError(ErrorCode.INVALID_REQUEST, "idempotency_key: must be 1..200 visible ASCII characters (no spaces)")
    return key


def request_hash(request: GenerateRequest) -> str:
    """The body's identity: the validated request, so spelling (key order, defaults given or not) does not count."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


def other_body(key: str) -> ServiceError:
    return ServiceError(ErrorCode.INVALID_REQUEST, f"the idempotency key {key!r} was used for another "
                        f"request body; a new request needs a new key")


def answer_size(response: GenerateResponse) -> int:
    return len(response.model_dump_json(exclude_none=True))


@dataclass(eq=False)
class Claim:
    key: str
    first: bool  # the caller renders, then calls keep() or drop()
    # The first request's answer, or None when it failed (or its worker died): then claim again.
    # Waiters only read it: never cancel it.
    outcome: Future = field(default_factory=Future)
    token: object = None  # the store's own handle on the claim


class IdempotencyStore:
    """What every store offers: claim / keep / drop, and `answer` for a synchronous caller."""

    def claim(self, key: str, request: GenerateRequest) -> Claim:
        """The key's claim: a new one that the caller renders for (`first`), or the outcome of the one
        a request with the same body made (kept, or still to come). Another body is `invalid_request`."""
        raise NotImplementedError

    def keep(self, claim: Claim, response: GenerateResponse) -> None:
        """The first request succeeded: keep its answer and hand it to those waiting."""
        raise NotImplementedError

    def drop(self, claim: Claim) -> None:
        """The first request failed: forget the key, so the next request with it renders."""
        raise NotImplementedError

    def answer(self, key: str, request: GenerateRequest, render: Callable[[], GenerateResponse],
               deadline: Deadline) -> GenerateResponse:
        """The kept answer, the one a running first request gives (waited for until `deadline`), or
        `render()`'s, kept for the next repeat."""
        return self.answer_replayed(key, request, render, deadline)[0]

    def answer_replayed(self, key: str, request: GenerateRequest, render: Callable[[], GenerateResponse],
                        deadline: Deadline) -> tuple[GenerateResponse, bool]:
        """`answer`, and whether it is a replay (rendered by another request, here or on another worker)."""
        while True:
            claim = self.claim(key, request)
            if claim.first:
                try:
                    response = render()
                except BaseException:
                    self.drop(claim)
                    raise
                self.keep(claim, response)
                return response, False
            try:
                kept = claim.outcome.result(timeout=max(0.0, deadline.remaining()))
            except FutureTimeout:
                raise still_running(key) from None
            if kept is not None:
                return kept, True


@dataclass(eq=False)
class _Entry:
    key: str
    body_hash: str
    outcome: Future = field(default_factory=Future)
    size: int = 0  # bytes of the kept answer; 0 while the first request runs
    serial: int = field(default_factory=itertools.count().__next__)  # tells a key's entries apart


class MemoryStore(IdempotencyStore):
    """This process's keys: a repeat that RunPod or a load balancer sends to another worker renders
    there. Bounded by IDEMPOTENCY_MAX_BYTES, least recently used first; the expiry queue holds keys
    only, never an answer, so a forgotten answer is freed at once."""

    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._expiry: deque[tuple[float, str, int]] = deque()  # (when, key, entry serial) in expiry order
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, key: str, request: GenerateRequest) -> Claim:
        body_hash = request_hash(request)
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(key, body_hash)
                return Claim(key, True, entry.outcome, entry)
            if entry.body_hash != body_hash:
                raise other_body(key)
            self._entries.move_to_end(key)
            return Claim(key, False, entry.outcome, entry)

    def keep(self, claim: Claim, response: GenerateResponse) -> None:
        entry = claim.token
        size = answer_size(response)
        with self._lock:  # a running first request's entry is never expired nor evicted: it is still there
            if size > self.max_bytes:
                self._forget(entry)
            else:
                entry.size = size
                self.bytes += size
                self._expiry.append((self.clock() + self.ttl_s, entry.key, entry.serial))
                while self.bytes > self.max_bytes:
                    self._forget(next(e for e in self._entries.values() if e.size))
        entry.outcome.set_result(response)

    def drop(self, claim: Claim) -> None:
        with self._lock:
            self._forget(claim.token)
        claim.outcome.set_result(None)

    def _expire(self) -> None:
        now = self.clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, key, serial = self._expiry.popleft()
            entry = self._entries.get(key)
            if entry is not None and entry.serial == serial:
                self._forget(entry)
        # Keys whose answers were evicted early still sit in the queue: drop them once it holds more
        # keys than the store does, so the queue never outgrows the store.
        if len(self._expiry) > 2 * len(self._entries) + 16:
            self._expiry = deque(item for item in self._expiry
                                 if (e := self._entries.get(item[1])) is not None and e.serial == item[2])

    def _forget(self, entry: _Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self.bytes -= entry.size
