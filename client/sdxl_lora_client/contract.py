"""The wire contract (DESIGN.md): the body of POST /v1/generate and of a RunPod job's input, the
response, and the error codes with their HTTP statuses.

Pure pydantic. It lives in the client's distribution because the video generator installs only
that; the service (FastAPI app, RunPod handler, inference core) imports it from here.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    LORA_DOWNLOAD_FAILED = "lora_download_failed"
    LORA_INVALID = "lora_invalid"
    LORA_INCOMPATIBLE = "lora_incompatible"
    IMAGE_INVALID = "image_invalid"
    BUSY = "busy"
    OUT_OF_MEMORY = "out_of_memory"
    UPLOAD_FAILED = "upload_failed"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.LORA_DOWNLOAD_FAILED: 424,
    ErrorCode.LORA_INVALID: 422,
    ErrorCode.LORA_INCOMPATIBLE: 422,
    ErrorCode.IMAGE_INVALID: 422,
    ErrorCode.BUSY: 429,
    ErrorCode.OUT_OF_MEMORY: 503,
    ErrorCode.UPLOAD_FAILED: 502,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
}

# A busy error's message ends with this phrase, so a RunPod client (no headers there) reads the
# same wait as an HTTP client reads from Retry-After.
RETRY_AFTER_MESSAGE = re.compile(r"retry after (\d+) s$")


def with_retry_after(message: str, seconds: int) -> str:
    """A busy error's message, carrying its Retry-After in the form RETRY_AFTER_MESSAGE reads."""
    return f"{message}; retry after {seconds} s"


MAX_SEED = 2**63 - 1 - 8  # seed + i (i < 8) must still fit torch.Generator.manual_seed


# Requests are strict: numbers are JSON numbers, never booleans or strings, as the JSON Schema says;
# `"seed": true` is refused, not read as 1, and `"42"` is not 42.
STRICT = ConfigDict(extra="forbid", strict=True)


def _whole_number(value):
    """JSON Schema's integer: 4.0 is the integer 4 (the schema admits it, so the server takes it);
    4.5, true and "4" stay what they are and are refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds):
    """An integer field of the contract with its bounds (before the validator, so they reach the
    JSON Schema as minimum/maximum/multipleOf, also inside `X | None`)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole_number)]


Side = json_int(ge=64, le=2048, multiple_of=8)
Seed = json_int(ge=0, le=MAX_SEED)
Steps = json_int(ge=1, le=100)
ImageCount = json_int(ge=1, le=8)


# A LoRA source is a URL of one of three schemes; anything else is an invalid request, not a failed
# download. The pattern reaches the JSON Schema, so generated clients and fuzzers see the same rule.
def _parsable_url(url: str) -> str:
    """What the pattern cannot see: a URL that urllib refuses to split (an unclosed `[` host, say)."""
    try:
        urlsplit(url).port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    return url


LoraUrl = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^(https?|s3)://[^\s]+$",
                               description="https://, http:// or s3:// location of the .safetensors file"),
                    AfterValidator(_parsable_url)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


def _each_id_once(loras: list) -> list:
    ids = [lora.id for lora in loras]
    if len(set(ids)) != len(ids):
        raise ValueError("each LoRA id may appear once per request")
    return loras


class LoraSpec(BaseModel):
    model_config = STRICT

    id: str = Field(min_length=1, max_length=200,
                    description="Names a character's weights; the weights themselves are identified by content "
                                "(sha256), so an id pointed at another URL is fetched again.")
    url: LoraUrl
    scale: float = Field(1.0, ge=-4.0, le=4.0)
    sha256: Sha256 | None = Field(None, description="expected sha256 of the file")


class OutputSpec(BaseModel):
    model_config = STRICT

    format: Literal["png", "jpeg", "webp"] = "png"
    delivery: Literal["base64", "url"] = "base64"


class GenerateRequest(BaseModel):
    model_config = STRICT

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    loras: list[LoraSpec] = Field(default_factory=list, max_length=4)
    image: str | None = Field(None, min_length=1, max_length=64 * 1024 * 1024,
                              description="https/s3 URL or data: URI of the reference image: img2img")
    strength: float = Field(0.6, gt=0.0, le=1.0, description="img2img only")
    width: Side | None = Field(None, description="default 1024; img2img: the reference's")
    height: Side | None = Field(None, description="default 1024; img2img: the reference's")
    num_inference_steps: Steps = 30
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)
    seed: Seed | None = Field(None, description="chosen and returned when absent")
    num_images: ImageCount = 1
    output: OutputSpec = Field(default_factory=OutputSpec)

    _unique_ids = field_validator("loras")(_each_id_once)

    @model_validator(mode="after")
    def _both_sides_or_neither(self) -> GenerateRequest:
        if (self.width is None) != (self.height is None):
            raise ValueError("give width and height together")
        return self

    @model_validator(mode="after")
    def _img2img_runs_at_least_one_step(self) -> GenerateRequest:
        # img2img denoises the last int(steps * strength) steps (diffusers' get_timesteps); zero would crash it.
        if self.image is not None and int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(f"img2img runs int(num_inference_steps * strength) denoising steps: "
                             f"{self.num_inference_steps} x {self.strength:g} is less than one step")
        return self


class ImageOut(BaseModel):
    seed: int
    width: int
    height: int
    mime: str
    sha256: str = Field(description="sha256 of the encoded image bytes")
    base64: str | None = None
    url: str | None = None
    identity_score: float | None = Field(
        None, description="cosine similarity of CLIP image embeddings between the reference image and this image "
                          "(1.0 = identical); only for img2img with SDXL_LORA_IDENTITY_MODEL set")


class LoraOut(BaseModel):
    id: str
    sha256: str
    source: Literal["resident", "disk", "download"]


class ModelOut(BaseModel):
    id: str
    dtype: str
    device: str


class Timings(BaseModel):
    fetch: float = 0.0
    adapter: float = 0.0
    inference: float = 0.0
    encode: float = 0.0
    upload: float = 0.0
    total: float = 0.0


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    loras: list[LoraOut]
    model: ModelOut
    timings_ms: Timings


class PrefetchLora(BaseModel):
    """A LoRA to put into the service's disk cache: a generate request's LoRA without the scale."""
    model_config = STRICT

    id: str = Field(min_length=1, max_length=200)
    url: LoraUrl
    sha256: Sha256 | None = Field(None, description="expected sha256 of the file")


class PrefetchRequest(BaseModel):
    """Body of POST /v1/loras/prefetch and `input.prefetch` of a RunPod job."""
    model_config = STRICT

    loras: list[PrefetchLora] = Field(min_length=1, max_length=16)

    _unique_ids = field_validator("loras")(_each_id_once)


class PrefetchOutcome(BaseModel):
    id: str
    sha256: str | None = None
    status: Literal["cached", "failed"]
    code: ErrorCode | None = None
    message: str | None = None


class PrefetchResponse(BaseModel):
    loras: list[PrefetchOutcome]


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
