"""A LoRA made ready for the pipeline without touching it, so the pipeline lock covers only injection.

Reading the file (hashed on the way), parsing it into CPU tensors (page-locked for a CUDA
pipeline), mapping its keys as diffusers maps them, the preflight against the pipeline's modules,
the LoraConfig a hot-swap needs, and a bundle's token embeddings: none of it changes the pipeline,
and it reads only the pipeline's configuration and module shapes, which injection and deletion
leave as they are (a LoRA layer wraps its base layer, whose shape it reports). So it runs in the
service's fetch threads, beside another request's denoising, and the adapter cache, under the
lock, only injects or copies in place and activates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.bundles import load_embedding_rows
from inference.errors import ErrorCode, ServiceError
from inference.hotswap import UnetLora
from inference.integrity import CorruptEntry
from inference.lora_compat import LoraSummary, LoraWeights, check_lora_weights, read_lora
from inference.lora_file import LoraFile


@dataclass
class PreparedLora:
    lora: LoraFile
    weights: LoraWeights
    summary: LoraSummary
    unet: UnetLora | None  # UNet layers in PEFT keys + config (what a hot-swap writes); None: PEFT's path only
    token_rows: list[torch.Tensor] | None  # a bundle's embeddings for both text encoders, verified


def prepare(pipe, lora: LoraFile, pin_memory: bool = False) -> PreparedLora:
    """Read, verify, parse and preflight `lora` for `pipe` (its tensors page-locked with `pin_memory`,
    for a pipeline on a GPU). A failure that is the file's fault
    (ServiceError lora_invalid/lora_incompatible, CorruptEntry) names the LoRA, so the service can
    drop it from the disk cache; FileNotFoundError means another worker evicted it meanwhile."""
    try:
        weights = read_lora(pipe, lora.path, lora.expected_sha256(lora.path), pin_memory)
        summary = check_lora_weights(pipe, weights.state_dict)
        unet = UnetLora.parse(weights)
        check_declared_ranks(unet)
        rows = None
        if lora.tokens is not None:
            rows = load_embedding_rows(lora.tokens.embeddings, lora.expected_sha256(lora.tokens.embeddings))
    except (ServiceError, CorruptEntry) as exc:
        exc.lora = lora
        raise
    return PreparedLora(lora, weights, summary, unet, rows)


def check_declared_ranks(unet: UnetLora | None) -> None:
    """lora_invalid when the file's metadata gives a module another rank than its tensors have: PEFT
    would refuse it at injection, but a copy into a resident adapter's layers would scale it wrong."""
    for path in sorted(unet.modules) if unet is not None else ():
        declared, actual = unet.rank_alpha(path)[0], unet.state[f"{path}.lora_A.weight"].shape[0]
        if declared != actual:
            raise ServiceError(ErrorCode.LORA_INVALID, f"lora_adapter_metadata gives unet.{path} rank {declared}, "
                                                       f"its tensors have rank {actual}")
