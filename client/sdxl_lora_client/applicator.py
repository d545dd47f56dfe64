"""Apply a character LoRA to a video job: status gate, direct vs. preprocessing, fallbacks, costs.

The video job never fails because of this step: `apply()` returns for anything it meets (the
ledger, the service, Replicate, malformed answers, a bug of ours), and each clip's `ClipOutcome`
says what happened; a clip that could not be enhanced keeps its original reference.

The flow is written once, as a coroutine (`_JobRun`). `AsyncLoraApplicator` awaits it on the
caller's event loop; `LoraApplicator` runs it on an event loop of its own in a background thread,
so synchronous code, from any thread, gets exactly the same behaviour. A job's clips run side by
side in a task group (at most `max_concurrent_clips` at a time): when `apply()` ends, whether it
returned, ran out of its deadline or was cancelled, none of them is still running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import json
import logging
import os
import random
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from functools import partial
from typing import Any, Literal, TypeVar

from sdxl_lora_client.compat import VideoModel, direct_model, load_matrix
from sdxl_lora_client.contract import (
    ErrorCode, GenerateRequest, GenerateResponse, ImageOut, LoraSpec, OutputSpec, PrefetchLora, PrefetchRequest,
)
from sdxl_lora_client.errors import BackendError, ClientCode, LedgerError, ReplicateError
from sdxl_lora_client.ledger import LedgerCalls
from sdxl_lora_client.outcomes import ApplyResult, ClipOutcome, ClipPrompt, Path, PrefetchResult
from sdxl_lora_client.replicate import TOKEN_ENV, ReplicateClient
from sdxl_lora_client.sharing import shared
from sdxl_lora_client.store import Charge, LoraRecord, SqlStore, money

__all__ = ["ApplyResult", "AsyncLoraApplicator", "ClipPrompt", "EnhanceOptions", "LoraApplicator", "Pricing",
           "clip_seed"]

log = logging.getLogger("sdxl_lora_client")

STAGE = "lora_application"
API_DIRECT = "lora_direct"
API_PREPROCESSING = "sdxl_lora_preprocessing"
T = TypeVar("T")
# Failures about one clip's own input (its reference image): the job's other clips still try.
CLIP_OWN_CODES = frozenset({ErrorCode.IMAGE_INVALID})
# A clip that gives up for these leaves its siblings to try on their own: waiting is not failing.
NOT_CONTAGIOUS = CLIP_OWN_CODES | {ErrorCode.BUSY, ClientCode.DEADLINE_EXCEEDED}
DEFAULT_JOB_DEADLINE_S = 900.0
DEFAULT_LEDGER_WAIT_S = 30.0
# Requests in flight across every job of one applicator (README: `sdxl-lora bench jobs`).
DEFAULT_MAX_IN_FLIGHT = 8
# A busy answer without a Retry-After waits this long (plus jitter).
DEFAULT_RETRY_AFTER_S = 1.0


@dataclass
class Pricing:
    """Preprocessing: GPU seconds x price when a price is set, else the spec's flat $0.005 per image."""

    per_image: Decimal = Decimal("0.005")
    per_gpu_second: Decimal | None = None
    direct_per_clip: Decimal = Decimal("0.0001")

    def preprocessing(self, response: GenerateResponse) -> Decimal:
        if self.per_gpu_second is not None:
            gpu_ms = Decimal(str(response.timings_ms.adapter)) + Decimal(str(response.timings_ms.inference))
            return money(gpu_ms / 1000 * money(self.per_gpu_second))
        return money(money(self.per_image) * len(response.images))


@dataclass
class EnhanceOptions:
    """How the service renders an enhanced reference."""

    strength: float = 0.6
    num_inference_steps: int = 30
    guidance_scale: float = 7.0
    delivery: Literal["base64", "url"] = "base64"  # "url" needs S3 on the service; base64 becomes a data: URI
    width: int | None = None
    height: int | None = None
    # Below this identity score (the service's CLIP similarity between the reference and the
    # enhanced image) the enhanced image is judged off-character and the original reference kept.
    min_identity_score: float | None = None


Sleep = Callable[[float], Awaitable[None]]


class _Applicator:
    """Configuration shared by both applicators; `_JobRun` does the work.

    `store`: the ledger and LoRA records. `preprocessing`: a backend (`ServiceBackend`,
    `RunPodBackend`, or anything with `generate`/`agenerate`). Replicate (direct path) uses
    `replicate`, else a client for `replicate_token` or `REPLICATE_API_TOKEN`. `retry_waits`: the
    failure schedule; `job_deadline_s` bounds one `apply()`'s LoRA work; `ledger_wait_s` how long a
    ledger call waits for a database that is away. `max_concurrent_clips` bounds one job's clips
    side by side, `max_in_flight` the requests in flight across all jobs of this applicator (on one
    event loop). A `busy` answer waits its Retry-After plus a random share of it (`jitter`, a
    function returning [0, 1)), within the job's deadline, outside the failure schedule.
    `sleep` and `jitter` are there for tests.
    """

    def __init__(self, store: SqlStore, preprocessing=None, replicate_token: str | None = None, *,
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
        self.store = store
        self.preprocessing = preprocessing
        self.replicate = replicate or (ReplicateClient(token) if token else None)
        self.matrix = matrix if matrix is not None else load_matrix()
        self.retry_waits = tuple(retry_waits)
        self.pricing = pricing or Pricing()
        self.options = options or EnhanceOptions()
        self.max_concurrent_clips = max_concurrent_clips
        self.max_in_flight = max_in_flight
        self.job_deadline_s = job_deadline_s
        self.sleep: Sleep = asyncio.sleep if sleep is None else sleep
        self.jitter = jitter
        self._in_flight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary())
        self._in_flight_lock = threading.Lock()
        # Threads of our own for blocking calls, enough for every clip slot to wait on one (a shared
        # default executor has min(32, cores + 4) threads and would cap the concurrency).
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrent_clips + 4,
                                                              thread_name_prefix="lora-apply")
        self.ledger = LedgerCalls(self._threads, ledger_wait_s)
        self._backend_takes_key = _takes_idempotency_key(preprocessing)

    async def blocking(self, fn: Callable[..., T], *args) -> T:
        """A blocking call (a synchronous backend) in one of our threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def in_flight(self) -> asyncio.Semaphore:
        """The running loop's slots for requests in flight, shared by every job of this applicator."""
        loop = asyncio.get_running_loop()
        with self._in_flight_lock:
            return self._in_flight.setdefault(loop, asyncio.Semaphore(self.max_in_flight))

    def busy_wait_s(self, retry_after_s: float | None) -> float:
        """Retry-After, plus jitter up to as much again, so jobs told the same wait do not come
        back together."""
        wait = DEFAULT_RETRY_AFTER_S if retry_after_s is None else retry_after_s
        return wait * (1.0 + self.jitter())

    async def generate(self, request: GenerateRequest, idempotency_key: str) -> GenerateResponse:
        """The backend's coroutine when it has one, else its `generate` in a thread."""
        kwargs = {"idempotency_key": idempotency_key} if self._backend_takes_key else {}
        agenerate = getattr(self.preprocessing, "agenerate", None)
        if agenerate is not None:
            return await agenerate(request, **kwargs)
        return await self.blocking(partial(self.preprocessing.generate, request, **kwargs))

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
        reason = _not_ready_reason(lora_model_id, record)
        if reason:
            return _all_original(job_id, clips, ClientCode.LORA_NOT_READY, reason)
        return await _JobRun(self, job_id, record, deadline).run(clips, video_model)

    async def _prefetch(self, lora_model_id: str) -> PrefetchResult:
        try:
            record = await self.ledger.call(self.store.get_lora, lora_model_id)
            reason = _not_ready_reason(lora_model_id, record)
            if reason:
                return _prefetch_failed(lora_model_id, ClientCode.LORA_NOT_READY, reason)
            request = PrefetchRequest(loras=[PrefetchLora(id=record.id, url=record.url, sha256=record.sha256)])
            aprefetch = getattr(self.preprocessing, "aprefetch", None)
            if aprefetch is not None:
                answer = await aprefetch(request)
            elif hasattr(self.preprocessing, "prefetch"):
                answer = await self.blocking(self.preprocessing.prefetch, request)
            else:
                return _prefetch_failed(lora_model_id, ClientCode.BACKEND_UNAVAILABLE,
                                        "the preprocessing backend cannot prefetch")
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
        for client in (self.preprocessing, self.replicate):
            aclose = getattr(client, "aclose", None)
            if aclose is not None:
                await aclose()

    def _close_clients(self) -> None:
        for client in (self.preprocessing, self.replicate):
            close = getattr(client, "close", None)
            if close is not None:
                close()
        self._threads.shutdown(wait=True)


class LoraApplicator(_Applicator):
    """Apply a LoRA to a video job, for synchronous callers (from any thread, inside a running
    event loop's thread too). The same behaviour as `AsyncLoraApplicator`, on an event loop of its
    own. Use it as a context manager, or call `close()`, to close its loop, threads and the
    backends' connections. `sleep` (tests) may be a plain function; it runs in a thread."""

    def __init__(self, store: SqlStore, preprocessing=None, replicate_token: str | None = None, *,
                 sleep: Callable[[float], Any] | None = None, **kwargs):
        super().__init__(store, preprocessing, replicate_token, **kwargs)
        if sleep is not None:
            self.sleep = sleep if _is_coroutine_function(sleep) else partial(self.blocking, sleep)
        self._loop: _LoopThread | None = None
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

    def _loop_thread(self) -> _LoopThread:
        with self._loop_lock:
            if self._loop is None:
                self._loop = _LoopThread()
            return self._loop

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

    A backend's `agenerate` coroutine is used when it has one (ServiceBackend, RunPodBackend);
    a backend with only `generate` runs it in a worker thread.
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
    """Every clip keeps its references, for one job-wide reason: one warning per clip."""
    outcomes = [ClipOutcome(c.clip_id, reason=reason) for c in clips]
    warnings = [f"clip {c.clip_id}: original reference kept ({reason}: {why})" for c in clips]
    for warning in warnings:
        log.warning("job %s: %s", job_id, warning)
    return ApplyResult("reference_fallback", clips, outcomes, warnings=warnings)


class _ClipRun:
    """One clip's state while its job runs."""

    def __init__(self, clip: ClipPrompt):
        self.clip = clip
        self.outcome = ClipOutcome(clip.clip_id)
        self.why = ""  # with a reason: the detail for the warning
        self.pending: list[Charge] = []  # work done, to be charged once the clip's work is over
        self.unrecorded: list[Charge] = []

    def fall_back(self, reason: str, why: str) -> None:
        self.outcome.status, self.outcome.reason, self.outcome.image, self.why = "original", str(reason), None, why


class _JobRun:
    """One apply() call past the status gate: the clips side by side, then the job's result."""

    def __init__(self, applicator: _Applicator, job_id: str, record: LoraRecord, deadline: float):
        self.a = applicator
        self.job_id = job_id
        self.record = record
        self.deadline = deadline  # the event loop's clock
        self.warnings: list[str] = []  # job-wide ones, before the clips'
        # Set once a clip has given up on preprocessing for a reason its siblings would meet too:
        # clips that start later keep their originals at once (clips already running finish their own).
        self.gave_up: tuple[str, str] | None = None
        self.warned_no_identity_score = False

    def warn(self, message: str) -> None:
        log.warning("job %s: %s", self.job_id, message)
        self.warnings.append(message)

    async def run(self, clips: list[ClipPrompt], video_model: str) -> ApplyResult:
        entry = direct_model(self.a.matrix, video_model, self.record.direct_weights)
        if entry is not None and self.a.replicate is None:
            self.warn(f"{video_model} takes LoRAs directly but no Replicate token is configured; preprocessing instead")
            entry = None
        runs = [_ClipRun(clip) for clip in clips]
        if entry is None and self.a.preprocessing is None:
            for run in runs:
                run.fall_back(ClientCode.BACKEND_UNAVAILABLE, "no preprocessing backend configured")
        else:
            slots = asyncio.Semaphore(self.a.max_concurrent_clips)
            async with asyncio.TaskGroup() as clips_group:
                for run in runs:
                    clips_group.create_task(self.one(run, entry, slots))
        return self.result(runs, entry)

    def result(self, runs: list[_ClipRun], entry: VideoModel | None) -> ApplyResult:
        warnings = list(self.warnings)
        for run in runs:
            if run.outcome.reason and run.outcome.reason != ClientCode.NO_CHARACTER_REFERENCE:
                warnings.append(f"clip {run.clip.clip_id}: original reference kept ({run.outcome.reason}: {run.why})")
                log.warning("job %s: %s", self.job_id, warnings[-1])
        outcomes = [run.outcome for run in runs]
        unrecorded = [charge for run in runs for charge in run.unrecorded]
        clips = [run.clip for run in runs]
        if any(o.status == "direct" for o in outcomes):
            return ApplyResult("direct", clips, outcomes, self.record.direct_weights[entry.architecture], warnings,
                               unrecorded)
        path: Path = "preprocessed" if any(o.status == "enhanced" for o in outcomes) else "reference_fallback"
        return ApplyResult(path, clips, outcomes, None, warnings, unrecorded)

    async def one(self, run: _ClipRun, entry: VideoModel | None, slots: asyncio.Semaphore) -> None:
        """One clip: its work within the job's deadline, then its charges. Nothing escapes."""
        original = list(run.clip.character_reference_urls)
        try:
            async with slots:
                try:
                    async with asyncio.timeout_at(self.deadline):
                        await (self.direct(run, entry) if entry is not None else self.preprocess(run))
                except TimeoutError:
                    run.fall_back(ClientCode.DEADLINE_EXCEEDED, f"the job's deadline "
                                  f"({self.a.job_deadline_s:g} s) passed")
            await self.record_charges(run)
        except asyncio.CancelledError:
            if not asyncio.current_task().cancelling():  # not apply() being cancelled: a library's own cancel
                run.fall_back(ClientCode.CANCELLED, "a call of this clip was cancelled")
                return
            for charge in run.pending:  # apply() was cancelled: nothing is written after it, so say it here
                log.error("job %s: cancelled before the ledger confirmed %r; if job_costs lacks it, "
                          "record_charges([charge]) adds it once", self.job_id, charge)
            raise
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not fail the video job
            log.exception("job %s: clip %s: unexpected error in the LoRA step", self.job_id, run.clip.clip_id)
            run.fall_back(ErrorCode.INTERNAL, f"unexpected {type(exc).__name__}: {exc}")
        if run.outcome.status == "original":
            run.clip.character_reference_urls[:] = original

    async def record_charges(self, run: _ClipRun) -> None:
        """The clip's charges into the ledger; what it cannot take in time is kept for a replay."""
        while run.pending:
            charge = run.pending[0]
            try:
                await self.a.ledger.call(self.a.store.charge, charge.job_id, charge.clip_id, charge.stage,
                                         charge.api_name, charge.cost, charge.details)
            except LedgerError as exc:
                log.error("job %s: clip %s: charge of %s not recorded (%s); it is in unrecorded_charges",
                          self.job_id, charge.clip_id, charge.cost, exc)
                run.unrecorded.append(charge)
            run.pending.pop(0)

    def owe(self, run: _ClipRun, api_name: str, cost: Decimal, details: dict) -> None:
        run.pending.append(Charge(self.job_id, run.clip.clip_id, STAGE, api_name, money(cost), details))
        run.outcome.cost += money(cost)

    # -- direct path ---------------------------------------------------------------------------

    async def direct(self, run: _ClipRun, entry: VideoModel) -> None:
        """The video prediction with the LoRA; after a failure and its one retry, preprocess the clip
        and predict without the LoRA."""
        clip = run.clip
        inputs = {**self._video_inputs(clip, entry), entry.lora_field: self.record.direct_weights[entry.architecture]}
        for attempt in (1, 2):
            run.outcome.attempts += 1
            try:
                prediction = await self.a.replicate.run(entry.replicate_model, inputs)
            except ReplicateError as exc:
                log.info("job %s: clip %s: direct LoRA attempt %d failed: %s", self.job_id, clip.clip_id, attempt, exc)
                continue
            clip.video_url = _output_url(prediction)
            self.owe(run, API_DIRECT, self.a.pricing.direct_per_clip,
                     {"model": entry.replicate_model, "attempt": attempt, "prediction": prediction.get("id")})
            run.outcome.status = "direct"
            return
        await self.preprocess(run)
        try:
            prediction = await self.a.replicate.run(entry.replicate_model, self._video_inputs(clip, entry))
            clip.video_url = _output_url(prediction)
        except ReplicateError as exc:
            self.warn(f"clip {clip.clip_id}: video prediction without LoRA failed too: {exc}")

    @staticmethod
    def _video_inputs(clip: ClipPrompt, entry: VideoModel) -> dict:
        inputs = {"prompt": clip.prompt}
        if clip.character_reference_urls:
            inputs[entry.image_field] = clip.character_reference_urls[0]
        return inputs

    # -- preprocessing path --------------------------------------------------------------------

    async def preprocess(self, run: _ClipRun) -> None:
        """Replace the clip's first character reference with an enhanced one, or leave it as is."""
        clip = run.clip
        if not clip.character_reference_urls:
            run.fall_back(ClientCode.NO_CHARACTER_REFERENCE, "no character reference to enhance")
            return
        if self.a.preprocessing is None:
            run.fall_back(ClientCode.BACKEND_UNAVAILABLE, "no preprocessing backend configured")
            return
        if self.gave_up is not None:
            reason, by = self.gave_up
            run.fall_back(reason, f"preprocessing skipped: {by}")
            return
        request = self._enhance_request(clip)
        key = idempotency_key(self.job_id, clip.clip_id, request)
        try:
            # Another apply() of this job in this process may be sending this very request: share it.
            response, _ = await shared(key, partial(self._generate_with_retries, run, request, key))
        except BackendError as exc:
            run.fall_back(exc.code, str(exc))
            if exc.code not in NOT_CONTAGIOUS:
                self.gave_up = (exc.code, f"clip {clip.clip_id} gave up ({exc.code})")
            return
        image = response.images[0]
        accepted = self._identity_accepted(run, image.identity_score)
        # The service rendered (and billed) the image even when its identity score rejects it.
        self.owe(run, API_PREPROCESSING, self.a.pricing.preprocessing(response),
                 {"seed": image.seed, "sha256": image.sha256, "timings_ms": response.timings_ms.model_dump(),
                  "lora_source": response.loras[0].source if response.loras else None,
                  "identity_score": image.identity_score, "accepted": accepted})
        if accepted:
            clip.character_reference_urls[0] = _reference_of(image)
            run.outcome.status, run.outcome.image = "enhanced", image

    async def _generate_with_retries(self, run: _ClipRun, request: GenerateRequest, key: str) -> GenerateResponse:
        """The backend call, retried after each of `retry_waits` while the error is retryable.

        A hand loop rather than tenacity: the client's dependencies are pydantic, httpx and
        SQLAlchemy only (DESIGN.md).
        """
        waits = iter(self.a.retry_waits)
        busy_waited = 0.0
        while True:
            run.outcome.attempts += 1
            try:
                async with self.a.in_flight():
                    return await self.a.generate(request, key)
            except BackendError as exc:
                log.info("job %s: clip %s: preprocessing attempt %d failed: %s", self.job_id, run.clip.clip_id,
                         run.outcome.attempts, exc)
                if exc.code == ErrorCode.BUSY:
                    wait = self.a.busy_wait_s(exc.retry_after_s)
                    if not self._fits_deadline(wait, busy_waited + wait):
                        raise BackendError(f"still busy, and its Retry-After ({wait:.1f} s with jitter) would pass "
                                           f"the job's deadline: {exc}", ErrorCode.BUSY, False) from exc
                    busy_waited += wait
                else:
                    wait = next(waits, None) if exc.retryable else None
                    if wait is None:
                        raise
                await self.a.sleep(wait)

    def _fits_deadline(self, wait_s: float, waited_s: float) -> bool:
        """Whether waiting `wait_s` more (`waited_s` in all, for this clip) ends before the job's
        deadline; the second test holds where `sleep` does not move the clock (tests)."""
        loop = asyncio.get_running_loop()
        return loop.time() + wait_s <= self.deadline and waited_s <= self.a.job_deadline_s

    def _identity_accepted(self, run: _ClipRun, score: float | None) -> bool:
        """False when the enhanced image scored below `min_identity_score`; no score is no veto."""
        minimum = self.a.options.min_identity_score
        if minimum is None:
            return True
        if score is None:
            if not self.warned_no_identity_score:  # the same for every clip: said once per job
                self.warned_no_identity_score = True
                self.warn(f"no identity score available from the service (SDXL_LORA_IDENTITY_MODEL unset there?); "
                          f"min_identity_score {minimum:g} not checked, enhanced references used")
            return True
        if score < minimum:
            run.fall_back(ClientCode.IDENTITY_REJECTED, f"identity score {score:.4f} below the minimum {minimum:g}")
            return False
        return True

    def _enhance_request(self, clip: ClipPrompt) -> GenerateRequest:
        o = self.a.options
        trigger = (self.record.trigger or "").strip()
        prompt = clip.prompt if not trigger or trigger in clip.prompt else f"{trigger} {clip.prompt}"
        return GenerateRequest(
            prompt=prompt[:2000],
            loras=[LoraSpec(id=self.record.id, url=self.record.url, sha256=self.record.sha256)],
            image=clip.character_reference_urls[0], strength=o.strength, num_inference_steps=o.num_inference_steps,
            guidance_scale=o.guidance_scale, width=o.width, height=o.height, output=OutputSpec(delivery=o.delivery),
            seed=clip_seed(self.job_id, clip.clip_id),
        )


def clip_seed(job_id: str, clip_id: str) -> int:
    """A seed fixed by job and clip, so a replayed job renders the same references."""
    return int(hashlib.sha256(f"{job_id}/{clip_id}".encode()).hexdigest()[:8], 16) % 2**31


def idempotency_key(job_id: str, clip_id: str, request: GenerateRequest) -> str:
    """The request's idempotency key: fixed by job, clip and the request's content (canonical JSON),
    so a replay of the same clip is answered from the service's store and a changed request is not."""
    canonical = json.dumps({"job_id": job_id, "clip_id": clip_id,
                            "request": request.model_dump(mode="json", exclude_none=True)},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _reference_of(image: ImageOut) -> str:
    return image.url or f"data:{image.mime};base64,{image.base64}"


def _output_url(prediction: dict) -> str | None:
    output = prediction.get("output")
    if isinstance(output, list):
        return output[0] if output else None
    return output


def _is_coroutine_function(fn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _takes_idempotency_key(backend) -> bool:
    method = getattr(backend, "agenerate", None) or getattr(backend, "generate", None)
    if method is None:
        return False
    try:
        return "idempotency_key" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


class _LoopThread:
    """An event loop running in a daemon thread: LoraApplicator's jobs all run there, so its
    backends' async clients, limits and shared requests live on one loop, whatever thread calls."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lora-apply-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # the caller was interrupted: the job stops too
            raise

    def close(self, last: Coroutine[Any, Any, Any]) -> None:
        try:
            asyncio.run_coroutine_threadsafe(last, self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()
