"""How the service renders an enhanced reference (`EnhanceOptions`) and what it costs (`Pricing`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Literal

from pydantic import ValidationError

from sdxl_lora_client.contract import GenerateRequest, GenerateResponse
from sdxl_lora_client.errors import OptionsError
from sdxl_lora_client.store import money

__all__ = ["EnhanceOptions", "Pricing"]


@dataclass
class Pricing:
    """Preprocessing: GPU seconds x price when a price is set, else the spec's flat $0.005 per image."""

    per_image: Decimal = Decimal("0.005")
    per_gpu_second: Decimal | None = None
    direct_per_clip: Decimal = Decimal("0.0001")

    def preprocessing(self, response: GenerateResponse) -> Decimal:
        if self.per_gpu_second is not None:
            gpu_ms = Decimal(str(response.timings_ms.adapter)) + Decimal(str(response.timings_ms.inference))
            return money(gpu_ms / 1000 * money(self.per_gpu_second))
        return money(money(self.per_image) * len(response.images))


@dataclass
class EnhanceOptions:
    """How the service renders an enhanced reference."""

    strength: float = 0.6
    num_inference_steps: int = 30
    guidance_scale: float = 7.0
    delivery: Literal["base64", "url"] = "base64"  # "url" needs S3 on the service; base64 becomes a data: URI
    width: int | None = None
    height: int | None = None
    # Below this identity score (the service's CLIP similarity between the reference and the
    # enhanced image) the enhanced image is judged off-character and the original reference kept.
    min_identity_score: float | None = None

    def __post_init__(self) -> None:
        """Checked against the contract when built: a bad option fails here, once, not at every clip."""
        options = asdict(self)
        score = options.pop("min_identity_score")
        if score is not None and not -1.0 <= score <= 1.0:
            raise OptionsError("min_identity_score", f"{score} is not a cosine similarity in [-1, 1]")
        delivery = options.pop("delivery")
        try:  # the request an enhancement sends, with these options (img2img: an image is there)
            GenerateRequest.model_validate({**options, "prompt": "options", "image": "https://example.invalid/r.png",
                                            "output": {"delivery": delivery}}, strict=False)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise OptionsError(_field_of(error), error["msg"]) from None


def _field_of(error: dict) -> str:
    """The option a contract error is about; rules across fields name both."""
    if error["loc"]:
        return "delivery" if error["loc"][0] == "output" else str(error["loc"][0])
    return "width, height" if "width" in error["msg"] else "num_inference_steps, strength"
