"""One request, end to end: fetch LoRAs and the reference, generate, encode, deliver.

The FastAPI app and the RunPod handler both call `InferenceService.generate`, so the two
deployments answer the same request with the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from sdxl_lora_client.contract import (GenerateRequest, GenerateResponse, ImageOut, LoraOut, LoraSpec, ModelOut,
                                       PrefetchLora, PrefetchOutcome, PrefetchRequest, PrefetchResponse, Timings)
from inference.deadline import Deadline, timed_out
from inference.errors import ErrorCode, ServiceError
from inference.fetch import FetchError, fetch_to_file, make_s3_client
from inference.images import MIME, decode_image, encode_image
from inference.integrity import CorruptEntry
from inference.lora_store import LoraFile, LoraStore
from inference.pipeline import Engine, GenerationJob, GenerationResult
from inference.prepared import PreparedLora
from inference.settings import Settings, fallback_lora_cache_dir

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
Ready = tuple[LoraFile, PreparedLora | None]  # a fetched LoRA, and its preparation unless it was resident
T = TypeVar("T")
RUNPOD_HF_CACHE = Path("/runpod-volume/huggingface-cache/hub")


def resolve_model(model: str, hf_cache: Path = RUNPOD_HF_CACHE) -> str:
    """A local directory as is; a hub id from RunPod's cached models when present, else the id."""
    if Path(model).is_dir() or "/" not in model:
        return model
    repo = hf_cache / f"models--{model.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return str(repo / "snapshots" / ref.read_text().strip())
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
    return str(snapshots[-1]) if snapshots else model


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
        self._s3 = None
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
                 cancel: threading.Event | None = None) -> GenerateResponse:
        """One request, within `deadline` (default: SDXL_LORA_REQUEST_TIMEOUT_S from now): past it the
        answer is `timeout` and a running generation stops at its next step. `cancel` set (the client
        hung up) stops it too, with RequestCancelled."""
        progress = progress or (lambda phase: None)
        deadline = deadline or Deadline(self.settings.request_timeout_s)
        engine = self._engine()
        started = time.perf_counter()
        if request.output.delivery == "url" and not self.settings.s3_bucket:
            raise ServiceError(ErrorCode.INVALID_REQUEST, "delivery 'url' needs SDXL_LORA_S3_BUCKET on the service")

        progress("fetch")  # and each LoRA made ready for the pipeline, in the fetch threads, before the lock
        lora_futures = self._start_fetches(request)
        reference = self.load_reference(request.image, deadline) if request.image else None
        ready = self._wait_for_fetches(lora_futures, deadline)
        fetched = time.perf_counter()

        progress("generate")
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        job = GenerationJob(
            prompt=request.prompt, negative_prompt=request.negative_prompt,
            width=request.width, height=request.height, num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale, seed=seed, num_images=request.num_images,
            image=reference, strength=request.strength,
        )
        _put_loras(job, request, ready)
        del ready  # the prepared tensors now only in `job`, which the engine lets go of once they are injected
        result = self._generate_from_the_cache(engine, job, request, deadline, cancel)
        lora_files = [lora for lora, _ in job.loras]
        _check(deadline, "before encoding the images")

        scores: list[float | None] = [None] * len(result.images)
        if reference is not None and self.scorer is not None:
            scores = self.scorer.score(reference, result.images)  # counted in total, not in a phase of its own

        progress("encode")
        encode_started = time.perf_counter()
        fmt = request.output.format
        encoded = [encode_image(image, fmt) for image in result.images]
        encoded_at = time.perf_counter()

        images = []
        if request.output.delivery == "url":
            progress("upload")
            _check(deadline, "before uploading the images")
        for image, data, image_seed, score in zip(result.images, encoded, result.seeds, scores):
            out = ImageOut(seed=image_seed, width=image.width, height=image.height, mime=MIME[fmt],
                           sha256=hashlib.sha256(data).hexdigest(), identity_score=score)
            if request.output.delivery == "url":
                out.url = self.upload(data, fmt)
            else:
                out.base64 = base64.b64encode(data).decode("ascii")
            images.append(out)
        done = time.perf_counter()

        return GenerateResponse(
            images=images,
            loras=[LoraOut(id=f.lora_id, sha256=f.sha256, source=source)
                   for f, source in zip(lora_files, result.lora_sources)],
            model=self.model_info(),
            timings_ms=Timings(
                fetch=_ms(fetched - started), adapter=result.adapter_ms, inference=result.inference_ms,
                encode=_ms(encoded_at - encode_started), upload=_ms(done - encoded_at), total=_ms(done - started),
            ),
        )

    def prefetch(self, request: PrefetchRequest, deadline: Deadline | None = None) -> PrefetchResponse:
        """Put each LoRA into the disk cache, side by side, as a generate request would fetch it (same
        URL rules, caps, verification and deadline), without generating: a LoRA whose training just
        completed, so that its first request reads it from disk. One outcome per LoRA; one that fails
        says why and never stops the others."""
        deadline = deadline or Deadline(self.settings.request_timeout_s)
        futures = [self._prefetch_pool.submit(self._fetch_ready, spec) for spec in request.loras]
        return PrefetchResponse(loras=[self._prefetch_outcome(spec, future, deadline)
                                       for spec, future in zip(request.loras, futures)])

    def _prefetch_outcome(self, spec: PrefetchLora, future: Future, deadline: Deadline) -> PrefetchOutcome:
        expected = spec.sha256.lower() if spec.sha256 else None
        try:
            [(lora, _)] = self._wait_for_fetches([future], deadline)
        except ServiceError as exc:
            return PrefetchOutcome(id=spec.id, sha256=expected, status="failed", code=exc.code, message=exc.message)
        except Exception as exc:  # one LoRA's unexpected failure is its own outcome, never the others'
            log.exception("prefetch of %r failed unexpectedly", spec.id)
            return PrefetchOutcome(id=spec.id, sha256=expected, status="failed", code=ErrorCode.INTERNAL,
                                   message=f"internal error ({type(exc).__name__})")
        return PrefetchOutcome(id=spec.id, sha256=lora.sha256, status="cached")

    def _start_fetches(self, request: GenerateRequest) -> list[Future]:
        """The request's LoRAs fetched and made ready side by side (`_fetch_ready`)."""
        return [self._fetch_pool.submit(self._fetch_ready, spec) for spec in request.loras]

    def _fetch_ready(self, spec: LoraSpec | PrefetchLora) -> Ready:
        """In a fetch thread: the LoRA from the disk cache (or downloaded into it), then, once the
        pipeline is loaded, read, verified, parsed and preflighted for it unless it is resident
        already (`Engine.prepare`): all of it beside other requests' denoising, never under the
        pipeline lock."""
        def fetch_and_prepare() -> Ready:
            lora = self.store.fetch(spec.id, spec.url, spec.sha256)
            return lora, self.engine.prepare(lora) if self.engine is not None else None

        return self._repairing(fetch_and_prepare)

    @staticmethod
    def _wait_for_fetches(futures: list[Future], deadline: Deadline) -> list[Ready]:
        """Each LoRA's file and preparation, or `timeout` once the deadline passes. A download still
        under way goes on (to its own deadline) and lands in the cache, so a retry finds it there."""
        try:
            return [future.result(timeout=max(0.0, deadline.remaining())) for future in futures]
        except FutureTimeout:
            raise timed_out(deadline, "while fetching the LoRAs; the download goes on and will be in the "
                                      "cache for a retry") from None

    def _generate_from_the_cache(self, engine: Engine, job: GenerationJob, request: GenerateRequest,
                                 deadline: Deadline, cancel: threading.Event | None) -> GenerationResult:
        """engine.generate through `_repairing`: a LoRA that was resident when its request was fetched
        but has left the pipeline since is prepared under the lock, and may be found damaged there;
        then the request's LoRAs are fetched (and prepared) again, once."""
        attempts = 0

        def attempt() -> GenerationResult:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                _put_loras(job, request, self._wait_for_fetches(self._start_fetches(request), deadline))
            result = engine.generate(job, deadline, cancel)
            with self._rendered_lock:
                self.images_rendered += len(result.images)
            return result

        return self._repairing(attempt)

    def _repairing(self, attempt: Callable[[], T]) -> T:
        """`attempt()`, repairing the disk cache on the way: a file that is not what its sha256 says
        (or that another worker sharing the cache evicted meanwhile) is evicted and `attempt` run
        again, once, its file now a fresh download; a file the pipeline refuses leaves the cache (it
        would be refused again, and would hold cache room meanwhile)."""
        try:
            return self._dropping_refused(attempt)
        except CorruptEntry as exc:
            log.warning("%s; evicting it and fetching %r again", exc, exc.lora.lora_id)
            self.store.discard(exc.lora)
        except FileNotFoundError:
            log.info("a LoRA file left the shared cache before it was loaded; fetching it again")
        try:
            return self._dropping_refused(attempt)
        except (CorruptEntry, FileNotFoundError) as exc:
            raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED, "the LoRA changed or left the cache again while "
                               "it was loaded (a cache shared with a misbehaving writer, or too small?)") from exc

    def _dropping_refused(self, attempt: Callable[[], T]) -> T:
        try:
            return attempt()
        except ServiceError as exc:
            if exc.lora is not None and exc.code in (ErrorCode.LORA_INVALID, ErrorCode.LORA_INCOMPATIBLE):
                self.store.discard(exc.lora)
            raise

    # -- reference images and uploads ---------------------------------------------------------

    def load_reference(self, source: str, deadline: Deadline | None = None):
        limit = self.settings.max_image_bytes
        if source.startswith("data:"):
            header, _, payload = source.partition(",")
            if ";base64" not in header:
                raise ServiceError(ErrorCode.IMAGE_INVALID, "data: URIs must be base64-encoded")
            if len(payload) > limit * 4 // 3 + 4:
                raise ServiceError(ErrorCode.IMAGE_INVALID, f"image is larger than {limit} bytes")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ServiceError(ErrorCode.IMAGE_INVALID, f"data: URI is not valid base64: {exc}") from exc
        elif source.startswith(("https://", "http://", "s3://")):
            buffer = io.BytesIO()
            try:
                fetch_to_file(source, buffer, allow_private=self.settings.allow_private_urls, max_bytes=limit,
                              timeout_s=self.settings.download_timeout_s, deadline=deadline,
                              s3_client_factory=self._s3_client)
            except FetchError as exc:
                if deadline is not None and deadline.expired:
                    raise timed_out(deadline, "while fetching the reference image") from exc
                raise ServiceError(ErrorCode.IMAGE_INVALID, f"cannot fetch the reference image: {exc}") from exc
            data = buffer.getvalue()
        else:
            raise ServiceError(ErrorCode.IMAGE_INVALID, "image must be an https://, http://, s3:// URL or a data: URI")
        return decode_image(data)

    def upload(self, data: bytes, fmt: str) -> str:
        """Put the image in the bucket and presign a GET. Transient failures are retried by boto3
        itself (`make_s3_client`: standard mode, 3 attempts); no second retry layer on top of it."""
        s = self.settings
        key = f"{s.s3_prefix}{datetime.now(timezone.utc):%Y/%m/%d}/{uuid.uuid4().hex}.{fmt}"
        try:
            self._s3_client().put_object(Bucket=s.s3_bucket, Key=key, Body=data, ContentType=MIME[fmt])
            return self._s3_client().generate_presigned_url(
                "get_object", Params={"Bucket": s.s3_bucket, "Key": key}, ExpiresIn=s.presign_expiry_s)
        except Exception as exc:
            log.warning("upload of %s failed: %s", key, exc)
            raise ServiceError(ErrorCode.UPLOAD_FAILED, f"could not upload the image to s3://{s.s3_bucket}: {exc}") from exc

    def _s3_client(self):
        if self._s3 is None:
            self._s3 = make_s3_client(self.settings.s3_endpoint_url)
        return self._s3

    def _engine(self) -> Engine:
        if self.engine is None:
            raise ServiceError(ErrorCode.BUSY, "the pipeline is still loading")
        return self.engine


def _put_loras(job: GenerationJob, request: GenerateRequest, ready: list[Ready]) -> None:
    """The request's LoRAs into `job`, at their scales, with what was prepared of them."""
    job.loras = [(lora, spec.scale) for (lora, _), spec in zip(ready, request.loras)]
    job.prepared = {lora.sha256: prepared for lora, prepared in ready if prepared is not None}


def _check(deadline: Deadline, where: str) -> None:
    if deadline.expired:
        raise timed_out(deadline, where)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)
