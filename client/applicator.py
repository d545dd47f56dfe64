"""Apply a character LoRA to a video job: status gate, direct vs. preprocessing, fallbacks, costs.

The video job never fails because of this step: every failure degrades to the original
reference images, with a warning saying what happened.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from api.schema import GenerateRequest, GenerateResponse, LoraSpec, OutputSpec
from client.backends import BackendError
from client.compat import VideoModel, direct_model, load_matrix
from client.replicate import ReplicateClient, ReplicateError
from client.store import LoraRecord, SqlStore

log = logging.getLogger("sdxl_lora.client")

STAGE = "lora_application"
API_DIRECT = "lora_direct"
API_PREPROCESSING = "sdxl_lora_preprocessing"
Path_ = Literal["none", "reference_fallback", "direct", "preprocessed"]


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


class LoraApplicator:
    def __init__(self, store: SqlStore, preprocessing=None, replicate_token: str | None = None, *,
                 replicate: ReplicateClient | None = None, matrix: dict[str, VideoModel] | None = None,
                 retry_waits: Sequence[float] = (2.0, 4.0, 8.0), pricing: Pricing | None = None,
                 options: EnhanceOptions | None = None, sleep: Callable[[float], None] = time.sleep):
        self.store = store
        self.preprocessing = preprocessing
        self.replicate = replicate or (ReplicateClient(replicate_token) if replicate_token else None)
        self.matrix = matrix if matrix is not None else load_matrix()
        self.retry_waits = tuple(retry_waits)
        self.pricing = pricing or Pricing()
        self.options = options or EnhanceOptions()
        self.sleep = sleep

    def apply(self, job_id: str, clips: list[ClipPrompt], video_model: str, lora_model_id: str | None) -> ApplyResult:
        clips = [replace(c, character_reference_urls=list(c.character_reference_urls),
                         scene_reference_urls=list(c.scene_reference_urls)) for c in clips]
        if not lora_model_id:
            return ApplyResult("none", clips)
        self.store.create_job(job_id)
        record = self.store.get_lora(lora_model_id)  # read once, at job start: no polling
        reason = _not_ready_reason(lora_model_id, record)
        if reason:
            return self._fallback(clips, reason)

        run = _JobRun(self, job_id, record)
        entry = direct_model(self.matrix, video_model, record.direct_weights)
        if entry is not None and self.replicate is not None:
            return run.direct(clips, entry)
        if entry is not None:
            run.warn(f"{video_model} takes LoRAs directly but no Replicate token is configured; preprocessing instead")
        return run.preprocess_all(clips)

    def _fallback(self, clips: list[ClipPrompt], reason: str) -> ApplyResult:
        log.warning("LoRA not applied: %s; using the original reference images", reason)
        return ApplyResult("reference_fallback", clips, warnings=[f"{reason}; original reference images used"])


def _not_ready_reason(lora_id: str, record: LoraRecord | None) -> str | None:
    if record is None:
        return f"LoRA {lora_id} not found"
    if record.status != "completed":
        return f"LoRA {lora_id} is {record.status}, not completed"
    if not record.url:
        return f"LoRA {lora_id} has no weights URL"
    return None


class _JobRun:
    """State of one apply() call: warnings so far, and whether the backend has given up."""

    def __init__(self, applicator: LoraApplicator, job_id: str, record: LoraRecord):
        self.a = applicator
        self.job_id = job_id
        self.record = record
        self.warnings: list[str] = []
        self.backend_failed = False
        self.warned_no_identity_score = False

    def warn(self, message: str) -> None:
        log.warning("job %s: %s", self.job_id, message)
        self.warnings.append(message)

    # -- direct path ---------------------------------------------------------------------------

    def direct(self, clips: list[ClipPrompt], entry: VideoModel) -> ApplyResult:
        weights_url = self.record.direct_weights[entry.architecture]
        direct_ok = 0
        for clip in clips:
            inputs = self._video_inputs(clip, entry)
            inputs[entry.lora_field] = weights_url
            for attempt in (1, 2):  # the first try and one retry
                try:
                    clip.video_url = _output_url(self.a.replicate.run(entry.replicate_model, inputs))
                    self.a.store.charge(self.job_id, clip.clip_id, STAGE, API_DIRECT, self.a.pricing.direct_per_clip,
                                        {"model": entry.replicate_model, "attempt": attempt})
                    direct_ok += 1
                    break
                except ReplicateError as exc:
                    self.warn(f"clip {clip.clip_id}: direct LoRA attempt {attempt} failed: {exc}")
            else:
                self.preprocess(clip)
                self._video_without_lora(clip, entry)
        path: Path_ = "direct" if direct_ok else ("preprocessed" if self._any_enhanced else "reference_fallback")
        return ApplyResult(path, clips, lora_url=weights_url if direct_ok else None, warnings=self.warnings)

    def _video_without_lora(self, clip: ClipPrompt, entry: VideoModel) -> None:
        try:
            clip.video_url = _output_url(self.a.replicate.run(entry.replicate_model, self._video_inputs(clip, entry)))
        except ReplicateError as exc:
            self.warn(f"clip {clip.clip_id}: video prediction without LoRA failed too: {exc}")

    @staticmethod
    def _video_inputs(clip: ClipPrompt, entry: VideoModel) -> dict:
        inputs = {"prompt": clip.prompt}
        if clip.character_reference_urls:
            inputs[entry.image_field] = clip.character_reference_urls[0]
        return inputs

    # -- preprocessing path --------------------------------------------------------------------

    _any_enhanced = False

    def preprocess_all(self, clips: list[ClipPrompt]) -> ApplyResult:
        if self.a.preprocessing is None:
            self.warn("no preprocessing backend configured")
            return ApplyResult("reference_fallback", clips, warnings=self.warnings)
        for clip in clips:
            self.preprocess(clip)
        return ApplyResult("preprocessed" if self._any_enhanced else "reference_fallback", clips, warnings=self.warnings)

    def preprocess(self, clip: ClipPrompt) -> None:
        """Replace the clip's first character reference with an enhanced one, or leave it as is."""
        if not clip.character_reference_urls:
            return
        if self.a.preprocessing is None or self.backend_failed:
            self.warn(f"clip {clip.clip_id}: preprocessing skipped (backend unavailable); original reference kept")
            return
        request = self._enhance_request(clip)
        waits = iter(self.a.retry_waits)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.a.preprocessing.generate(request)
                break
            except BackendError as exc:
                wait = next(waits, None) if exc.retryable else None
                self.warn(f"clip {clip.clip_id}: preprocessing attempt {attempt} failed: {exc}")
                if wait is None:
                    self.backend_failed = True
                    self.warn(f"clip {clip.clip_id}: original reference kept; the job's remaining clips skip preprocessing")
                    return
                self.a.sleep(wait)
        image = response.images[0]
        accepted = self._identity_accepted(clip, image.identity_score)
        # The service rendered (and billed) the image even when its identity score rejects it.
        self.a.store.charge(self.job_id, clip.clip_id, STAGE, API_PREPROCESSING, self.a.pricing.preprocessing(response),
                            {"seed": image.seed, "sha256": image.sha256, "timings_ms": response.timings_ms.model_dump(),
                             "lora_source": response.loras[0].source if response.loras else None,
                             "identity_score": image.identity_score, "accepted": accepted})
        if not accepted:
            return
        clip.character_reference_urls[0] = image.url or f"data:{image.mime};base64,{image.base64}"
        self._any_enhanced = True

    def _identity_accepted(self, clip: ClipPrompt, score: float | None) -> bool:
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
            self.warn(f"clip {clip.clip_id}: identity score {score:.4f} below the minimum {minimum:g}; "
                      f"original reference kept")
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
