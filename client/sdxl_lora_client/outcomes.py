"""What `apply()` and `prefetch()` hand back: typed, so a caller never guesses from a `data:` prefix."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from sdxl_lora_client.contract import ImageOut, PrefetchOutcome
from sdxl_lora_client.store import Charge

Path = Literal["none", "reference_fallback", "direct", "preprocessed"]
ClipStatus = Literal["enhanced", "direct", "original"]


@dataclass
class ClipPrompt:
    """One clip of a video job, as the video generator holds it."""

    clip_id: str
    prompt: str
    character_reference_urls: list[str] = field(default_factory=list)
    scene_reference_urls: list[str] = field(default_factory=list)
    video_url: str | None = None  # set when the client itself ran the video prediction (direct path)


@dataclass
class ClipOutcome:
    """What the LoRA step did for one clip.

    `status`: "enhanced" (its first character reference replaced by `image`), "direct" (the video
    model got the LoRA) or "original" (references untouched). `reason` is None when the step did
    what it should, else an `ErrorCode` value or a `ClientCode`. `cost` is what was charged for this
    clip (recorded or in `unrecorded_charges`); `attempts` counts the requests this `apply()` sent
    for it (0 when it shared the request another `apply()` of the same job sent)."""

    clip_id: str
    status: ClipStatus = "original"
    reason: str | None = None
    image: ImageOut | None = None
    cost: Decimal = Decimal(0)
    attempts: int = 0


@dataclass
class ApplyResult:
    """One `apply()`: the clips to generate and, per clip, what happened.

    `warnings` has one line per clip that fell back (and why); `unrecorded_charges` holds charges
    the ledger could not take in time: pass them to `SqlStore.record_charges` later.
    """

    path: Path
    clips: list[ClipPrompt]
    outcomes: list[ClipOutcome] = field(default_factory=list)
    lora_url: str | None = None
    warnings: list[str] = field(default_factory=list)
    unrecorded_charges: list[Charge] = field(default_factory=list)


@dataclass
class PrefetchResult:
    """One `prefetch()`: `ok` when the service cached the LoRA; else `reason` (an `ErrorCode`
    value or a `ClientCode`) and `message` say why. `loras` is the service's answer when it gave one."""

    lora_model_id: str
    ok: bool
    reason: str | None = None
    message: str = ""
    loras: list[PrefetchOutcome] = field(default_factory=list)
