"""Adding a UNet LoRA as a new adapter to layers PEFT has already wrapped, without walking the model.

PEFT's injection (what diffusers' `load_lora_into_unet` runs) visits every module of the UNet,
checks each against every existing adapter's prefixes and every target name, reads the whole
state dict to build the config, walks it again to load the weights and once more to mark what
is trainable: ~0.6 s of Python on the full SDXL UNet, all of it under the pipeline lock, for a
LoRA of a few hundred layers. Once one LoRA has been injected, the layers a LoRA of the same
trainer targets are PEFT LoRA layers already; a new adapter there is PEFT's own per-layer
`update_layer` (the call its injection makes for such a layer), run on the meta device so it
allocates nothing, and the prepared tensors assigned as the adapter's weights. The lock then
covers a few hundred dictionary writes instead of three walks over ~7,500 modules.

A LoRA that touches a module not wrapped yet, a text encoder, or needs what PEFT builds beyond
plain down/up weights (DoRA, biases, dropout) goes through PEFT's injection as before.
"""

from __future__ import annotations

from inference.hotswap import UnetLora
from inference.peft_internals import (add_adapter_to_layer, is_plain_lora_linear, needs_peft_injection,
                                      register_adapter_config)


def wrapped_plan(layers: dict[str, object], lora: UnetLora) -> list[tuple] | None:
    """(path, layer, rank, alpha, down, up) for every module of `lora` when each is a plain PEFT LoRA
    Linear already (module path -> layer in `layers`) and the tensors have the shapes the config's
    rank gives; None when only PEFT's injection can add it."""
    config = lora.config
    if needs_peft_injection(config):
        return None
    plan = []
    for path in lora.modules:
        layer = layers.get(path)
        down, up = lora.state.get(f"{path}.lora_A.weight"), lora.state.get(f"{path}.lora_B.weight")
        if layer is None or down is None or up is None or not is_plain_lora_linear(layer):
            return None
        rank, alpha = lora.rank_alpha(path)
        if tuple(down.shape) != (rank, layer.in_features) or tuple(up.shape) != (layer.out_features, rank):
            return None
        plan.append((path, layer, rank, alpha, down, up))
    return plan


def inject_into_wrapped(unet, name: str, plan: list[tuple], lora: UnetLora) -> None:
    """Add adapter `name` to every layer of `plan` and register its config on the UNet, as PEFT's
    injection would leave them. On failure the caller removes what was added (`delete_adapters`)."""
    register_adapter_config(unet, name, lora.config)
    for path, layer, rank, alpha, down, up in plan:
        add_adapter_to_layer(layer, name, rank, alpha, lora.config, path, down, up)
