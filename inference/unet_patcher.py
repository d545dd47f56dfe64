"""The UNet's LoRAs written into its own weights, in place (ComfyUI's ModelPatcher way).

A compiled UNet must look the same to dynamo's guards on every request. Guards check a parameter's
identity, shape and dtype, never its values; PEFT's layers, by contrast, keep Python state (the
active adapter names, float scalings) that dynamo guards on, so every new combination of LoRAs
compiled again. Here the UNet holds no PEFT layer at all: each module an active LoRA touches gets

    W = W0 + sum_i scale_i * (alpha_i / rank_i) * up_i @ down_i        (a conv's kernel flattened)

written into its own weight tensor, and a module no LoRA touches any more gets W0 back. W0 comes
from a pristine copy taken the first time the module is patched (half precision where that holds it
exactly, as `inference.fusing` keeps its copies), never from subtracting a delta, so A -> B -> A
rebuilds A's weights bit for bit. Any rank, any scale, any number of LoRAs: the same parameters, the
same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.errors import ErrorCode, ServiceError
from inference.hotswap import UnetLora


@dataclass
class ModuleDelta:
    """One module's LoRA factors on the device, flattened to matrices: W's delta is up @ down."""

    down: torch.Tensor  # (rank, in_features * kh * kw)
    up: torch.Tensor  # (out_features, rank)
    factor: float  # alpha / rank (or rsLoRA's alpha / sqrt(rank))


class UnetPatcher:
    """The resident UNet LoRAs (their factors kept on the device) and the set applied to the weights now."""

    def __init__(self, unet: torch.nn.Module):
        self.modules = {path: m for path, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        self.loras: dict[str, dict[str, ModuleDelta]] = {}  # adapter name -> module path -> factors
        self.pristine: dict[str, torch.Tensor] = {}  # module path -> its weight before any LoRA
        self.patched: set[str] = set()  # module paths whose weight is not W0 now
        self.applied: tuple[tuple[str, float], ...] = ()  # what the weights hold now

    def names(self) -> set[str]:
        return set(self.loras)

    def add(self, name: str, lora: UnetLora) -> None:
        """Keep `lora`'s factors on the UNet's device under `name`; ServiceError lora_incompatible,
        having kept nothing, when a module is missing or its shapes do not fit."""
        deltas = {}
        for path in sorted(lora.modules):
            module = self.modules.get(path)
            down, up = lora.state[f"{path}.lora_A.weight"], lora.state[f"{path}.lora_B.weight"]
            if module is None or not _fits(module.weight, down, up):
                raise ServiceError(ErrorCode.LORA_INCOMPATIBLE,
                                   f"LoRA module {path} does not fit this UNet ({tuple(down.shape)}, {tuple(up.shape)})")
            weight = module.weight
            deltas[path] = ModuleDelta(down=down.to(weight.device, torch.float32).flatten(1),
                                       up=up.to(weight.device, torch.float32).flatten(1),
                                       factor=lora.module_scaling(path))
        self.loras[name] = deltas

    def drop(self, name: str) -> None:
        """Forget adapter `name`; when the weights hold it now, they go back to W0 first."""
        if name in (n for n, _ in self.applied):
            self.apply([])
        self.loras.pop(name, None)

    def apply(self, active: list[tuple[str, float]]) -> None:
        """Make the weights hold exactly these adapters at these scales (names not here are ignored)."""
        state = tuple((name, float(scale)) for name, scale in active if name in self.loras)
        if state == self.applied:
            return
        touched: dict[str, list[tuple[ModuleDelta, float]]] = {}
        for name, scale in state:
            for path, delta in self.loras[name].items():
                touched.setdefault(path, []).append((delta, scale))
        with torch.no_grad():
            for path in self.patched - touched.keys():
                self.modules[path].weight.copy_(self.pristine[path])
            for path, deltas in touched.items():
                self._write(path, deltas)
        self.patched = set(touched)
        self.applied = state

    def _write(self, path: str, deltas: list[tuple[ModuleDelta, float]]) -> None:
        """W = W0 + the deltas, summed in float32 in the order given (the same order, the same bits)."""
        weight = self.modules[path].weight
        if path not in self.pristine:
            self.pristine[path] = _pristine_copy(weight)
        total = self.pristine[path].to(torch.float32, copy=True).flatten(1)  # never the copy itself
        for delta, scale in deltas:
            total.addmm_(delta.up, delta.down, alpha=scale * delta.factor)
        weight.copy_(total.view(weight.shape))


def _fits(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> bool:
    """A Linear's (r, in) and (out, r), or a conv's (r, in, kh, kw) and (out, r, 1, 1)."""
    rank = down.shape[0]
    return (down.dim() == weight.dim() == up.dim() and down.shape[1:] == weight.shape[1:]
            and up.shape[:2] == (weight.shape[0], rank) and all(s == 1 for s in up.shape[2:]))


def _pristine_copy(weight: torch.Tensor) -> torch.Tensor:
    """float16 when it holds the weight exactly (an fp16 checkpoint loaded in float32), else as is."""
    copy = weight.detach().to(torch.float16) if weight.dtype == torch.float32 else weight.detach().clone()
    if copy.dtype != weight.dtype and not torch.equal(copy.to(weight.dtype), weight):
        return weight.detach().clone()
    return copy
