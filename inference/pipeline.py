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
from inference.errors import ErrorCode, ServiceError
from inference.lora_store import LoraFile

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


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
                 fuse_adapters: str | bool = "auto"):  # auto | on | off (SDXL_LORA_FUSE_ADAPTERS), or a bool
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        diffusers_logging.get_logger("diffusers.models.modeling_utils").addFilter(_drop_empty_fp32_warning)
        self.model_id = model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        started = time.perf_counter()
        self.txt2img = _load_txt2img(StableDiffusionXLPipeline, model, self.dtype).to(self.device)
        self.txt2img.set_progress_bar_config(disable=True)
        # from_pipe casts shared modules to float32 unless told the dtype (diffusers #12754).
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(self.txt2img, dtype=self.dtype)
        self.img2img.set_progress_bar_config(disable=True)
        # auto: fused on CUDA, where unfused LoRA layers cost most; on CPU a switch would pay the merge
        fuse = self.device.type == "cuda" if fuse_adapters == "auto" else fuse_adapters in (True, "on")
        self.adapters = AdapterCache(self.txt2img, max_resident_adapters, fuse=fuse)
        self.lock = threading.Lock()
        self.load_seconds = time.perf_counter() - started
        log.info("loaded %s on %s (%s) in %.1f s", model, self.device, self.dtype, self.load_seconds)

    @property
    def default_size(self) -> int:
        return self.txt2img.default_sample_size * self.txt2img.vae_scale_factor

    def generate(self, job: GenerationJob) -> GenerationResult:
        with self.lock:
            started = time.perf_counter()
            sources = self.adapters.activate(job.loras)
            job = replace(job, prompt=self.adapters.prompt_for(job.prompt, [lora for lora, _ in job.loras]))
            adapter_done = time.perf_counter()
            images = [self._one_image(job, job.seed + i) for i in range(job.num_images)]
            done = time.perf_counter()
        return GenerationResult(
            images=images,
            seeds=[job.seed + i for i in range(job.num_images)],
            lora_sources=sources,
            adapter_ms=(adapter_done - started) * 1e3,
            inference_ms=(done - adapter_done) * 1e3,
        )

    def _one_image(self, job: GenerationJob, seed: int) -> Image.Image:
        generator = torch.Generator(self.device).manual_seed(seed)
        common = dict(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            generator=generator,
            output_type="pil",
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


def _drop_empty_fp32_warning(record: logging.LogRecord) -> bool:
    """diffusers 0.42 warns "modules ... that should be kept in float32: []" on every `.to(dtype=...)`,
    even when the list is empty (here, for the UNet and the VAE at each load): noise, dropped."""
    return "kept in float32: []" not in record.getMessage()


def _load_txt2img(pipeline_cls, model: str, dtype: torch.dtype):
    kwargs = dict(dtype=dtype, use_safetensors=True)
    if dtype == torch.float16 and not Path(model).is_dir():
        try:  # hub checkpoints ship an fp16 variant: half the download
            return pipeline_cls.from_pretrained(model, variant="fp16", **kwargs)
        except (OSError, ValueError):
            log.info("no fp16 variant for %s; loading the default weights", model)
    return pipeline_cls.from_pretrained(model, **kwargs)
