"""The request the service gets for one clip, its seed and its idempotency key.

Seed and key are fixed by job, clip and content, so a replayed job sends the same requests and the
service's idempotency store answers them without rendering again.
"""

from __future__ import annotations

import hashlib
import json

from sdxl_lora_client.contract import GenerateRequest, LoraSpec, OutputSpec
from sdxl_lora_client.options import EnhanceOptions
from sdxl_lora_client.outcomes import ClipPrompt
from sdxl_lora_client.store import LoraRecord

__all__ = ["clip_seed", "enhance_request", "idempotency_key"]


def clip_seed(job_id: str, clip_id: str) -> int:
    """A seed fixed by job and clip, so a replayed job renders the same references."""
    return int(hashlib.sha256(f"{job_id}/{clip_id}".encode()).hexdigest()[:8], 16) % 2**31


def idempotency_key(job_id: str, clip_id: str, request: GenerateRequest) -> str:
    """The request's idempotency key: fixed by job, clip and the request's content (canonical JSON),
    so a replay of the same clip is answered from the service's store and a changed request is not."""
    canonical = json.dumps({"job_id": job_id, "clip_id": clip_id,
                            "request": request.model_dump(mode="json", exclude_none=True)},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def enhance_request(job_id: str, clip: ClipPrompt, record: LoraRecord, options: EnhanceOptions) -> GenerateRequest:
    """img2img of the clip's first character reference with the LoRA, its trigger word in the prompt."""
    trigger = (record.trigger or "").strip()
    prompt = clip.prompt if not trigger or trigger in clip.prompt else f"{trigger} {clip.prompt}"
    return GenerateRequest(
        prompt=prompt[:2000],
        loras=[LoraSpec(id=record.id, url=record.url, sha256=record.sha256)],
        image=clip.character_reference_urls[0], strength=options.strength,
        num_inference_steps=options.num_inference_steps, guidance_scale=options.guidance_scale,
        width=options.width, height=options.height, output=OutputSpec(delivery=options.delivery),
        seed=clip_seed(job_id, clip.clip_id),
    )
