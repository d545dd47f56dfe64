"""Apply a character LoRA to a video job: configuration, the status gate, and the sync and async
facades. The job's flow itself is `job.JobRun`.

The video job never fails because of this step: `apply()` returns for anything it meets (the
ledger, the service, Replicate, malformed answers, a bug of ours), and each clip's `ClipOutcome`
says what happened; a clip that could not be enhanced keeps its original reference.

The flow is written once, as a coroutine. `AsyncLoraApplicator` awaits it on the caller's event
loop; `LoraApplicator` runs it on an event loop of its own in a background thread, so synchronous
code, from any thread, gets exactly the same behaviour. A job's clips run side by side in a task
group (at most `max_concurrent_clips` at a time): when `apply()` ends, whether it returned, ran out
of its deadline or was cancelled, none of them is still running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import random
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from sdxl_lora_client.answers import ImageFetcher
from sdxl_lora_client.clip_requests import clip_seed
from sdxl_lora_client.compat import VideoModel, load_matrix
from sdxl_lora_client.contract import ErrorCode, PrefetchLora, PrefetchRequest
from sdxl_lora_client.errors import BackendError, ClientCode, LedgerError
from sdxl_lora_client.fair_slots import OldestFirstSlots
from sdxl_lora_client.job import JobContext, JobRun, Sleep
from sdxl_lora_client.ledger import LedgerCalls
from sdxl_lora_client.loop_thread import LoopThread
from sdxl_lora_client.options import EnhanceOptions, Pricing
from sdxl_lora_client.outcomes import ApplyResult, ClipOutcome, ClipPrompt, PrefetchResult
from sdxl_lora_client.preprocessing import PreprocessingBackend, aclose_clients, as_backend, close_clients
from sdxl_lora_client.replicate import TOKEN_ENV, ReplicateClient
from sdxl_lora_client.retry import DEFAULT_RETRY_AFTER_S, RetryPolicy
from sdxl_lora_client.store import LoraRecord, SqlStore

__all__ = ["ApplyResult", "AsyncLoraApplicator", "ClipPrompt", "EnhanceOptions", "LoraApplicator", "Pricing",
           "clip_seed"]

log = logging.getLogger("sdxl_lora_client")

# The worst case a hung service costs a job, with the defaults: 4 attempts x the backends' 120 s
# timeout + the 2 + 4 + 8 s waits = 494 s, inside this deadline (README: the arithmetic).
DEFAULT_JOB_DEADLINE_S = 600.0
DEFAULT_LEDGER_WAIT_S = 30.0
# Requests in flight across every job of one applicator (README: `sdxl-lora bench jobs`).
DEFAULT_MAX_IN_FLIGHT = 8


class _Applicator:
    """Configuration shared by both applicators; `job.JobRun` does the work.

    `store`: the ledger and LoRA records. `preprocessing`: a `PreprocessingBackend`
    (`ServiceBackend`, `RunPodBackend`) or a blocking one with `generate(request, idempotency_key)`.
    Replicate (direct path) uses `replicate`, else a client for `replicate_token` or
    `REPLICATE_API_TOKEN`. `retry_waits`: the failure schedule; `job_deadline_s` bounds one
    `apply()`'s LoRA work; `ledger_wait_s` how long a ledger call waits for a database that is away.
    `max_concurrent_clips` bounds one job's clips side by side, `max_in_flight` the requests in
    flight across all jobs of this applicator (on one event loop). A `busy` answer waits its
    Retry-After plus a random share of it (`jitter`, a function returning [0, 1)), within the job's
    deadline, outside the failure schedule. `sleep` and `jitter` are there for tests.
    """

    def __init__(self, store: SqlStore, preprocessing: object = None, replicate_token: str | None = None, *,
                 replicate: ReplicateClient | None = None, matrix: dict[str, VideoModel] | None = None,
                 retry_waits: Sequence[float] = (2.0, 4.0, 8.0), pricing: Pricing | None = None,
                 options: EnhanceOptions | None = None, max_concurrent_clips: int = 4,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, job_deadline_s: float = DEFAULT_JOB_DEADLINE_S,
                 ledger_wait_s: float = DEFAULT_LEDGER_WAIT_S, sleep: Sleep | None = None,
                 jitter: Callable[[], float] = random.random):
        if max_concurrent_clips < 1:
            raise ValueError("max_concurrent_clips must be at least 1")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        token = replicate_token or os.environ.get(TOKEN_ENV)
        # Threads of our own for blocking calls, enough for every clip slot to wait on one (a shared
        # default executor has min(32, cores + 4) threads and would cap the concurrency).
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrent_clips + 4,
                                                              thread_name_prefix="lora-apply")
        self.store = store
        self.preprocessing: PreprocessingBackend | None = as_backend(preprocessing, self._threads)
        self.replicate = replicate or (ReplicateClient(token) if token else None)
        self.matrix = matrix if matrix is not None else load_matrix()
        self.retry = RetryPolicy(waits=tuple(retry_waits), jitter=jitter, busy_default_s=DEFAULT_RETRY_AFTER_S)
        self.pricing = pricing or Pricing()
        self.options = options or EnhanceOptions()
        self.max_concurrent_clips = max_concurrent_clips
        self.max_in_flight = max_in_flight
        self.job_deadline_s = job_deadline_s
        self.sleep: Sleep = asyncio.sleep if sleep is None else sleep
        self._in_flight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, OldestFirstSlots] = (
            weakref.WeakKeyDictionary())
        self._in_flight_lock = threading.Lock()
        self.ledger = LedgerCalls(self._threads, ledger_wait_s)
        self.fetcher = ImageFetcher()

    def in_flight(self) -> OldestFirstSlots:
        """The running loop's slots for requests in flight, shared by every job of this applicator
        and served oldest job first."""
        loop = asyncio.get_running_loop()
        with self._in_flight_lock:
            return self._in_flight.setdefault(loop, OldestFirstSlots(self.max_in_flight))

    def _context(self) -> JobContext:
        return JobContext(self.store, self.ledger, self.preprocessing, self.replicate, self.matrix, self.pricing,
                          self.options, self.retry, self.max_concurrent_clips, self.job_deadline_s, self.in_flight(),
                          self.sleep, self.fetcher)

    async def _apply(self, job_id: str, clips: list[ClipPrompt], video_model: str,
                     lora_model_id: str | None) -> ApplyResult:
        clips = [replace(c, character_reference_urls=list(c.character_reference_urls),
                         scene_reference_urls=list(c.scene_reference_urls)) for c in clips]
        try:
            return await self._apply_copies(job_id, clips, video_model, lora_model_id)
        except Exception as exc:  # noqa: BLE001 - a bug of ours (or of a store passed in) must not fail the video job
            log.exception("job %s: unexpected error in the LoRA step", job_id)
            return _all_original(job_id, clips, ErrorCode.INTERNAL, f"unexpected {type(exc).__name__}: {exc}")

    async def _apply_copies(self, job_id: str, clips: list[ClipPrompt], video_model: str,
                            lora_model_id: str | None) -> ApplyResult:
        if not lora_model_id:
            return ApplyResult("none", clips, [ClipOutcome(c.clip_id) for c in clips])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.job_deadline_s
        wait_s = min(self.ledger.wait_s, self.job_deadline_s)
        try:
            await self.ledger.call(self.store.create_job, job_id, wait_s=wait_s)
            # Read once, at job start: no polling.
            record = await self.ledger.call(self.store.get_lora, lora_model_id, wait_s=wait_s)
        except LedgerError as exc:
            return _all_original(job_id, clips, ClientCode.LEDGER_UNAVAILABLE, f"the ledger is unavailable: {exc}")
        if record is None or _not_ready_reason(lora_model_id, record):
            return _all_original(job_id, clips, ClientCode.LORA_NOT_READY, _not_ready_reason(lora_model_id, record))
        return await JobRun(self._context(), job_id, record, deadline).run(clips, video_model)

    async def _prefetch(self, lora_model_id: str) -> PrefetchResult:
        try:
            record = await self.ledger.call(self.store.get_lora, lora_model_id)
            if record is None or _not_ready_reason(lora_model_id, record):
                return _prefetch_failed(lora_model_id, ClientCode.LORA_NOT_READY,
                                        _not_ready_reason(lora_model_id, record))
            if self.preprocessing is None:
                return _prefetch_failed(lora_model_id, ClientCode.BACKEND_UNAVAILABLE,
                                        "no preprocessing backend configured")
            request = PrefetchRequest(loras=[PrefetchLora(id=record.id, url=record.url, sha256=record.sha256)])
            answer = await self.preprocessing.aprefetch(request)
        except LedgerError as exc:
            return _prefetch_failed(lora_model_id, ClientCode.LEDGER_UNAVAILABLE, str(exc))
        except BackendError as exc:
            return _prefetch_failed(lora_model_id, exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - prefetching is an optimisation: it never fails the caller
            log.exception("prefetch of LoRA %s: unexpected error", lora_model_id)
            return _prefetch_failed(lora_model_id, ErrorCode.INTERNAL, f"unexpected {type(exc).__name__}: {exc}")
        outcome = next((o for o in answer.loras if o.id == lora_model_id), None)
        if outcome is None:
            return _prefetch_failed(lora_model_id, ClientCode.INVALID_ANSWER, "the answer does not name the LoRA",
                                    answer.loras)
        if outcome.status != "cached":
            return _prefetch_failed(lora_model_id, outcome.code or ErrorCode.INTERNAL, outcome.message or "",
                                    answer.loras)
        log.info("prefetch of LoRA %s: cached (sha256 %s)", lora_model_id, outcome.sha256)
        return PrefetchResult(lora_model_id, True, loras=answer.loras)

    async def _aclose_clients(self) -> None:
        await aclose_clients(self.preprocessing, self.replicate, self.fetcher)

    def _close_clients(self) -> None:
        close_clients(self.preprocessing, self.replicate, self.fetcher)
        self._threads.shutdown(wait=True)


class LoraApplicator(_Applicator):
    """Apply a LoRA to a video job, for synchronous callers (from any thread, inside a running
    event loop's thread too). The same behaviour as `AsyncLoraApplicator`, on an event loop of its
    own. Use it as a context manager, or call `close()`, to close its loop, threads and the
    backends' connections. `sleep` (tests) may be a plain function; it runs in a thread."""

    def __init__(self, store: SqlStore, preprocessing: object = None, replicate_token: str | None = None, *,
                 sleep: Callable[[float], Any] | None = None, **kwargs: Any):
        super().__init__(store, preprocessing, replicate_token, **kwargs)
        if sleep is not None:
            self.sleep = sleep if _is_coroutine_function(sleep) else partial(self._blocking_sleep, sleep)
        self._loop: LoopThread | None = None
        self._loop_lock = threading.Lock()

    def apply(self, job_id: str, clips: list[ClipPrompt], video_model: str,
              lora_model_id: str | None) -> ApplyResult:
        """Apply LoRA `lora_model_id` to the clips of `job_id` for `video_model`; never raises for
        the LoRA step (see `ApplyResult`)."""
        return self._loop_thread().run(self._apply(job_id, clips, video_model, lora_model_id))

    def prefetch(self, lora_model_id: str) -> PrefetchResult:
        """Have the service cache the LoRA's file now (when its training completes), so a job's
        first clip does not wait for the download. Never raises: the result says how it went."""
        return self._loop_thread().run(self._prefetch(lora_model_id))

    def _loop_thread(self) -> LoopThread:
        with self._loop_lock:
            if self._loop is None:
                self._loop = LoopThread()
            return self._loop

    async def _blocking_sleep(self, sleep: Callable[[float], Any], seconds: float) -> None:
        await asyncio.get_running_loop().run_in_executor(self._threads, sleep, seconds)

    def close(self) -> None:
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close(self._aclose_clients())
        self._close_clients()

    def __enter__(self) -> LoraApplicator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncLoraApplicator(_Applicator):
    """Apply a LoRA to a video job, for asyncio callers: `await applicator.apply(...)` on any event
    loop. `async with` closes its threads and the backends' connections.

    A `PreprocessingBackend`'s `agenerate` coroutine is awaited (ServiceBackend, RunPodBackend);
    a backend with only a blocking `generate` runs it in a worker thread.
    """

    async def apply(self, job_id: str, clips: list[ClipPrompt], video_model: str,
                    lora_model_id: str | None) -> ApplyResult:
        """Apply LoRA `lora_model_id` to the clips of `job_id` for `video_model`; never raises for
        the LoRA step (see `ApplyResult`). Cancelling it cancels the requests and predictions it
        started, and no charge is written after it."""
        return await self._apply(job_id, clips, video_model, lora_model_id)

    async def prefetch(self, lora_model_id: str) -> PrefetchResult:
        """Have the service cache the LoRA's file now (when its training completes), so a job's
        first clip does not wait for the download. Never raises: the result says how it went."""
        return await self._prefetch(lora_model_id)

    async def aclose(self) -> None:
        await self._aclose_clients()
        self._close_clients()

    async def __aenter__(self) -> AsyncLoraApplicator:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _not_ready_reason(lora_id: str, record: LoraRecord | None) -> str | None:
    if record is None:
        return f"LoRA {lora_id} not found"
    if record.status != "completed":
        return f"LoRA {lora_id} is {record.status}, not completed"
    if not record.url:
        return f"LoRA {lora_id} has no weights URL"
    return None


def _prefetch_failed(lora_id: str, reason: str, message: str, loras=()) -> PrefetchResult:
    log.warning("prefetch of LoRA %s failed (%s: %s)", lora_id, reason, message)
    return PrefetchResult(lora_id, False, str(reason), message, list(loras))


def _all_original(job_id: str, clips: list[ClipPrompt], reason: str, why: str) -> ApplyResult:
    """Every clip keeps its references, for one job-wide reason: one warning for the job."""
    outcomes = [ClipOutcome(c.clip_id, reason=reason) for c in clips]
    warning = f"all {len(clips)} clips: original reference kept ({reason}: {why})"
    log.warning("job %s: %s", job_id, warning)
    return ApplyResult("reference_fallback", clips, outcomes, warnings=[warning])


def _not_ready_reason(lora_id: str, record: LoraRecord | None) -> str:
    """Why the LoRA cannot be applied; empty when it can."""
    if record is None:
        return f"LoRA {lora_id} not found"
    if record.status != "completed":
        return f"LoRA {lora_id} is {record.status}, not completed"
    if not record.url:
        return f"LoRA {lora_id} has no weights URL"
    return ""


def _prefetch_failed(lora_id: str, reason: str, message: str, loras: Sequence[Any] = ()) -> PrefetchResult:
    log.warning("prefetch of LoRA %s failed (%s: %s)", lora_id, reason, message)
    return PrefetchResult(lora_id, False, str(reason), message, list(loras))


def _all_original(job_id: str, clips: list[ClipPrompt], reason: str, why: str) -> ApplyResult:
    """Every clip keeps its references, for one job-wide reason: one warning for the job."""
    outcomes = [ClipOutcome(c.clip_id, reason=reason) for c in clips]
    warning = f"all {len(clips)} clips: original reference kept ({reason}: {why})"
    log.warning("job %s: %s", job_id, warning)
    return ApplyResult("reference_fallback", clips, outcomes, warnings=[warning])


def _is_coroutine_function(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
