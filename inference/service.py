"""One request, end to end: fetch LoRAs and the reference, generate, encode, deliver.

The FastAPI app and the RunPod handler both call `InferenceService.generate`, so the two
deployments answer the same request with the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from typing import TypeVar

from sdxl_lora_client.contract import (GenerateRequest, GenerateResponse, ImageOut, LoraOut, LoraSpec, ModelOut,
                                       PrefetchRequest, PrefetchResponse, Timings)
from inference.deadline import Deadline, timed_out
from inference.errors import ErrorCode, ServiceError
from inference.images import MIME, encode_image
from inference.integrity import CorruptEntry
from inference.lora_file import LoraFile
from inference.lora_store import LoraStore
from inference.media import load_reference, upload
from inference.pipeline import Engine, GenerationJob, GenerationResult, resolve_model
from inference.prefetch import prefetch_loras
from inference.prepared import PreparedLora
from inference.settings import Settings, fallback_lora_cache_dir

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
RenderTurn = Callable[[], AbstractContextManager[object]]
Ready = tuple[LoraFile, PreparedLora | None]  # a fetched LoRA, and its preparation unless it was resident
T = TypeVar("T")
REFUSED_BY_THE_PIPELINE = (ErrorCode.LORA_INVALID, ErrorCode.LORA_INCOMPATIBLE)


class InferenceService:
    def __init__(self, settings: Settings, engine: Engine | None = None, store: LoraStore | None = None):
        self.settings = settings
        # What a deployer should know about how this worker runs (a cache fallback, no identity score):
        # logged once, and listed by /readyz.
        self.warnings: list[str] = []
        self.store = store or self._open_store()
        self.engine = engine
        self._fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fetch")
        # Prefetches in threads of their own: a batch of them never delays a request's LoRAs.
        self._prefetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prefetch")
        self.scorer = None  # IdentityScorer once SDXL_LORA_IDENTITY_MODEL has loaded
        self.identity = "off" if not settings.identity_model else "not loaded"
        self.s3 = self.store.s3  # the one S3 client: LoRAs, reference images, uploads
        # Images the pipeline rendered (the metric sdxl_lora_images_generated_total): an operator
        # compares it with what was charged, so it counts renders, not answers.
        self.images_rendered = 0
        self._rendered_lock = threading.Lock()

    def _open_store(self) -> LoraStore:
        """The configured LoRA cache; where it cannot be written (a root-owned network volume, a
        read-only mount), a private one in the home directory, so the worker serves anyway."""
        try:
            return LoraStore.from_settings(self.settings)
        except OSError as exc:
            fallback = fallback_lora_cache_dir()
            self._warn(f"the LoRA cache {self.settings.lora_cache_dir} is not writable ({exc.strerror or exc}); "
                       f"using {fallback}, which this worker does not share with others: fix the volume's "
                       f"permissions or set SDXL_LORA_LORA_CACHE_DIR")
            return LoraStore.from_settings(self.settings, cache_dir=fallback)

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    # -- lifecycle -----------------------------------------------------------------------------

    def load(self, identity_in_background: bool = True) -> None:
        """Load the pipeline (raises DeviceUnavailable at once without the configured GPU). The
        optional identity model loads beside the serving worker: until it is there, and if it fails
        to load, images come without `identity_score`, and `identity` says why."""
        import runpod.serverless.utils.rp_ssrf  # noqa: F401  (slow first import: pay it at start, not in a request)

        if self.engine is None:
            s = self.settings
            self.engine = Engine(resolve_model(s.model), device=s.device, dtype=s.dtype,
                                 max_resident_adapters=s.max_resident_adapters,
                                 fuse_adapters=s.fuse_adapters, vae=resolve_model(s.vae) if s.vae else None,
                                 compile=s.compile, compile_warmup=s.compile_warmup, compile_backend=s.compile_backend,
                                 compile_cache_dir=s.lora_cache_dir.parent / "compile")
        if self.settings.identity_model and self.identity == "not loaded":
            self.identity = "loading"
            if identity_in_background:
                threading.Thread(target=self._load_identity, name="identity-load", daemon=True).start()
            else:
                self._load_identity()

    def _load_identity(self) -> None:
        from inference.identity import IdentityScorer

        model = self.settings.identity_model
        try:
            self.scorer = IdentityScorer(resolve_model(model), device=self.engine.device, dtype=self.engine.dtype)
            self.identity = "ready"
        except Exception as exc:  # an optional score never takes the worker down
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            self.identity = f"failed: {type(exc).__name__}: {first_line}"
            self._warn(f"identity model {model} did not load ({self.identity}); images come without identity_score")

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def status(self) -> dict:
        """What /readyz reports beside readiness."""
        return {"model": self.model_info().model_dump(), "identity": self.identity, "warnings": list(self.warnings)}

    def model_info(self) -> ModelOut:
        engine = self._engine()
        return ModelOut(id=self.settings.model, dtype=str(engine.dtype).removeprefix("torch."), device=str(engine.device))

    def adapters(self) -> dict:
        """What is cached where: resident in the pipeline, and on disk."""
        resident = self.engine.adapters.resident() if self.engine else []
        return {
            "max_resident": self.settings.max_resident_adapters,
            "resident": [{"id": a.lora.lora_id, "sha256": a.lora.sha256, "adapter": a.name, "uses": a.uses,
                          "loaded_at": datetime.fromtimestamp(a.loaded_at, timezone.utc).isoformat(),
                          "layers": a.summary.layers, "ranks": list(a.summary.ranks),
                          "tokens": a.tokens} for a in resident],
            "disk": [{"id": f.lora_id, "sha256": f.sha256, "bytes": f.size, "bundle": f.entry != f.path}
                     for f in self.store.entries()],
            "disk_max_bytes": self.settings.lora_cache_max_bytes,
        }

    # -- one request ---------------------------------------------------------------------------

    def generate(self, request: GenerateRequest, progress: Progress | None = None, deadline: Deadline | None = None,
                 cancel: threading.Event | None = None, render_turn: RenderTurn | None = None) -> GenerateResponse:
        """One request, within `deadline` (default: SDXL_LORA_REQUEST_TIMEOUT_S from now): past it the
        answer is `timeout` and a running generation stops at its next step. `cancel` set (the client
        hung up) stops it too, with RequestCancelled. `render_turn()`, when given, is held from the
        moment the LoRAs and the reference are ready until the images are rendered and scored (the
        app's turn at the pipeline); `progress(phase)` only reports: fetch, generate, encode, upload."""
        progress = progress or (lambda phase: None)
        deadline = deadline or Deadline(self.settings.request_timeout_s)
        engine = self._engine()
        started = time.perf_counter()
        if request.output.delivery == "url" and not self.settings.s3_bucket:
            raise ServiceError(ErrorCode.INVALID_REQUEST, "delivery 'url' needs SDXL_LORA_S3_BUCKET on the service")

        progress("fetch")  # and each LoRA made ready for the pipeline, in the fetch threads, before any turn
        lora_futures = self._start_fetches(request)
        reference = load_reference(request.image, self.settings, self.s3, deadline) if request.image else None
        job = _job(request, _wait_for_fetches(lora_futures, deadline), reference)
        fetched = time.perf_counter()

        progress("generate")
        with render_turn() if render_turn is not None else nullcontext():
            result = self._render(engine, job, request, deadline, cancel)
            _check(deadline, "before encoding the images")
            scores: list[float | None] = [None] * len(result.images)
            if reference is not None and self.scorer is not None:
                scores = self.scorer.score(reference, result.images)  # counted in total, not in a phase of its own

        progress("encode")
        encode_started = time.perf_counter()
        encoded = [encode_image(image, request.output.format) for image in result.images]
        encoded_at = time.perf_counter()
        images = self._deliver(request, result, encoded, scores, deadline, progress)
        done = time.perf_counter()

        return GenerateResponse(
            images=images,
            loras=[LoraOut(id=lora.lora_id, sha256=lora.sha256, source=source)
                   for (lora, _), source in zip(job.loras, result.lora_sources)],
            model=self.model_info(),
            timings_ms=Timings(
                fetch=_ms(fetched - started), adapter=result.adapter_ms, inference=result.inference_ms,
                encode=_ms(encoded_at - encode_started), upload=_ms(done - encoded_at), total=_ms(done - started),
            ),
        )

    def _deliver(self, request: GenerateRequest, result: GenerationResult, encoded: list[bytes],
                 scores: list[float | None], deadline: Deadline, progress: Progress) -> list[ImageOut]:
        """The encoded images inline (base64), or uploaded to the bucket (``delivery: "url"``)."""
        fmt = request.output.format
        by_url = request.output.delivery == "url"
        if by_url:
            progress("upload")
            _check(deadline, "before uploading the images")
        images = []
        for image, data, image_seed, score in zip(result.images, encoded, result.seeds, scores):
            out = ImageOut(seed=image_seed, width=image.width, height=image.height, mime=MIME[fmt],
                           sha256=hashlib.sha256(data).hexdigest(), identity_score=score)
            if by_url:
                out.url = upload(data, fmt, self.settings, self.s3)
            else:
                out.base64 = base64.b64encode(data).decode("ascii")
            images.append(out)
        return images

    def prefetch(self, request: PrefetchRequest, deadline: Deadline | None = None) -> PrefetchResponse:
        """Put each LoRA into the disk cache, side by side, as a generate request would fetch it (same
        URL rules, caps, verification and deadline), without generating: a LoRA whose training just
        completed, so that its first request reads it from disk. One outcome per LoRA; one that fails
        says why and never stops the others. Memory: a few chunks per file (`inference.prefetch`)."""
        return prefetch_loras(self.store, request, deadline or Deadline(self.settings.request_timeout_s),
                              pool=self._prefetch_pool, repair=self._with_cache_repair)

    def _start_fetches(self, request: GenerateRequest) -> list[Future]:
        """The request's LoRAs fetched and made ready side by side (`_fetch_ready`)."""
        return [self._fetch_pool.submit(self._fetch_ready, spec) for spec in request.loras]

    def _fetch_ready(self, spec: LoraSpec) -> Ready:
        """In a fetch thread: the LoRA from the disk cache (or downloaded into it), then, once the
        pipeline is loaded, read, verified, parsed and preflighted for it unless it is resident
        already (`Engine.prepare`): all of it beside other requests' denoising, never in the
        pipeline's turn."""
        def fetch_and_prepare() -> Ready:
            lora = self.store.fetch(spec.id, spec.url, spec.sha256)
            return lora, self.engine.prepare(lora) if self.engine is not None else None

        return self._with_cache_repair(fetch_and_prepare)

    def _render(self, engine: Engine, job: GenerationJob, request: GenerateRequest, deadline: Deadline,
                cancel: threading.Event | None) -> GenerationResult:
        """engine.generate, with the cache repaired on the way: a LoRA that was resident when its request
        was fetched but has left the pipeline since is prepared in the turn, and may be found damaged
        there; then the request's LoRAs are fetched (and prepared) again, once."""
        def refetch() -> None:
            _put_loras(job, request, _wait_for_fetches(self._start_fetches(request), deadline))

        result = self._with_cache_repair(lambda: engine.generate(job, deadline, cancel), before_retry=refetch)
        with self._rendered_lock:
            self.images_rendered += len(result.images)
        return result

    def _with_cache_repair(self, attempt: Callable[[], T], before_retry: Callable[[], None] | None = None) -> T:
        """`attempt()`, repairing the disk cache on the way: a file that is not what its sha256 says
        (or that another worker sharing the cache evicted meanwhile) is evicted and `attempt` run
        again, once (after `before_retry()`), its file now a fresh download; a file the pipeline
        refuses leaves the cache (it would be refused again, and would hold cache room meanwhile)."""
        retried = False
        while True:
            try:
                return attempt()
            except ServiceError as exc:
                if exc.lora is not None and exc.code in REFUSED_BY_THE_PIPELINE:
                    self.store.discard(exc.lora)
                raise
            except (CorruptEntry, FileNotFoundError) as exc:
                if retried:
                    raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED, "the LoRA changed or left the cache again "
                                       "while it was loaded (a cache shared with a misbehaving writer, or too "
                                       "small?)") from exc
                if isinstance(exc, CorruptEntry):
                    log.warning("%s; evicting it and fetching %r again", exc, exc.lora.lora_id)
                    self.store.discard(exc.lora)
                else:
                    log.info("a LoRA file left the shared cache before it was loaded; fetching it again")
            retried = True
            if before_retry is not None:
                before_retry()

    def _engine(self) -> Engine:
        if self.engine is None:
            raise ServiceError(ErrorCode.BUSY, "the pipeline is still loading")
        return self.engine


def _wait_for_fetches(futures: list[Future], deadline: Deadline) -> list[Ready]:
    """Each LoRA's file and preparation, or `timeout` once the deadline passes. A download still
    under way goes on (to its own deadline) and lands in the cache, so a retry finds it there."""
    try:
        return [future.result(timeout=max(0.0, deadline.remaining())) for future in futures]
    except FutureTimeout:
        raise timed_out(deadline, "while fetching the LoRAs; the download goes on and will be in the "
                                  "cache for a retry") from None


def _job(request: GenerateRequest, ready: list[Ready], reference) -> GenerationJob:
    """The generation `request` asks for, with its LoRAs and what was prepared of them. The prepared
    tensors are then held by the job alone, which the engine lets go of once they are injected."""
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    job = GenerationJob(
        prompt=request.prompt, negative_prompt=request.negative_prompt,
        width=request.width, height=request.height, num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale, seed=seed, num_images=request.num_images,
        image=reference, strength=request.strength,
    )
    _put_loras(job, request, ready)
    return job


def _put_loras(job: GenerationJob, request: GenerateRequest, ready: list[Ready]) -> None:
    """The request's LoRAs into `job`, at their scales, with what was prepared of them."""
    job.loras = [(lora, spec.scale) for (lora, _), spec in zip(ready, request.loras)]
    job.prepared = {lora.sha256: prepared for lora, prepared in ready if prepared is not None}


def _check(deadline: Deadline, where: str) -> None:
    if deadline.expired:
        raise timed_out(deadline, where)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)
