"""The fleet's idempotency store: one record per key, on the cache volume or on S3, so a key answered
by one RunPod worker is answered by every other worker byte for byte, and twins render once.

A record is named by the sha256 of its key (a key never becomes a path or an object name as written)
and holds a JSON header line, then the answer:
- running: `{"body", "owner", "lease_until"}`. Claimed by an atomic create; the claimer renews the
  lease every third of IDEMPOTENCY_LEASE_S while it renders. A worker that meets a running record
  waits (a poller reads it) until the answer comes, the claim is dropped, or the lease runs out
  (its worker died): then it claims again and renders.
- done: `{"body", "expires"}` and the answer's JSON. Past `expires` (IDEMPOTENCY_TTL_S) it is as if
  absent. After each answer kept, the oldest records go until all fit IDEMPOTENCY_MAX_BYTES.
A stale record (lease or TTL run out) is taken over by an atomic create of a marker named after it,
so only one worker takes it. Leases and TTLs are on the wall clock: the workers' clocks must agree to
well within a lease (NTP does).

The backends (inference/idempotency_backends.py) say how atomic each write is. A claim is an
atomic create; a renewal and a dropped claim are conditional on the version this worker read, so a
worker that stalled past its lease never overwrites or deletes the claim another worker took over
(exact on S3 with `If-Match`; on the volume the version is checked just before the rename). A store
that ignores the conditions lets both creates win: the key renders twice, the later answer
replaces the earlier one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

from sdxl_lora_client.contract import GenerateRequest, GenerateResponse
from inference.idempotency import Claim, IdempotencyStore, MemoryStore, other_body, request_hash
from inference.idempotency_backends import S3Backend, VolumeBackend
from inference.settings import RUNPOD_VOLUME, Settings
from inference.sources import make_s3_client

log = logging.getLogger("sdxl_lora.idempotency")
POLL_S = 0.2  # how often a waiter reads a record claimed elsewhere, and the renewal timer's tick
STALE = ".stale."  # a takeover marker's name: <record>.stale.<the stale record's stamp>


def store_from_settings(settings: Settings) -> IdempotencyStore:
    """IDEMPOTENCY_STORE: `auto` is S3 with a bucket, else the RunPod volume, else this process's memory."""
    kind = settings.idempotency_store
    if kind == "auto" and settings.s3_bucket:
        kind = "s3"
    elif kind == "auto" and _on_runpod_volume(settings):
        try:
            return _shared_store("volume", settings)
        except OSError as exc:  # the volume could not be prepared: the LoRA cache falls back too
            log.warning("idempotency keys kept by this worker only: %s is not writable (%s)",
                        settings.lora_cache_dir.parent, exc.strerror or exc)
            kind = "memory"
    if kind in ("auto", "memory"):
        return MemoryStore(settings.idempotency_ttl_s, settings.idempotency_max_bytes)
    return _shared_store(kind, settings)


def _on_runpod_volume(settings: Settings) -> bool:
    """Whether the LoRA cache is RunPod's network volume, shared by every worker of the endpoint."""
    return settings.lora_cache_dir.is_relative_to(RUNPOD_VOLUME) and RUNPOD_VOLUME.is_dir()


def _shared_store(kind: str, settings: Settings) -> SharedStore:
    if kind == "s3":
        if not settings.s3_bucket:
            raise ValueError("SDXL_LORA_IDEMPOTENCY_STORE=s3 needs SDXL_LORA_S3_BUCKET")
        backend: VolumeBackend | S3Backend = S3Backend(make_s3_client(settings.s3_endpoint_url, timeout_s=10.0),
                                                       settings.s3_bucket, f"{settings.s3_prefix}idempotency/")
    else:
        backend = VolumeBackend(settings.lora_cache_dir.parent / "idempotency")
    return SharedStore(backend, settings.idempotency_ttl_s, settings.idempotency_max_bytes,
                       settings.idempotency_lease_s)


@dataclass
class Record:
    body: str
    stamp: str  # names this version of the record (a stale one is taken over once)
    owner: str | None = None
    lease_until: float = 0.0
    expires: float | None = None  # set once done
    answer: bytes = b""

    def stale(self, now: float) -> bool:
        return (self.expires if self.expires is not None else self.lease_until) <= now

    @classmethod
    def parse(cls, data: bytes) -> Record:
        header, _, answer = data.partition(b"\n")
        try:
            fields = json.loads(header)
            return cls(body=fields["body"], stamp=fields["stamp"], owner=fields.get("owner"),
                       lease_until=fields.get("lease_until", 0.0), expires=fields.get("expires"), answer=answer)
        except (ValueError, KeyError, TypeError):  # not ours, or damaged: stale at once
            return cls(body="", stamp=hashlib.sha256(data).hexdigest()[:16], expires=0.0)

    def dump(self) -> bytes:
        fields = {"body": self.body, "stamp": self.stamp, "owner": self.owner, "lease_until": self.lease_until}
        if self.expires is not None:
            fields = {"body": self.body, "stamp": self.stamp, "expires": self.expires}
        return json.dumps(fields).encode() + b"\n" + self.answer


class SharedStore(IdempotencyStore):
    """Keys shared by every worker that uses the same backend (see the module's docstring)."""

    def __init__(self, backend, ttl_s: float, max_bytes: int, lease_s: float, poll_s: float = POLL_S):
        self.backend, self.ttl_s, self.max_bytes, self.lease_s, self.poll_s = backend, ttl_s, max_bytes, lease_s, poll_s
        self.owner = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._mine: dict[str, Claim] = {}  # claims this process renders: renewed; local repeats wait on them
        self._renewed: dict[str, float] = {}
        self._watched: dict[str, Future] = {}  # claims held elsewhere, read by the poller
        self._io = threading.Lock()  # a renewal never lands after keep/drop wrote
        self._poller: threading.Thread | None = None
        self._closed = threading.Event()

    def claim(self, key: str, request: GenerateRequest) -> Claim:
        name = hashlib.sha256(key.encode()).hexdigest()
        body = request_hash(request)
        while True:
            with self._lock:
                local = self._mine.get(name)
            if local is not None:
                if local.token[1] != body:
                    raise other_body(key)
                return Claim(key, False, local.outcome)
            if self.backend.create(name, self._running(body).dump()):
                return self._mine_now(key, name, body)
            data = self.backend.read(name)
            if data is None:
                continue  # dropped meanwhile: claim again
            record = Record.parse(data)
            if record.stale(time.time()):
                if self._take_over(name, record, body):
                    return self._mine_now(key, name, body)
                time.sleep(self.poll_s)  # another worker is taking it over: read what it wrote
                continue
            if record.body != body:
                raise other_body(key)
            if record.expires is not None:
                done: Future = Future()
                done.set_result(GenerateResponse.model_validate_json(record.answer))
                return Claim(key, False, done)
            return Claim(key, False, self._watch(name))

    def keep(self, claim: Claim, response: GenerateResponse) -> None:
        name, body = claim.token
        answer = response.model_dump_json(exclude_none=True).encode()
        with self._io:
            self._forget_mine(name)
            record = Record(body=body, stamp=uuid.uuid4().hex, expires=time.time() + self.ttl_s, answer=answer)
            if len(answer) > self.max_bytes:
                self.backend.delete(name)
            else:
                self.backend.write(name, record.dump())
        claim.outcome.set_result(response)
        self._trim()

    def drop(self, claim: Claim) -> None:
        name, _ = claim.token
        with self._io:
            self._forget_mine(name)
            found = self.backend.read_versioned(name)
            if found is not None and Record.parse(found[0]).owner == self.owner:
                self.backend.delete_if(name, found[1])  # not a claim taken over meanwhile
        claim.outcome.set_result(None)

    # -- claims ------------------------------------------------------------------------------

    def _running(self, body: str) -> Record:
        return Record(body=body, stamp=uuid.uuid4().hex, owner=self.owner, lease_until=time.time() + self.lease_s)

    def _mine_now(self, key: str, name: str, body: str) -> Claim:
        claim = Claim(key, True, Future(), (name, body))
        with self._lock:
            self._mine[name] = claim
            self._renewed[name] = time.monotonic()
        self._start_poller()
        return claim

    def _forget_mine(self, name: str) -> None:
        with self._lock:
            self._mine.pop(name, None)
            self._renewed.pop(name, None)

    def _take_over(self, name: str, stale: Record, body: str) -> bool:
        """Replace a stale record, if this worker is the one that marks it first."""
        if not self.backend.create(f"{name}{STALE}{stale.stamp}", b""):
            return False
        self.backend.write(name, self._running(body).dump())
        log.info("idempotency record %s… was stale (%s): taken over", name[:12],
                 "expired" if stale.expires is not None else "its worker's lease ran out")
        return True

    def _watch(self, name: str) -> Future:
        with self._lock:
            outcome = self._watched.get(name)
            if outcome is None or outcome.done():
                outcome = self._watched[name] = Future()
        self._start_poller()
        return outcome

    # -- the poller: renews this worker's leases, reads the records it waits on ------------------

    def close(self) -> None:
        """Stop the poller: this worker's leases run out and other workers take its keys over."""
        self._closed.set()

    def _start_poller(self) -> None:
        with self._lock:
            if self._poller is None and not self._closed.is_set() and (self._mine or self._watched):
                self._poller = threading.Thread(target=self._poll_forever, name="idempotency-poller", daemon=True)
                self._poller.start()

    def _poll_forever(self) -> None:
        """Until nothing is left to renew or wait for (the next claim starts it again) or `close`."""
        failing = False
        while not self._closed.wait(self.poll_s):
            with self._lock:
                if not self._mine and not self._watched:
                    self._poller = None
                    return
            try:
                self._renew()
                self._read_watched()
            except Exception as exc:  # a flaky backend must not end the poller: the next tick tries again
                if not failing:
                    log.exception("idempotency poller: the store is not answering")
                else:
                    log.debug("idempotency poller still failing: %s", exc)
                failing = True
            else:
                if failing:
                    log.info("idempotency poller: the store answers again")
                failing = False

    def _renew(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(name, self._mine[name].token[1]) for name, renewed in self._renewed.items()
                   if now - renewed >= self.lease_s / 3]
        for name, body in due:
            with self._io:
                if name not in self._renewed:
                    continue  # kept or dropped meanwhile
                if self._renewed_in_place(name, body):
                    self._renewed[name] = now
                else:
                    log.warning("idempotency record %s… was taken over while this worker rendered it: "
                                "its lease is no longer renewed", name[:12])
                    del self._renewed[name]  # local repeats still wait on this render

    def _renewed_in_place(self, name: str, body: str) -> bool:
        """Write a new lease over this worker's record, unless another worker's claim replaced it."""
        found = self.backend.read_versioned(name)
        if found is None:  # deleted by a sweep or an operator: claim it again
            return self.backend.create(name, self._running(body).dump())
        if Record.parse(found[0]).owner != self.owner:
            return False
        return self.backend.replace(name, self._running(body).dump(), found[1])

    def _read_watched(self) -> None:
        with self._lock:
            watched = list(self._watched.items())
        for name, outcome in watched:
            data = self.backend.read(name)
            record = Record.parse(data) if data is not None else None
            if record is not None and record.expires is not None and not record.stale(time.time()):
                outcome.set_result(GenerateResponse.model_validate_json(record.answer))
            elif record is None or record.stale(time.time()):
                outcome.set_result(None)  # dropped, or its worker died: the caller claims again
            else:
                continue
            with self._lock:
                if self._watched.get(name) is outcome:
                    del self._watched[name]

    # -- TTL and byte cap across the fleet -----------------------------------------------------

    def _trim(self) -> None:
        """Delete expired records and stale markers, then the oldest answers until all fit max_bytes."""
        now = time.time()
        records = sorted(self.backend.listing(), key=lambda item: item[2])
        total = sum(size for _, size, _ in records)
        for name, size, modified in records:
            if total <= self.max_bytes and not self._expired(name, modified, now):
                continue
            if STALE not in name and self._claimed(name):
                continue  # a running claim (this worker's or another's) stays
            self.backend.delete(name)
            total -= size

    def _expired(self, name: str, modified: float, now: float) -> bool:
        """By the listing's time (S3's is in whole seconds: one more is allowed); a read checks the
        record's own expiry, so a record the sweep has not reached yet is not served past its TTL."""
        lasts = self.ttl_s + self.lease_s if STALE in name else self.ttl_s
        return modified + lasts + 1.0 < now

    def _claimed(self, name: str) -> bool:
        data = self.backend.read(name)
        if data is None:
            return False
        record = Record.parse(data)
        return record.expires is None and not record.stale(time.time())
