"""Putting a new UNet LoRA into an existing adapter's layers instead of injecting a new adapter.

When the adapter cache is full, the least recently used adapter's layers are reused: injection
walks the whole model and builds new modules, a swap only writes weights. Same-shaped LoRAs (the
usual case: one trainer, one rank) are copied straight into the layers; other ranks go through
diffusers' `hotswap=True`, which walks the model twice (`state_dict()`, `modules()`). Text-encoder
LoRAs, biases and DoRA are left to PEFT's own injection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from inference.lora_compat import LoraSummary, LoraWeights
from inference.peft_internals import (adapter_weight_shapes, has_adapter, lora_config_for, module_scaling,
                                      rank_and_alpha, set_adapter_scaling, set_rank_alpha, uses_rslora,
                                      uses_rslora_config, write_adapter_weights)


def can_hotswap(old: LoraSummary, new: LoraSummary) -> bool:
    """diffusers/PEFT hot-swap only UNet layers, and only into modules the old adapter already has."""
    return not old.has_text_encoder_layers and not new.has_text_encoder_layers and new.modules <= old.modules


@dataclass
class UnetLora:
    """A UNet-only LoRA in PEFT keys, with the LoraConfig diffusers would build for it on load."""

    state: dict[str, torch.Tensor]  # "{module path}.lora_A.weight" / ".lora_B.weight"
    config: Any  # peft.LoraConfig
    modules: set[str]

    @classmethod
    def parse(cls, weights: LoraWeights) -> UnetLora | None:
        """None for what only PEFT's own path handles: text-encoder layers, biases, DoRA."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        prefix = "unet."
        state = {k.removeprefix(prefix): v for k, v in weights.state_dict.items() if k.startswith(prefix)}
        if not state or len(state) != len(weights.state_dict):
            return None
        if "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(state)
        if not all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in state):
            return None
        ranks = {f"^{key}": value.shape[1] for key, value in state.items() if ".lora_B." in key}
        alphas = {k.removeprefix(prefix): v for k, v in (weights.network_alphas or {}).items() if k.startswith(prefix)}
        metadata = {k.removeprefix(prefix): v for k, v in weights.metadata.items()
                    if k.startswith(prefix)} if weights.metadata else None
        config = lora_config_for(state, alphas or None, metadata or None, ranks)
        return cls(state, config, {key.rsplit(".lora_", 1)[0] for key in state})

    def rank_alpha(self, path: str) -> tuple[int, float]:
        return rank_and_alpha(self.config, path)

    def module_scaling(self, path: str) -> float:
        return module_scaling(self.config, path)


def in_place_plan(slot: dict[str, object], name: str, lora: UnetLora) -> list[tuple] | None:
    """(path, layer, down, up) for every module of `lora` when each tensor has the shape of adapter
    `name`'s in `slot` (module path -> layer); None when the LoRA does not fit that way."""
    plan = []
    for path in lora.modules:
        layer = slot.get(path)
        down, up = lora.state.get(f"{path}.lora_A.weight"), lora.state.get(f"{path}.lora_B.weight")
        if (layer is None or down is None or up is None
                or uses_rslora(layer, name) != uses_rslora_config(lora.config)
                or (down.shape, up.shape) != adapter_weight_shapes(layer, name)):
            return None
        plan.append((path, layer, down, up))
    return plan


def copy_in_place(plan: list[tuple], slot: dict[str, object], name: str, lora: UnetLora) -> None:
    """Write `plan` into adapter `name`'s layers; the slot's layers the LoRA leaves out get zero
    weights, as PEFT's hotswap does. Nothing here can fail half-way on a valid plan."""
    covered = {id(layer) for _, layer, _, _ in plan}
    for layer in slot.values():
        if id(layer) not in covered:
            write_adapter_weights(layer, name, None, None)
    for path, layer, down, up in plan:
        write_adapter_weights(layer, name, down, up)
        rank, alpha = lora.rank_alpha(path)
        set_rank_alpha(layer, name, rank, alpha, lora.module_scaling(path))


def give_each_module_its_scaling(named_layers: list[tuple[str, object]], name: str, lora: UnetLora) -> None:
    """After diffusers' `hotswap=True`: PEFT leaves `r` and `lora_alpha` at the old adapter's values
    and sets `scaling` from the config's default r/alpha (its patterns are matched against parameter
    keys, where they never match). `set_scale`, run on every activation, recomputes scaling from
    alpha and r, so alpha is rewritten to give each module its own alpha/rank."""
    for path, layer in named_layers:
        if path in lora.modules and has_adapter(layer, name):
            set_adapter_scaling(layer, name, lora.module_scaling(path))
