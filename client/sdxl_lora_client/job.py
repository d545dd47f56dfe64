"""One `apply()` past the status gate: the job's clips side by side, each on the direct path or
the preprocessing path, then their charges, then the job's result.

`JobRun` gets what it needs in a `JobContext` (store, ledger, clients, policy, limits), not the
applicator: the flow reads top to bottom here, and the applicator only configures and bridges.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import partial

from sdxl_lora_client.answers import ImageFetcher, check_generate_answer, check_prediction
from sdxl_lora_client.clip_requests import enhance_request, idempotency_key
from sdxl_lora_client.compat import VideoModel, direct_model
from sdxl_lora_client.contract import ErrorCode, GenerateRequest, GenerateResponse
from sdxl_lora_client.errors import BackendError, ClientCode, LedgerError, ReplicateError
from sdxl_lora_client.ledger import LedgerCalls
from sdxl_lora_client.fair_slots import OldestFirstSlots, Priority
from sdxl_lora_client.options import EnhanceOptions, Pricing
from sdxl_lora_client.outcomes import ApplyResult, ClipOutcome, ClipPrompt, Path
from sdxl_lora_client.preprocessing import PreprocessingBackend
from sdxl_lora_client.replicate import ReplicateClient
from sdxl_lora_client.retry import RetryPolicy
from sdxl_lora_client.sharing import shared
from sdxl_lora_client.store import Charge, LoraRecord, SqlStore, money

__all__ = ["ClipRun", "JobContext", "JobRun"]

log = logging.getLogger("sdxl_lora_client")

STAGE = "lora_application"
API_DIRECT = "lora_direct"
API_PREPROCESSING = "sdxl_lora_preprocessing"
# Failures about one clip's own input (its reference image): the job's other clips still try.
CLIP_OWN_CODES = frozenset({ErrorCode.IMAGE_INVALID})
# A clip that gives up for these leaves its siblings to try on their own: waiting is not failing.
NOT_CONTAGIOUS = CLIP_OWN_CODES | {ErrorCode.BUSY, ClientCode.DEADLINE_EXCEEDED}
# The direct path: one retry, at once, then preprocessing (the spec).
DIRECT_RETRY = RetryPolicy(waits=(0.0,))

Sleep = Callable[[float], Awaitable[None]]
_JOB_ORDER = itertools.count()


@dataclass(frozen=True)
class JobContext:
    """What a job's run uses of its applicator, and nothing more."""

    store: SqlStore
    ledger: LedgerCalls
    preprocessing: PreprocessingBackend | None
    replicate: ReplicateClient | None
    matrix: dict[str, VideoModel]
    pricing: Pricing
    options: EnhanceOptions
    retry: RetryPolicy
    max_concurrent_clips: int
    job_deadline_s: float
    in_flight: OldestFirstSlots  # requests in flight across the applicator's jobs on this loop
    sleep: Sleep
    fetcher: ImageFetcher  # for images delivered by URL


def warning_lines(runs: list[ClipRun]) -> list[str]:
    """One line per reason: clips that fell back for the same reason and detail share it."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for run in runs:
        if run.outcome.reason and run.outcome.reason != ClientCode.NO_CHARACTER_REFERENCE:
            groups.setdefault((run.outcome.status, run.outcome.reason, run.why), []).append(run.clip.clip_id)
    lines = []
    for (status, reason, why), clip_ids in groups.items():
        who = f"clip {clip_ids[0]}" if len(clip_ids) == 1 else f"clips {', '.join(clip_ids)}"
        what = "original reference kept" if status == "original" else "enhanced reference used"
        lines.append(f"{who}: {what} ({reason}: {why})")
    return lines


class ClipRun:
    """One clip's state while its job runs."""

    def __init__(self, clip: ClipPrompt):
        self.clip = clip
        self.outcome = ClipOutcome(clip.clip_id)
        self.why = ""  # with a reason: the detail for the warning
        self.pending: list[Charge] = []  # work done, to be charged once the clip's work is over
        self.unrecorded: list[Charge] = []
        self.priority: Priority = (0.0, 0, 0)  # its job's deadline and order, its place in the job

    def fall_back(self, reason: str, why: str) -> None:
        self.outcome.status, self.outcome.reason, self.outcome.image, self.why = "original", str(reason), None, why


class JobRun:
    """One apply() call past the status gate: the clips side by side, then the job's result."""

    def __init__(self, context: JobContext, job_id: str, record: LoraRecord, deadline: float):
        self.c = context
        self.job_id = job_id
        self.record = record
        self.deadline = deadline  # the event loop's clock
        self.order = next(_JOB_ORDER)  # with the deadline: its clips' place in the applicator's queue
        self.warnings: list[str] = []  # job-wide ones, before the clips'
        # Set once a clip has given up on preprocessing for a reason its siblings would meet too:
        # clips that start later keep their originals at once (clips already running finish their own).
        self.gave_up: tuple[str, str] | None = None
        self.warned_no_identity_score = False

    def warn(self, message: str) -> None:
        log.warning("job %s: %s", self.job_id, message)
        self.warnings.append(message)

    async def run(self, clips: list[ClipPrompt], video_model: str) -> ApplyResult:
        entry = direct_model(self.c.matrix, video_model, self.record.direct_weights)
        if entry is not None and self.c.replicate is None:
            self.warn(f"{video_model} takes LoRAs directly but no Replicate token is configured; preprocessing instead")
            entry = None
        runs = [ClipRun(clip) for clip in clips]
        if entry is None and self.c.preprocessing is None:
            for run in runs:
                run.fall_back(ClientCode.BACKEND_UNAVAILABLE, "no preprocessing backend configured")
        else:
            slots = asyncio.Semaphore(self.c.max_concurrent_clips)
            async with asyncio.TaskGroup() as clips_group:
                for index, run in enumerate(runs):
                    run.priority = (self.deadline, self.order, index)  # oldest job (earliest deadline) first
                    clips_group.create_task(self.one(run, entry, slots))
        return self.result(runs, entry)

    def result(self, runs: list[ClipRun], entry: VideoModel | None) -> ApplyResult:
        warnings = list(self.warnings)
        for line in warning_lines(runs):
            warnings.append(line)
            log.warning("job %s: %s", self.job_id, line)
        outcomes = [run.outcome for run in runs]
        unrecorded = [charge for run in runs for charge in run.unrecorded]
        clips = [run.clip for run in runs]
        if entry is not None and any(o.status == "direct" for o in outcomes):
            return ApplyResult("direct", clips, outcomes, self.record.direct_weights[entry.architecture], warnings,
                               unrecorded)
        path: Path = "preprocessed" if any(o.status == "enhanced" for o in outcomes) else "reference_fallback"
        return ApplyResult(path, clips, outcomes, None, warnings, unrecorded)

    async def one(self, run: ClipRun, entry: VideoModel | None, slots: asyncio.Semaphore) -> None:
        """One clip: its work within the job's deadline, then its charges. Nothing escapes."""
        original = list(run.clip.character_reference_urls)
        try:
            async with slots:
                try:
                    async with asyncio.timeout_at(self.deadline):
                        await (self.direct(run, entry) if entry is not None else self.preprocess(run))
                except TimeoutError:
                    run.fall_back(ClientCode.DEADLINE_EXCEEDED, f"the job's deadline "
                                  f"({self.c.job_deadline_s:g} s) passed")
            await self.record_charges(run)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():  # not apply() being cancelled: a library's own cancel
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

    async def record_charges(self, run: ClipRun) -> None:
        """The clip's charges into the ledger; what it cannot take in time is kept for a replay."""
        while run.pending:
            charge = run.pending[0]
            try:
                new = await self.c.ledger.call(self.c.store.charge, charge.job_id, charge.clip_id, charge.stage,
                                               charge.api_name, charge.cost, charge.details)
                if not new:  # charged by an earlier apply() of this job: this one charged nothing
                    run.outcome.cost -= charge.cost
            except LedgerError as exc:
                log.error("job %s: clip %s: charge of %s not recorded (%s); it is in unrecorded_charges",
                          self.job_id, charge.clip_id, charge.cost, exc)
                run.unrecorded.append(charge)
            run.pending.pop(0)

    def owe(self, run: ClipRun, api_name: str, cost: Decimal, details: dict) -> None:
        run.pending.append(Charge(self.job_id, run.clip.clip_id, STAGE, api_name, money(cost), details))
        run.outcome.cost += money(cost)

    # -- direct path ---------------------------------------------------------------------------

    async def direct(self, run: ClipRun, entry: VideoModel) -> None:
        """The video prediction with the LoRA; after a failure and its one retry, preprocess the clip
        and predict without the LoRA."""
        assert self.c.replicate is not None  # run() goes direct only with a Replicate client
        clip = run.clip
        inputs = {**_video_inputs(clip, entry), entry.lora_field: self.record.direct_weights[entry.architecture]}
        failures = 0
        while True:
            run.outcome.attempts += 1
            try:
                prediction = await self.c.replicate.run(entry.replicate_model, inputs)
                video_url = check_prediction(prediction)
            except ReplicateError as exc:
                failures += 1
                log.info("job %s: clip %s: direct LoRA attempt %d failed: %s", self.job_id, clip.clip_id, failures, exc)
                wait = DIRECT_RETRY.failure_wait(failures)
                if wait is None:
                    return await self.direct_failed(run, entry, exc)
                if wait:
                    await self.c.sleep(wait)
                continue
            clip.video_url = video_url
            self.owe(run, API_DIRECT, self.c.pricing.direct_per_clip,
                     {"model": entry.replicate_model, "attempt": failures + 1, "prediction": prediction.id})
            run.outcome.status = "direct"
            return

    async def direct_failed(self, run: ClipRun, entry: VideoModel, error: ReplicateError) -> None:
        """Preprocess the clip and predict without the LoRA; the outcome says the direct path failed."""
        clip = run.clip
        await self.preprocess(run)
        direct_why = f"the direct LoRA path failed twice ({error})"
        if run.outcome.reason in (None, ClientCode.NO_CHARACTER_REFERENCE):
            run.outcome.reason, run.why = ClientCode.DIRECT_FAILED, direct_why
        else:
            run.why = f"{direct_why}; then {run.why}"
        try:
            clip.video_url = check_prediction(await self.c.replicate.run(entry.replicate_model,
                                                                         _video_inputs(clip, entry)))
        except ReplicateError as exc:
            self.warn(f"clip {clip.clip_id}: video prediction without LoRA failed too: {exc}")

    # -- preprocessing path --------------------------------------------------------------------

    async def preprocess(self, run: ClipRun) -> None:
        """Replace the clip's first character reference with an enhanced one, or leave it as is."""
        clip = run.clip
        if not clip.character_reference_urls:
            run.fall_back(ClientCode.NO_CHARACTER_REFERENCE, "no character reference to enhance")
            return
        if self.c.preprocessing is None:
            run.fall_back(ClientCode.BACKEND_UNAVAILABLE, "no preprocessing backend configured")
            return
        if self.gave_up is not None:
            reason, by = self.gave_up
            run.fall_back(reason, f"preprocessing skipped: {by}")
            return
        request = enhance_request(self.job_id, clip, self.record, self.c.options)
        key = idempotency_key(self.job_id, clip.clip_id, request)
        try:
            # Another apply() of this job in this process may be sending this very request: share it.
            (response, reference), _ = await shared(key, partial(self._generate_with_retries, run, request, key))
        except BackendError as exc:
            run.fall_back(exc.code, str(exc))
            if exc.code not in NOT_CONTAGIOUS:
                self.gave_up = (exc.code, f"clip {clip.clip_id} gave up ({exc.code})")
            return
        image = response.images[0]
        accepted = self._identity_accepted(run, image.identity_score)
        # The service rendered (and billed) the image even when its identity score rejects it.
        self.owe(run, API_PREPROCESSING, self.c.pricing.preprocessing(response),
                 {"seed": image.seed, "sha256": image.sha256, "timings_ms": response.timings_ms.model_dump(),
                  "lora_source": response.loras[0].source if response.loras else None,
                  "identity_score": image.identity_score, "accepted": accepted})
        if accepted:
            clip.character_reference_urls[0] = reference
            run.outcome.status, run.outcome.image = "enhanced", image

    async def _generate_with_retries(self, run: ClipRun, request: GenerateRequest,
                                     key: str) -> tuple[GenerateResponse, str]:
        """The backend call and the check of its answer (the answer and the reference it gives),
        retried on the policy's schedule while the error is retryable; a busy answer waits its
        Retry-After (with jitter) while that fits the job's deadline."""
        assert self.c.preprocessing is not None
        failures = 0
        busy_waited = 0.0
        while True:
            run.outcome.attempts += 1
            try:
                async with self.c.in_flight.hold(run.priority):
                    response = await self.c.preprocessing.agenerate(request, key)
                return response, await check_generate_answer(request, response, self.c.fetcher)
            except BackendError as exc:
                log.info("job %s: clip %s: preprocessing attempt %d failed: %s", self.job_id, run.clip.clip_id,
                         run.outcome.attempts, exc)
                if exc.code == ErrorCode.BUSY:
                    wait = self.c.retry.busy_wait(exc.retry_after_s)
                    if not self._fits_deadline(wait, busy_waited + wait):
                        raise BackendError(f"still busy, and its Retry-After ({wait:.1f} s with jitter) would pass "
                                           f"the job's deadline: {exc}", ErrorCode.BUSY, False) from exc
                    busy_waited += wait
                else:
                    failures += 1
                    next_wait = self.c.retry.failure_wait(failures) if exc.retryable else None
                    if next_wait is None:
                        raise
                    wait = next_wait
                await self.c.sleep(wait)

    def _fits_deadline(self, wait_s: float, waited_s: float) -> bool:
        """Whether waiting `wait_s` more (`waited_s` in all, for this clip) ends before the job's
        deadline; the second test holds where `sleep` does not move the clock (tests)."""
        loop = asyncio.get_running_loop()
        return loop.time() + wait_s <= self.deadline and waited_s <= self.c.job_deadline_s

    def _identity_accepted(self, run: ClipRun, score: float | None) -> bool:
        """False when the enhanced image scored below `min_identity_score`; no score is no veto."""
        minimum = self.c.options.min_identity_score
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


def _video_inputs(clip: ClipPrompt, entry: VideoModel) -> dict[str, str]:
    inputs = {"prompt": clip.prompt}
    if clip.character_reference_urls:
        inputs[entry.image_field] = clip.character_reference_urls[0]
    return inputs

