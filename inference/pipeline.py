"""The SDXL pipeline, loaded once per process, and the one lock that serializes its use.

txt2img and img2img share one set of modules (`from_pipe`), so an adapter injected once serves
both. Image i of a request is drawn with `torch.Generator(device).manual_seed(seed + i)` and
generated alone (batch of one), so plain diffusers reproduces it bit for bit from the seed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from inference.adapters import AdapterCache
from inference.compiled import CompileCache, CompiledUnet, cache_key, parse_sizes
from inference.deadline import Deadline, timed_out
from inference.errors import ErrorCode, RequestCancelled, ServiceError
from inference.lora_file import LoraFile
from inference.patched_adapters import PatchedAdapterCache
from inference.prepared import PreparedLora, prepare
from inference.quiet import quiet_libraries

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


# The oldest NVIDIA driver each CUDA build of torch runs on (NVIDIA's CUDA release notes, table 3).
MIN_DRIVER = {"12.4": "550", "12.6": "560", "12.8": "570", "12.9": "575", "13.0": "580"}
RUNPOD_HF_CACHE = Path("/runpod-volume/huggingface-cache/hub")


class DeviceUnavailable(RuntimeError):
    """The configured device cannot be used. The worker must not start: a GPU endpoint silently
    running on the CPU is worse than one that fails its health check and says why."""


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


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA, MPS or the CPU, whichever is there. A named CUDA device must be usable, else
    DeviceUnavailable (never a quiet fallback to the CPU)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        require_cuda(resolved)
    return resolved


def require_cuda(device: torch.device) -> None:
    build = torch.version.cuda
    if build is None:
        raise DeviceUnavailable(f"SDXL_LORA_DEVICE={device} but torch {torch.__version__} is a CPU-only build; install "
                                "a CUDA build of torch, or set SDXL_LORA_DEVICE=cpu to run on the CPU on purpose")
    try:
        torch.cuda.init()
        count = torch.cuda.device_count()
    except Exception as exc:  # torch says why: no driver, a driver too old, no device visible
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    else:
        if (device.index or 0) < count:
            return
        reason = f"only {count} CUDA device(s) visible"
    minimum = MIN_DRIVER.get(".".join(build.split(".")[:2]), "the one its CUDA version needs")
    raise DeviceUnavailable(
        f"SDXL_LORA_DEVICE={device} but CUDA is not usable: {reason}. torch {torch.__version__} is a CUDA {build} "
        f"build and needs an NVIDIA driver >= {minimum} with a GPU visible to this process (check nvidia-smi on "
        f"the host and the container's GPU access). Set SDXL_LORA_DEVICE=cpu to run on the CPU on purpose.")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp16 on CUDA (SDXL's usual; diffusers upcasts its VAE where needed), fp32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}") from None


@dataclass
class GenerationJob:
    """Everything that decides the pixels, in the units diffusers takes."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int = 30
    guidance_scale: float = 7.0
    seed: int = 0
    num_images: int = 1
    image: Image.Image | None = None  # reference image: img2img when set
    strength: float = 0.6
    loras: list[tuple[LoraFile, float]] = field(default_factory=list)
    prepared: dict[str, PreparedLora] = field(default_factory=dict)  # by sha256: LoRAs made ready before the lock


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    lora_sources: list[str]
    adapter_ms: float
    inference_ms: float


class Engine:
    """One pipeline on one device; `generate` is safe to call from many threads (it queues)."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", max_resident_adapters: int = 8,
                 fuse_adapters: str | bool = "auto",  # auto | on | off (SDXL_LORA_FUSE_ADAPTERS), or a bool
                 vae: str | None = None,  # SDXL_LORA_VAE: a VAE to use instead of the model's
                 compile: str | bool = "off", compile_warmup: str = "1024x1024",  # SDXL_LORA_COMPILE(_WARMUP)
                 compile_backend: str = "inductor", compile_cache_dir: Path | None = None):
        quiet_libraries()
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        self.model_id = model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        started = time.perf_counter()
        custom_vae = load_vae(vae, self.dtype) if vae else None
        self.txt2img = _load_txt2img(StableDiffusionXLPipeline, model, self.dtype, custom_vae).to(self.device)
        self.txt2img.set_progress_bar_config(disable=True)
        # from_pipe casts shared modules to float32 unless told the dtype (diffusers #12754).
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(self.txt2img, dtype=self.dtype)
        self.img2img.set_progress_bar_config(disable=True)
        # auto: fused on CUDA, where unfused LoRA layers cost most; on CPU a switch would pay the merge
        fuse = self.device.type == "cuda" if fuse_adapters == "auto" else fuse_adapters in (True, "on")
        self.compiled = None  # inference.compiled.CompiledUnet with COMPILE=on
        if compile in (True, "on"):
            self.adapters = PatchedAdapterCache(self.txt2img, max_resident_adapters, fuse=fuse)
        else:
            self.adapters = AdapterCache(self.txt2img, max_resident_adapters, fuse=fuse)
        self.adapters.wrap_usual_targets()
        self.lock = threading.Lock()
        if compile in (True, "on"):
            self._compile(compile_backend, parse_sizes(compile_warmup), compile_cache_dir)
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s on %s (%s) in %.1f s", model, self.device, self.dtype, self.load_seconds)

    def _compile(self, backend: str, sizes: list[tuple[int, int]], cache_dir: Path | None) -> None:
        """The UNet compiled and warmed for `sizes` (see `inference.compiled`) before the engine exists."""
        self.compiled = CompiledUnet(self.txt2img.unet, backend)
        cache = CompileCache(cache_dir, cache_key(self.model_id, self.device, self.dtype, backend, sizes))
        self.compiled.warm_up(lambda w, h, guidance: self._one_image(GenerationJob(
            prompt="warm-up", width=w, height=h, num_inference_steps=2, guidance_scale=guidance), 0), sizes, cache)

    @property
    def recompiles(self) -> int:
        """Graphs compiled after the warm-up (sdxl_lora_recompiles_total); 0 without COMPILE=on."""
        return self.compiled.recompiles if self.compiled is not None else 0

    def prepare(self, lora: LoraFile) -> PreparedLora | None:
        """`lora` read, verified, parsed and preflighted for this pipeline, without the lock (see
        `inference.prepared`), so that the lock covers only its injection; None when it is resident
        already (the common case: nothing to read)."""
        if self.adapters.is_resident(lora.sha256):
            return None
        return prepare(self.txt2img, lora, pin_memory=self.device.type == "cuda")

    @property
    def default_size(self) -> int:
        return self.txt2img.default_sample_size * self.txt2img.vae_scale_factor

    def generate(self, job: GenerationJob, deadline: Deadline | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Generate `job`'s images. Past `deadline`, or once `cancel` is set, the generation stops at
        the next denoising step (ServiceError `timeout`, or RequestCancelled) and the pipeline is
        free at once, its adapters as they were: interrupting never leaves half-applied state."""
        stop = _StopCheck(deadline, cancel)
        if not self.lock.acquire(timeout=max(0.0, deadline.remaining()) if deadline else -1):
            raise timed_out(deadline, "while waiting for the pipeline")
        try:
            started = time.perf_counter()
            sources = self.adapters.activate(job.loras, job.prepared)
            job.prepared = {}  # consumed: injected (or copied in place), the read buffers can go
            job = replace(job, prompt=self.adapters.prompt_for(job.prompt, [lora for lora, _ in job.loras]))
            adapter_done = time.perf_counter()
            images = [self._one_image(job, job.seed + i, stop) for i in range(job.num_images)]
            done = time.perf_counter()
        finally:
            self.lock.release()
        return GenerationResult(
            images=images,
            seeds=[job.seed + i for i in range(job.num_images)],
            lora_sources=sources,
            adapter_ms=(adapter_done - started) * 1e3,
            inference_ms=(done - adapter_done) * 1e3,
        )

    def _one_image(self, job: GenerationJob, seed: int, stop: _StopCheck | None = None) -> Image.Image:
        stop = stop or _StopCheck(None, None)
        stop.check("before its first denoising step")
        generator = torch.Generator(self.device).manual_seed(seed)
        common = dict(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            generator=generator,
            output_type="pil",
            callback_on_step_end=stop,
        )
        try:
            if job.image is None:
                size = self.default_size
                out = self.txt2img(width=job.width or size, height=job.height or size, **common)
            else:
                image = job.image
                if job.width and job.height and (job.width, job.height) != image.size:
                    image = image.resize((job.width, job.height), Image.Resampling.LANCZOS)
                out = self.img2img(image=image, strength=job.strength, **common)
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ServiceError(ErrorCode.OUT_OF_MEMORY, "the GPU ran out of memory; try fewer or smaller images") from exc
        return out.images[0]


class _StopCheck:
    """diffusers' `callback_on_step_end`: raising from it leaves the denoising loop at once, with no
    VAE decode of a half-denoised image (setting `pipe._interrupt` would still decode), and the
    pipeline's next call starts clean (the scheduler's timesteps are set anew by every call)."""

    def __init__(self, deadline: Deadline | None, cancel: threading.Event | None):
        self.deadline = deadline
        self.cancel = cancel

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.check(f"after denoising step {step + 1} of {pipe.num_timesteps}")
        return callback_kwargs

    def check(self, where: str) -> None:
        if self.cancel is not None and self.cancel.is_set():
            log.info("generation stopped %s: the caller went away", where)
            raise RequestCancelled(f"generation stopped {where}: the caller went away")
        if self.deadline is not None and self.deadline.expired:
            log.info("generation stopped %s: past the request's deadline", where)
            raise timed_out(self.deadline, f"and was stopped {where}")


def _load_txt2img(pipeline_cls, model: str, dtype: torch.dtype, vae=None):
    kwargs = dict(dtype=dtype, use_safetensors=True, **({"vae": vae} if vae is not None else {}))
    variant = weights_variant(model, dtype)
    if variant is not None and not Path(model).is_dir():
        try:  # hub checkpoints ship an fp16 variant: half the download
            return pipeline_cls.from_pretrained(model, variant=variant, **kwargs)
        except (OSError, ValueError):
            log.info("no %s variant for %s; loading the default weights", variant, model)
            variant = None
    return pipeline_cls.from_pretrained(model, variant=variant, **kwargs)


def weights_variant(model: str, dtype: torch.dtype) -> str | None:
    """Which weight files to read: the fp16 variant (`*.fp16.safetensors`) in half precision, half the
    bytes of the full files; otherwise the full files, or the variant when a directory (a RunPod
    cached-model snapshot, say) holds nothing else. A hub id: the variant is tried first in fp16."""
    path = Path(model)
    if not path.is_dir():
        return "fp16" if dtype == torch.float16 else None
    weights = list(path.glob("*/*.safetensors"))
    has_fp16 = any(".fp16." in f.name for f in weights)
    has_full = any(".fp16." not in f.name for f in weights)
    return "fp16" if has_fp16 and (dtype == torch.float16 or not has_full) else None


def load_vae(source: str, dtype: torch.dtype):
    """A VAE to use instead of the model's (SDXL_LORA_VAE): a hub id or a diffusers directory. An
    fp16-safe one (config `force_upcast: false`, e.g. madebyollin/sdxl-vae-fp16-fix) decodes in fp16;
    SDXL's own is upcast to fp32 for every decode."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(source, dtype=dtype, use_safetensors=True)
    if dtype == torch.float16 and vae.config.force_upcast:
        log.warning("the VAE %s says force_upcast: every decode runs in fp32; an fp16-safe VAE avoids it", source)
    return vae
