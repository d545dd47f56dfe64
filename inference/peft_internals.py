"""Every call into PEFT's and diffusers' private or undocumented API, in one place.

The adapter cache needs a few things the public API does not offer: the LoraConfig diffusers
builds for a file (to hot-swap without re-reading it), PEFT's rank/alpha pattern resolution, the
per-adapter rank/alpha/scaling dicts of a LoRA layer (written after an in-place swap), the
`_pipeline` argument of diffusers' component loaders, a merged layer's bookkeeping, and a layer's
active-adapter fields (set without PEFT's walk over every resident adapter). Each is
wrapped here so an upgrade has one file to re-check; `tests/test_peft_internals.py` pins the
versions they were checked against and exercises each wrapper.
"""

from __future__ import annotations

from typing import Any

import torch

CHECKED_VERSIONS = {"diffusers": "0.42.1", "peft": "0.21.2"}


def lora_config_for(state_dict: dict[str, torch.Tensor], network_alphas: dict | None, metadata: dict | None,
                    ranks: dict[str, int]) -> Any:
    """The peft.LoraConfig diffusers' `load_lora_into_unet` would build for these PEFT-keyed tensors."""
    from diffusers.utils.peft_utils import _create_lora_config

    return _create_lora_config(state_dict, network_alphas, metadata, ranks)


def rank_and_alpha(config: Any, module_path: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives `module_path` when it injects `config` (its pattern rules)."""
    from peft.utils.other import get_pattern_key

    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module_path), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module_path), config.lora_alpha)
    return rank, alpha


def hotswap_refusal(old_config: Any, new_config: Any) -> str | None:
    """Why PEFT would refuse to hot-swap `new_config` into an adapter made with `old_config`, or None."""
    from peft.utils.hotswap import check_hotswap_configs_compatible

    try:
        check_hotswap_configs_compatible(old_config, new_config)
    except ValueError as exc:
        return str(exc)
    return None


def load_into_pipeline(pipe, state_dict: dict[str, torch.Tensor], *, adapter_name: str, network_alphas: dict | None,
                       metadata: dict | None, hotswap: bool = False) -> None:
    """diffusers' `load_lora_weights` after its own file read and conversion: the components the
    tensors touch, each through its loader (`_pipeline` lets them see the pipeline's hooks)."""
    common = dict(network_alphas=network_alphas, adapter_name=adapter_name, metadata=metadata, _pipeline=pipe,
                  low_cpu_mem_usage=True, hotswap=hotswap)
    present = {key.split(".", 1)[0] for key in state_dict}
    if "unet" in present:
        pipe.load_lora_into_unet(state_dict, unet=pipe.unet, **common)
    for prefix, encoder in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        if prefix in present:
            pipe.load_lora_into_text_encoder(state_dict, text_encoder=encoder, prefix=prefix,
                                             lora_scale=pipe.lora_scale, **common)


def set_rank_alpha(layer, adapter_name: str, rank: int, alpha: float, scaling: float) -> None:
    """Give adapter `adapter_name` of a PEFT LoRA layer its own rank, alpha and scaling: PEFT keeps
    them in per-adapter dicts and recomputes scaling from alpha and rank in `set_scale`."""
    layer.r[adapter_name] = rank
    layer.lora_alpha[adapter_name] = alpha
    layer.scaling[adapter_name] = scaling


def alpha_for_scaling(layer, adapter_name: str, scaling: float) -> float:
    """The alpha that makes `set_scale` give back `scaling` with this layer's rank (rsLoRA or not)."""
    rank = layer.r[adapter_name]
    return scaling * (rank**0.5 if layer.use_rslora[adapter_name] else rank)


def restore_base_weight(layer, weight: torch.Tensor) -> None:
    """Put a merged layer's saved base weight back and mark it unmerged (PEFT's own unmerge subtracts,
    which is not exact in floating point)."""
    layer.get_base_layer().weight.data.copy_(weight)
    layer.merged_adapters.clear()


def set_active_adapters(layer, adapter_names: list[str]) -> None:
    """Make exactly `adapter_names` active in a LoRA layer, or disable its adapters when empty.

    PEFT's `set_adapter`/`enable_adapters` also toggle `requires_grad` on every parameter of every
    adapter the layer holds, so a switch costs more with each resident adapter (diffusers #11816:
    0.19 -> 0.92 s). Generation runs without autograd, so only the two fields they end with matter:
    the active list and the disabled flag. Cost: constant, whatever the number of resident adapters.
    """
    if adapter_names:
        layer._active_adapter = list(adapter_names)
    layer._disable_adapters = not adapter_names


def is_plain_lora_linear(layer) -> bool:
    """A PEFT LoRA layer over an nn.Linear (not Conv, Embedding, a quantized or parameter wrapper),
    the one kind `add_adapter_to_layer` fills."""
    from peft.tuners.lora.layer import Linear

    return type(layer) is Linear and isinstance(layer.get_base_layer(), torch.nn.Linear)


def add_adapter_to_layer(layer, adapter_name: str, rank: int, alpha: float, config: Any, module_path: str,
                         down: torch.Tensor, up: torch.Tensor) -> None:
    """Add adapter `adapter_name` with these weights to a PEFT LoRA Linear that already exists.

    `update_layer` with the arguments PEFT's `_create_and_replace` gives an existing LoRA layer,
    under the meta device (as PEFT's `low_cpu_mem_usage` does: no allocation, no init), then the
    weights assigned on the base layer's device and dtype, where PEFT's loading puts them."""
    with torch.device("meta"):
        layer.update_layer(adapter_name, rank, lora_alpha=alpha, target_name=module_path, config=config)
    weight = layer.get_base_layer().weight
    with torch.no_grad():
        layer.lora_A[adapter_name].weight = torch.nn.Parameter(down.to(weight.device, weight.dtype),
                                                               requires_grad=False)
        layer.lora_B[adapter_name].weight = torch.nn.Parameter(up.to(weight.device, weight.dtype),
                                                               requires_grad=False)
    layer.lora_dropout[adapter_name].train(layer.training)


def register_adapter_config(model, adapter_name: str, config: Any) -> None:
    """What PEFT's injection and diffusers' loader record on the model for a new adapter: its config
    in `peft_config` (which diffusers deletes with the last adapter) and the loaded flag."""
    if getattr(model, "peft_config", None) is None:
        model.peft_config = {}
    model.peft_config[adapter_name] = config
    model._hf_peft_config_loaded = True
