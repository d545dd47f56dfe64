"""Service configuration from the environment (prefix SDXL_LORA_, names fixed by DESIGN.md)."""

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
GiB = 1024**3
RUNPOD_VOLUME = Path("/runpod-volume")


def default_lora_cache_dir() -> Path:
    """On RunPod's network volume when mounted, so every worker shares one cache."""
    if RUNPOD_VOLUME.is_dir():
        return RUNPOD_VOLUME / "sdxl-lora" / "loras"
    return fallback_lora_cache_dir()


def fallback_lora_cache_dir() -> Path:
    """This user's own cache: the default off RunPod, and the fallback when the configured one
    cannot be written."""
    return Path.home() / ".cache" / "sdxl-lora" / "loras"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDXL_LORA_", extra="ignore")

    model: str = DEFAULT_MODEL
    # A VAE to use instead of the model's (hub id or directory): an fp16-safe one such as
    # madebyollin/sdxl-vae-fp16-fix decodes in fp16 instead of upcasting to fp32 for every image.
    vae: str | None = None
    device: str = "auto"  # auto | cuda | cuda:N | cpu | mps
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32
    lora_cache_dir: Path = Field(default_factory=default_lora_cache_dir)
    lora_cache_max_bytes: int = 20 * GiB
    max_resident_adapters: int = Field(default=8, ge=1)
    max_lora_bytes: int = 2 * GiB
    allow_private_urls: bool = False
    api_key: str | None = None
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_prefix: str = "sdxl-lora/"
    queue_max: int = Field(default=16, ge=0)
    # Answers kept for repeated Idempotency-Keys (inference/idempotency.py): how long after the first
    # answer, and how many bytes of answers in all (least recently used evicted first).
    idempotency_ttl_s: float = Field(default=3600.0, gt=0)
    idempotency_max_bytes: int = Field(default=256 * 1024**2, ge=0)
    # Where the keys live: auto = s3 when S3_BUCKET is set, else RunPod's cache volume, else memory
    # (inference/idempotency.py). A claim's lease: how long a worker that died keeps its keys from
    # the fleet (renewed while it renders). Not in the contract, but a deployer may need it.
    idempotency_store: Literal["auto", "s3", "volume", "memory"] = "auto"
    idempotency_lease_s: float = Field(default=10.0, gt=0)
    # Jobs a RunPod worker holds at once: renders one at a time, the next job's fetch meanwhile.
    runpod_concurrency: int = Field(default=2, ge=1)
    # The whole request, fetch to delivery (queueing for the pipeline included): past it the answer is
    # `timeout` and the generation stops at its next denoising step. 180 s holds the contract's
    # largest request on an H100-class GPU with room to spare; a client's 1024x1024, 30-step image
    # takes a few seconds there.
    request_timeout_s: float = Field(default=180.0, gt=0)
    # Not in the contract, but a deployer needs them.
    download_timeout_s: float = 60.0
    max_image_bytes: int = 32 * 1024**2
    presign_expiry_s: int = 3600
    # On SIGTERM, how long requests already accepted may run before the server exits (new ones get 503).
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    # CLIP model id or directory for each img2img image's `identity_score` (inference/identity.py).
    # Off by default: the score costs a second model in GPU memory and, for a hub id, a download,
    # so only a deployer who asks gets it (Dockerfile.gpu sets openai/clip-vit-large-patch14).
    identity_model: str | None = None
    # Merge the active LoRAs into the weights (exactly undone on a switch): auto = on CUDA only.
    fuse_adapters: Literal["auto", "on", "off"] = "auto"
    # torch.compile (inference/compiled.py): `on` compiles the UNet at start for the COMPILE_WARMUP
    # sizes (comma list of WIDTHxHEIGHT) before /readyz is 200; its LoRAs are then patched into the
    # weights, so no request compiles again. compile_backend is not in the contract (tests use eager).
    compile: Literal["on", "off"] = "off"
    compile_warmup: str = "1024x1024"
    compile_backend: str = "inductor"
