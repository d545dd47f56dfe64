"""The video-model compatibility matrix: data in compat.toml, overridable by the deployer."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MATRIX = Path(__file__).with_name("compat.toml")
OVERRIDE_ENV = "SDXL_LORA_COMPAT_FILE"


@dataclass(frozen=True)
class VideoModel:
    name: str
    replicate_model: str  # owner/name on Replicate
    architecture: str  # what a directly passed LoRA must have been trained for
    image_field: str  # input that takes the start/reference image
    direct_lora_supported: bool = False
    lora_field: str = ""
    lora_scale_field: str = ""
    reference_field: str = ""
    evidence: str = ""
    checked: str = ""


def load_matrix(path: str | Path | None = None) -> dict[str, VideoModel]:
    path = Path(path or os.environ.get(OVERRIDE_ENV) or DEFAULT_MATRIX)
    with path.open("rb") as f:
        data = tomllib.load(f)
    return {name: VideoModel(name=name, **entry) for name, entry in data.get("models", {}).items()}


def direct_model(matrix: dict[str, VideoModel], video_model: str, direct_weights: dict[str, str]) -> VideoModel | None:
    """The matrix entry when the direct path applies: the model takes LoRAs, and the LoRA record has
    weights for that model's architecture. Unknown models never go direct."""
    entry = matrix.get(video_model)
    if entry is None or not entry.direct_lora_supported or not entry.lora_field:
        return None
    return entry if direct_weights.get(entry.architecture) else None
