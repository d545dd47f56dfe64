"""Apply a character LoRA to a video job: status gate, direct vs. preprocessing, fallbacks, costs.

The video job never fails because of this step: every failure degrades to the original
reference images, with a warning saying what happened.

The flow is written once, as a coroutine (`_JobRun`). `AsyncLoraApplicator` awaits it on the
caller's event loop; `LoraApplicator` runs it on a private one, so synchronous code gets exactly
the same behaviour. A job's clips run side by side, at most `max_concurrent_clips` at a time,
each with its own retries and fallback; blocking calls (the SQL store, the Replicate client, a
synchronous backend) run in worker threads so they never stall the other clips.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, TypeVar

from sdxl_lora_client.backends import BackendError
from sdxl_lora_client.compat import VideoModel, direct_model, load_matrix
from sdxl_lora_client.contract import ErrorCode, GenerateRequest, GenerateResponse, LoraSpec, OutputSpec
from sdxl_lora_client.replicate import ReplicateClient, ReplicateError
from sdxl_lora_client.store import LoraRecord, SqlStore

log = logging.getLogger("sdxl_lora.client")

STAGE = "lora_application"
API_DIRECT = "lora_direct"
API_PREPROCESSING = "sdxl_lora_preprocessing"
Path_ = Literal["none", "reference_fallback", "direct", "preprocessed"]
T = TypeVar("T")
# Failures about one clip's own input (its reference image): the job's other clips still try.
CLIP_OWN_CODES = frozenset({ErrorCode.IMAGE_INVALID})


@dataclass
class ClipPrompt:
    clip_id: str
    prompt: str
    character_reference_urls: list[str] = field(default_factory=list)
    scene_reference_urls: list[str] = field(default_factory=list)
    video_url: str | None = None  # set when the client itself ran the video prediction (direct path)


@dataclass
class ApplyResult:
    path: Path_
    clips: list[ClipPrompt]
    lora_url: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Pricing:
    """Preprocessing: GPU seconds x price when a price is set, else the spec's flat $0.005 per image."""

    per_image: float = 0.005
    per_gpu_second: float | None = None
    direct_per_clip: float = 0.0001

    def preprocessing(self, response: GenerateResponse) -> float:
        if self.per_gpu_second is not None:
            return (response.timings_ms.adapter + response.timings_ms.inference) / 1e3 * self.per_gpu_second
        return self.per_image * len(response.images)


@dataclass
class EnhanceOptions:
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
    """Configuration shared by both applicators; `_JobRun` does the work."""

    def __init__(self, store: SqlStore, preprocessing=None, replicate_token: str | None = None, *,
                 replicate: ReplicateClient | None = None, matrix: dict[str, VideoModel] | None = None,
                 retry_waits: Sequence[float] = (2.0, 4.0, 8.0), pricing: Pricing | None = None,
                 options: EnhanceOptions | None = None, max_concurrent_clips: int = 4, sleep: Sleep | None = None):
        if max_concurrent_clips < 1:
            raise ValueError("max_concurrent_clips must be at least 1")
        self.store = store
        self.preprocessing = preprocessing
        self.replicate = replicate or (ReplicateClient(replicate_token) if replicate_token else None)
        self.matrix = matrix if matrix is not None else load_matrix()
        self.retry_waits = tuple(retry_waits)
        self.pricing = pricing or Pricing()
        self.options = options or EnhanceOptions()
        self.max_concurrent_clips = max_concurrent_clips
        self.sleep: Sleep = asyncio.sleep if sleep is None else sleep
        # Threads of our own for blocking calls, enough for every clip slot to wait on one (a shared
        # default executor has min(32, cores + 4) threads and would cap the concurrency).
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrent_clips + 2,
                                                              thread_name_prefix="lora-apply")

    async def blocking(self, fn: Callable[..., T], *args) -> T:
        """A blocking call (SQL, a synchronous HTTP client) in one of our threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def _generate(self, request: GenerateRequest) -> GenerateResponse:
        raise NotImplementedError

    async def _apply(self, job_id: str, clips: list[ClipPrompt], video_model: str,
                     lora_model_id: str | None) -> ApplyResult:
        clips = [replace(c, character_reference_urls=list(c.character_reference_urls),
                         scene_reference_urls=list(c.scene_reference_urls)) for c in clips]
        if not lora_model_id:
            return ApplyResult("none", clips)
        await self.blocking(self.store.create_job, job_id)
        record = await self.blocking(self.store.get_lora, lora_model_id)  # read once, at job start: no polling
        reason = _not_ready_reason(lora_model_id, record)
        if reason:
            log.warning("LoRA not applied: %s; using the original reference images", reason)
            return ApplyResult("reference_fallback", clips, warnings=[f"{reason}; original reference images used"])
        return await _JobRun(self, job_id, record).run(clips, video_model)


class LoraApplicator(_Applicator):
    """For synchronous callers. `sleep` (tests) may be a plain function; it runs in a thread."""

    def __init__(self, store: SqlStore, preprocessing=None, replicate_token: str | None = None, *,
                 sleep: Callable[[float], Any] | None = None, **kwargs):
        super().__init__(store, preprocessing, replicate_token, **kwargs)
        if sleep is not None:
            self.sleep = sleep if _is_coroutine_function(sleep) else partial(self.blocking, sleep)

    def apply(self, job_id: str, clips: list[ClipPrompt], video_model: str, lora_model_id: str | None) -> ApplyResult:
        return _run_to_completion(self._apply(job_id, clips, video_model, lora_model_id))

    async def _generate(self, request: GenerateRequest) -> GenerateResponse:
        return await self.blocking(self.preprocessing.generate, request)


class AsyncLoraApplicator(_Applicator):
    """For asyncio callers: the same behaviour as LoraApplicator, awaited on the caller's loop.

    A backend's `agenerate` coroutine is used when it has one (ServiceBackend, RunPodBackend);
    a backend with only `generate` runs it in a worker thread.
    """

    async def apply(self, job_id: str, clips: list[ClipPrompt], video_model: str,
                    lora_model_id: str | None) -> ApplyResult:
        return await self._apply(job_id, clips, video_model, lora_model_id)

    async def _generate(self, request: GenerateRequest) -> GenerateResponse:
        agenerate = getattr(self.preprocessing, "agenerate", None)
        if agenerate is not None:
            return await agenerate(request)
        return await self.blocking(self.preprocessing.generate, request)


def _not_ready_reason(lora_id: str, record: LoraRecord | None) -> str | None:
    if record is None:
        return f"LoRA {lora_id} not found"
    if record.status != "completed":
        return f"LoRA {lora_id} is {record.status}, not completed"
    if not record.url:
        return f"LoRA {lora_id} has no weights URL"
    return None


class _ClipRun:
    """One clip's outcome: its own warnings (merged in clip order, so the job's list is stable)."""

    def __init__(self, clip: ClipPrompt):
        self.clip = clip
        self.warnings: list[str] = []
        self.enhanced = False
        self.direct = False


class _JobRun:
    """One apply() call past the status gate: the clips side by side, then the job's result."""

    def __init__(self, applicator: _Applicator, job_id: str, record: LoraRecord):
        self.a = applicator
        self.job_id = job_id
        self.record = record
        self.warnings: list[str] = []  # job-wide ones, before the clips'
        # Set once a clip has given up on preprocessing: clips that start later keep their originals
        # at once instead of paying the same retries (clips already running finish their own).
        self.backend_gave_up = False
        self.warned_no_identity_score = False

    def warn(self, message: str, clip: _ClipRun | None = None) -> None:
        log.warning("job %s: %s", self.job_id, message)
        (clip.warnings if clip else self.warnings).append(message)

    async def run(self, clips: list[ClipPrompt], video_model: str) -> ApplyResult:
        entry = direct_model(self.a.matrix, video_model, self.record.direct_weights)
        if entry is not None and self.a.replicate is None:
            self.warn(f"{video_model} takes LoRAs directly but no Replicate token is configured; preprocessing instead")
            entry = None
        if entry is None and self.a.preprocessing is None:
            self.warn("no preprocessing backend configured")
            return ApplyResult("reference_fallback", clips, warnings=self.warnings)

        slots = asyncio.Semaphore(self.a.max_concurrent_clips)

        async def one(clip: ClipPrompt) -> _ClipRun:
            run = _ClipRun(clip)
            async with slots:
                if entry is not None:
                    await self.direct(run, entry)
                else:
                    await self.preprocess(run)
            return run

        runs = await asyncio.gather(*(one(clip) for clip in clips))
        warnings = self.warnings + [w for run in runs for w in run.warnings]
        if any(run.direct for run in runs):
            return ApplyResult("direct", clips, lora_url=self.record.direct_weights[entry.architecture],
                               warnings=warnings)
        path: Path_ = "preprocessed" if any(run.enhanced for run in runs) else "reference_fallback"
        return ApplyResult(path, clips, warnings=warnings)

    # -- direct path ---------------------------------------------------------------------------

    async def direct(self, run: _ClipRun, entry: VideoModel) -> None:
        """The video prediction with the LoRA; after a failure and its one retry, preprocess the clip
        and predict without the LoRA."""
        clip = run.clip
        inputs = {**self._video_inputs(clip, entry), entry.lora_field: self.record.direct_weights[entry.architecture]}
        for attempt in (1, 2):
            try:
                prediction = await self.a.blocking(self.a.replicate.run, entry.replicate_model, inputs)
            except ReplicateError as exc:
                self.warn(f"clip {clip.clip_id}: direct LoRA attempt {attempt} failed: {exc}", run)
                continue
            clip.video_url = _output_url(prediction)
            await self.a.blocking(self.a.store.charge, self.job_id, clip.clip_id, STAGE, API_DIRECT,
                            self.a.pricing.direct_per_clip, {"model": entry.replicate_model, "attempt": attempt})
            run.direct = True
            return
        await self.preprocess(run)
        try:
            prediction = await self.a.blocking(self.a.replicate.run, entry.replicate_model, self._video_inputs(clip, entry))
            clip.video_url = _output_url(prediction)
        except ReplicateError as exc:
            self.warn(f"clip {clip.clip_id}: video prediction without LoRA failed too: {exc}", run)

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
            return
        if self.a.preprocessing is None or self.backend_gave_up:
            self.warn(f"clip {clip.clip_id}: preprocessing skipped (backend unavailable); original reference kept", run)
            return
        try:
            response = await self._generate_with_retries(run, self._enhance_request(clip))
        except BackendError as exc:
            if exc.code in CLIP_OWN_CODES:
                self.warn(f"clip {clip.clip_id}: original reference kept", run)
                return
            self.backend_gave_up = True
            self.warn(f"clip {clip.clip_id}: original reference kept; the job's remaining clips skip preprocessing", run)
            return
        image = response.images[0]
        accepted = self._identity_accepted(run, image.identity_score)
        # The service rendered (and billed) the image even when its identity score rejects it.
        await self.a.blocking(self.a.store.charge, self.job_id, clip.clip_id, STAGE, API_PREPROCESSING,
                        self.a.pricing.preprocessing(response),
                        {"seed": image.seed, "sha256": image.sha256, "timings_ms": response.timings_ms.model_dump(),
                         "lora_source": response.loras[0].source if response.loras else None,
                         "identity_score": image.identity_score, "accepted": accepted})
        if accepted:
            clip.character_reference_urls[0] = image.url or f"data:{image.mime};base64,{image.base64}"
            run.enhanced = True

    async def _generate_with_retries(self, run: _ClipRun, request: GenerateRequest) -> GenerateResponse:
        """The backend call, retried after each of `retry_waits` while the error is retryable.

        A hand loop rather than tenacity: the client's dependencies are pydantic, httpx and
        SQLAlchemy only (DESIGN.md), and each attempt's warning belongs to the clip's own list.
        """
        waits = iter(self.a.retry_waits)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.a._generate(request)
            except BackendError as exc:
                self.warn(f"clip {run.clip.clip_id}: preprocessing attempt {attempt} failed: {exc}", run)
                wait = next(waits, None) if exc.retryable else None
                if wait is None:
                    raise
                await self.a.sleep(wait)

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
            self.warn(f"clip {run.clip.clip_id}: identity score {score:.4f} below the minimum {minimum:g}; "
                      f"original reference kept", run)
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


def _output_url(prediction: dict) -> str | None:
    output = prediction.get("output")
    if isinstance(output, list):
        return output[0] if output else None
    return output


def _is_coroutine_function(fn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _run_to_completion(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` on a private event loop; from a thread that already runs one (sync code
    called inside async code), on a thread of its own rather than failing."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-apply") as pool:
        return pool.submit(asyncio.run, coroutine).result()
