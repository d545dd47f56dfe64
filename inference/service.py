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
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from sdxl_lora_client.contract import GenerateRequest, GenerateResponse, ImageOut, LoraOut, ModelOut, Timings
from inference.errors import ErrorCode, ServiceError
from inference.fetch import FetchError, fetch_to_file, make_s3_client
from inference.images import MIME, decode_image, encode_image
from inference.lora_store import LoraFile, LoraStore
from inference.pipeline import Engine, GenerationJob
from inference.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
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
        self.store = store or LoraStore.from_settings(settings)
        self.engine = engine
        self._fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fetch")
        self.scorer = None  # IdentityScorer when SDXL_LORA_IDENTITY_MODEL is set
        self._s3 = None

    # -- lifecycle -----------------------------------------------------------------------------

    def load(self) -> None:
        import runpod.serverless.utils.rp_ssrf  # noqa: F401  (slow first import: pay it at start, not in a request)

        if self.engine is None:
            s = self.settings
            self.engine = Engine(resolve_model(s.model), device=s.device, dtype=s.dtype,
                                 max_resident_adapters=s.max_resident_adapters,
                                 fuse_adapters=s.fuse_adapters)
        if self.settings.identity_model and self.scorer is None:
            from inference.identity import IdentityScorer

            self.scorer = IdentityScorer(self.settings.identity_model, device=self.engine.device, dtype=self.engine.dtype)

    @property
    def ready(self) -> bool:
        return self.engine is not None

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

    def generate(self, request: GenerateRequest, progress: Progress | None = None) -> GenerateResponse:
        progress = progress or (lambda phase: None)
        engine = self._engine()
        started = time.perf_counter()
        if request.output.delivery == "url" and not self.settings.s3_bucket:
            raise ServiceError(ErrorCode.INVALID_REQUEST, "delivery 'url' needs SDXL_LORA_S3_BUCKET on the service")

        progress("fetch")
        lora_futures = [self._fetch_pool.submit(self.store.fetch, l.id, l.url, l.sha256) for l in request.loras]
        reference = self.load_reference(request.image) if request.image else None
        lora_files: list[LoraFile] = [future.result() for future in lora_futures]
        fetched = time.perf_counter()

        progress("generate")
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        job = GenerationJob(
            prompt=request.prompt, negative_prompt=request.negative_prompt,
            width=request.width, height=request.height, num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale, seed=seed, num_images=request.num_images,
            image=reference, strength=request.strength,
            loras=[(f, spec.scale) for f, spec in zip(lora_files, request.loras)],
        )
        try:
            result = engine.generate(job)
        except FileNotFoundError:
            # Another worker sharing the cache evicted a file between our fetch and its load:
            # fetch again (a download now) and retry once.
            log.info("a LoRA file left the shared cache before it was loaded; fetching it again")
            lora_files = [self.store.fetch(spec.id, spec.url, spec.sha256) for spec in request.loras]
            job.loras = [(f, spec.scale) for f, spec in zip(lora_files, request.loras)]
            try:
                result = engine.generate(job)
            except FileNotFoundError as exc:
                raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED,
                                   "the LoRA cache lost the file twice while loading it (cache too small?)") from exc

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

    # -- reference images and uploads ---------------------------------------------------------

    def load_reference(self, source: str):
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
                              timeout_s=self.settings.download_timeout_s, s3_client_factory=self._s3_client)
            except FetchError as exc:
                raise ServiceError(ErrorCode.IMAGE_INVALID, f"cannot fetch the reference image: {exc}") from exc
            data = buffer.getvalue()
        else:
            raise ServiceError(ErrorCode.IMAGE_INVALID, "image must be an https://, http://, s3:// URL or a data: URI")
        return decode_image(data)

    def upload(self, data: bytes, fmt: str) -> str:
        from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

        s = self.settings
        key = f"{s.s3_prefix}{datetime.now(timezone.utc):%Y/%m/%d}/{uuid.uuid4().hex}.{fmt}"

        @retry(stop=stop_after_attempt(3), wait=wait_exponential(multiplier=0.2, max=2),
               retry=retry_if_exception_type(Exception), reraise=True)
        def put() -> None:
            self._s3_client().put_object(Bucket=s.s3_bucket, Key=key, Body=data, ContentType=MIME[fmt])

        try:
            put()
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


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)
