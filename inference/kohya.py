"""kohya-layout LoRA files (sd-scripts, ai-toolkit, diffusers' `--output_kohya_format`), checked and
made alpha-free before diffusers converts their keys.

kohya's `networks/lora.py` keeps one 0-dim ``alpha`` buffer per module and scales that module's
update by alpha / rank (alpha 0 or missing: scale 1). diffusers' conversion
(`_convert_non_diffusers_lora_to_diffusers`) renames the alphas into keys that its LoraConfig
patterns then miss for the attention and text-encoder modules, so those modules get the file's most
common alpha (diffusers 0.42). The alpha step is therefore done here, in one place, on the file's
own keys: each module's up weight is multiplied by its alpha / rank and the alphas are dropped, so
diffusers sees alpha = rank (scale 1) everywhere and only renames keys.

Everything refused here quotes the file's own key names, before diffusers renames anything.
"""

from __future__ import annotations

import torch

from inference.errors import ErrorCode, ServiceError

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# ai-toolkit names SDXL modules as diffusers does; diffusers' key conversion has no rule for the
# added-conditioning MLP under that name (it maps only the SGM name label_emb), so it gets that name.
AI_TOOLKIT_RENAMES = {
    "lora_unet_add_embedding_linear_1": "lora_unet_label_emb_0_0",
    "lora_unet_add_embedding_linear_2": "lora_unet_label_emb_0_2",
}
DORA_MARKERS = ("dora_scale", "lora_magnitude_vector")
LYCORIS_MARKERS = ("hada_", "lokr_", ".oft_", "lora_mid", "lora_te3_")


def incompatible(message: str) -> ServiceError:
    return ServiceError(ErrorCode.LORA_INCOMPATIBLE, message)


def invalid(message: str) -> ServiceError:
    return ServiceError(ErrorCode.LORA_INVALID, message)


def _examples(keys: list[str], count: int = 2) -> str:
    return ", ".join(repr(k) for k in keys[:count])


def refuse_other_networks(keys: list[str]) -> None:
    """DoRA and LyCORIS networks other than LoRA/LoCon, by the file's own keys, before diffusers'
    conversion (which drops DoRA's magnitudes with a log line and renames LyCORIS keys half-way)."""
    dora = sorted(k for k in keys if any(m in k for m in DORA_MARKERS))
    if dora:
        raise incompatible(f"DoRA (weight-decomposed LoRA) is not supported: {len(dora)} magnitude tensors, "
                           f"e.g. {_examples(dora)}; export the LoRA without DoRA")
    lycoris = sorted(k for k in keys if any(m in k for m in LYCORIS_MARKERS))
    if lycoris:
        raise incompatible(f"LyCORIS LoHa/LoKr/OFT/Tucker layers are not supported ({len(lycoris)} keys, "
                           f"e.g. {_examples(lycoris)}); only LoRA and LoCon are")


def is_kohya_layout(keys) -> bool:
    return any(key.startswith(KOHYA_PREFIXES) for key in keys)


def fold_kohya_alphas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's modules as down/up pairs with each alpha / rank folded into the up weight, ai-toolkit's
    add_embedding renamed; refuses stray keys, unpaired weights, rank 0 and bad alphas."""
    stray = sorted(k for k in tensors if not k.startswith(KOHYA_PREFIXES))
    if stray:
        raise incompatible(f"{len(stray)} of {len(tensors)} keys are not kohya LoRA keys "
                           f"(lora_unet_/lora_te1_/lora_te2_...), e.g. {_examples(stray)}")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, dot, rest = key.partition(".")
        suffix = dot + rest
        if suffix not in (DOWN, UP, ALPHA):
            raise incompatible(f"{key!r} is not a LoRA down/up weight or alpha")
        modules.setdefault(name, {})[suffix] = tensor
    folded = {}
    for name, parts in modules.items():
        if DOWN not in parts or UP not in parts:
            missing = DOWN if DOWN not in parts else UP
            raise incompatible(f"{name}: the file has no {name + missing!r} for its {sorted(name + s for s in parts)}")
        down, up = parts[DOWN], parts[UP]
        rank = down.shape[0] if down.dim() >= 2 else 0
        if rank == 0 or up.dim() < 2 or up.shape[1] != rank:
            raise invalid(f"{name}: down {tuple(down.shape)} / up {tuple(up.shape)} is not a LoRA pair of rank >= 1")
        factor = _alpha(name, parts.get(ALPHA), rank) / rank
        name = AI_TOOLKIT_RENAMES.get(name, name)
        folded[name + DOWN] = down
        folded[name + UP] = up if factor == 1 else up.float() * factor
    return folded


def _alpha(name: str, alpha: torch.Tensor | None, rank: int) -> float:
    """kohya's rule (networks/lora.py LoRAModule.__init__): no alpha, or alpha 0, means alpha = rank."""
    if alpha is None:
        return float(rank)
    if alpha.numel() != 1 or alpha.is_complex():
        raise invalid(f"{name}.alpha has shape {tuple(alpha.shape)}; kohya writes one number per module")
    value = float(alpha.reshape(()).item())
    if value != value or value in (float("inf"), float("-inf")):
        raise invalid(f"{name}.alpha is {value}")
    return value or float(rank)
