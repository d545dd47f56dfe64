"""Every call into PEFT's and diffusers' private or undocumented API, and every touch of a PEFT
layer's attributes, in one place.

The adapter cache needs a few things the public API does not offer: the LoraConfig diffusers
builds for a file (to hot-swap without re-reading it), PEFT's rank/alpha pattern resolution, the
per-adapter rank/alpha/scaling dicts of a LoRA layer (written after an in-place swap), the
`_pipeline` argument of diffusers' component loaders, a merged layer's bookkeeping, and a layer's
active-adapter fields (set without PEFT's walk over every resident adapter). It also walks the
LoRA layers (`lora_layers`, the one walk), reads and writes an adapter's down/up weights, merges,
and removes an adapter with everything its injection left (`purge_adapter`). Each is wrapped here
so an upgrade has one file to re-check: `tests/test_architecture.py` fails when another module
touches a PEFT layer attribute, and `tests/test_peft_internals.py` pins the versions these were
checked against and exercises each wrapper.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKED_VERSIONS = {"diffusers": "0.42.1", "peft": "0.21.2"}
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # the pipeline's modules a LoRA may reach


# -- the layers and their adapters -------------------------------------------------------------

def lora_layers(pipe_or_model) -> list[tuple[str, str, Any]]:
    """(component, module path, layer) for every PEFT LoRA layer of a pipeline's LoRA components, or
    of one model (component ""): the one walk over them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(pipe_or_model, torch.nn.Module):
        models = [("", pipe_or_model)]
    else:
        models = [(c, getattr(pipe_or_model, c, None)) for c in LORA_COMPONENTS]
    return [(component, path, module) for component, model in models if model is not None
            for path, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def adapter_names(layer) -> set[str]:
    """The adapters a PEFT layer holds, whatever their kind (down/up, embedding, DoRA magnitude)."""
    return {name for attr in layer.adapter_layer_names for name in getattr(layer, attr)}


def has_adapter(layer, name: str) -> bool:
    return any(name in getattr(layer, attr) for attr in layer.adapter_layer_names)


def adapter_config(model, name: str) -> Any:
    """The LoraConfig adapter `name` was injected with into `model`."""
    return model.peft_config[name]


def base_layer_of(module) -> torch.nn.Module:
    """The layer a PEFT LoRA layer wraps; any other module is its own base."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


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


# -- an adapter's weights and scaling ----------------------------------------------------------

def adapter_weight_shapes(layer, name: str) -> tuple[torch.Size, torch.Size]:
    """(down, up) weight shapes of adapter `name` in a LoRA layer."""
    return layer.lora_A[name].weight.shape, layer.lora_B[name].weight.shape


def uses_rslora(layer, name: str) -> bool:
    return bool(layer.use_rslora[name])


def write_adapter_weights(layer, name: str, down: torch.Tensor | None, up: torch.Tensor | None) -> None:
    """Copy `down`/`up` into adapter `name`'s weights in place (None: zeros, a module left out)."""
    with torch.no_grad():
        for module, value in ((layer.lora_A[name], down), (layer.lora_B[name], up)):
            if value is None:
                module.weight.zero_()
            else:
                module.weight.copy_(value)


def module_scaling(config: Any, module_path: str) -> float:
    """The scaling PEFT gives `module_path` under `config`: alpha/rank, or alpha/sqrt(rank) for rsLoRA."""
    rank, alpha = rank_and_alpha(config, module_path)
    return alpha / rank**0.5 if config.use_rslora else alpha / rank


def uses_rslora_config(config: Any) -> bool:
    return bool(config.use_rslora)


def needs_peft_injection(config: Any) -> bool:
    """Whether adapters of `config` need more than plain down/up weights (DoRA, biases, dropout),
    which only PEFT's own injection builds."""
    return bool(config.use_dora or config.lora_bias or config.lora_dropout)


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


def set_adapter_scaling(layer, adapter_name: str, scaling: float) -> None:
    """Give adapter `adapter_name` this scaling at its rank: alpha is rewritten to match, since
    `set_scale` recomputes scaling from alpha and rank at every activation."""
    set_rank_alpha(layer, adapter_name, layer.r[adapter_name], alpha_for_scaling(layer, adapter_name, scaling),
                   scaling)


def set_active_adapters(layer, active: list[tuple[str, float]]) -> None:
    """Make exactly these adapters active in a LoRA layer at these scales, or disable its adapters
    when empty.

    PEFT's `set_adapter`/`enable_adapters` also toggle `requires_grad` on every parameter of every
    adapter the layer holds, so a switch costs more with each resident adapter (diffusers #11816:
    0.19 -> 0.92 s). Generation runs without autograd, so only the two fields they end with matter:
    the active list and the disabled flag. Cost: constant, whatever the number of resident adapters.
    `set_scale` ignores an adapter the layer does not have.
    """
    if active:
        layer._active_adapter = [name for name, _ in active]
    layer._disable_adapters = not active
    for name, scale in active:
        layer.set_scale(name, scale)


# -- merging -----------------------------------------------------------------------------------

def base_weight(layer) -> torch.Tensor:
    return layer.get_base_layer().weight


def can_merge(layer, adapter_names: list[str]) -> bool:
    """Whether PEFT can merge these adapters: not a LoRA with `lora_B` biases into a layer without a
    bias (PEFT raises half-way; unmerged, it computes that layer's biases as usual)."""
    return layer.get_base_layer().bias is not None or not any(layer.lora_bias.get(n) for n in adapter_names)


def bias_merged_by(layer, adapter_names: list[str]) -> torch.Tensor | None:
    """The base layer's bias when merging these adapters changes it (a LoRA with `lora_B` biases:
    PEFT's merge adds them to it), else None."""
    if any(layer.lora_bias.get(name) for name in adapter_names):
        return layer.get_base_layer().bias
    return None


def merge_adapters(layer, adapter_names: list[str]) -> None:
    """PEFT's merge of these adapters into the layer's base weight (and bias, for a bias LoRA)."""
    layer.merge(adapter_names=adapter_names)


def restore_base_weight(layer, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Put a merged layer's saved base weight (and bias, when the merge changed it) back and mark it
    unmerged (PEFT's own unmerge subtracts, which is not exact in floating point)."""
    base = layer.get_base_layer()
    base.weight.data.copy_(weight)
    if bias is not None:
        base.bias.data.copy_(bias)
    layer.merged_adapters.clear()


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


# -- removal, and what a load must not leave ----------------------------------------------------

def purge_adapter(pipe, name: str, keep_layers: list | None = None) -> None:
    """Remove every trace of adapter `name` from the pipeline, even after a half-finished injection.

    Whole modules PEFT wrapped for it (`modules_to_save`: a deep copy that would shadow every later
    adapter) get their original module back; then diffusers' `delete_adapters`, and a sweep over the
    layers and configs it missed (a half-injected adapter may be unknown to some component's
    `peft_config`, which makes diffusers stop early). With `keep_layers` (the LoRA layers there were
    before a failed load), every other LoRA layer left without adapters is replaced by the layer it
    wraps: the model holds exactly the modules it held before the load.
    """
    _restore_wrapped_modules(pipe)
    try:
        pipe.delete_adapters([name])
    except Exception:
        log.debug("delete_adapters(%s) failed; sweeping layers", name, exc_info=True)
    for _, _, layer in lora_layers(pipe):
        if has_adapter(layer, name):
            layer.delete_adapter(name)
    for component in LORA_COMPONENTS:
        config = getattr(getattr(pipe, component, None), "peft_config", None)
        if isinstance(config, dict):
            config.pop(name, None)
    if keep_layers is not None:
        kept = {id(layer) for layer in keep_layers}
        for component, path, layer in lora_layers(pipe):
            if id(layer) not in kept and not adapter_names(layer):
                _replace(getattr(pipe, component), path, layer.get_base_layer())


def load_fault(pipe, name: str) -> str | None:
    """What PEFT's injection of adapter `name` left that the engine cannot serve, or None: weights
    its config promised that the file did not hold (DoRA magnitudes, `lora_B` biases: left on the
    meta device by the low-memory load, they fail every generation), or a module wrapped whole."""
    for component, path, layer in lora_layers(pipe):
        for attr in layer.adapter_layer_names:
            held = getattr(layer, attr)
            if name not in held:
                continue
            weights = held[name].named_parameters() if isinstance(held[name], torch.nn.Module) else [("", held[name])]
            for key, tensor in weights:
                if tensor.is_meta:
                    return f"the file lacks {component}.{path}.{attr}.{name}.{key}, which its metadata requires"
    if wrapped := _wrapped_modules(pipe):
        return f"the LoRA replaces whole modules ({wrapped[0][0]}.{wrapped[0][1]}: modules_to_save), not supported"
    return None


def _wrapped_modules(pipe) -> list[tuple[str, str, Any]]:
    """(component, path, wrapper) for every module PEFT wrapped whole (`modules_to_save` and kin)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [(component, path, module) for component in LORA_COMPONENTS
            if (model := getattr(pipe, component, None)) is not None
            for path, module in model.named_modules() if isinstance(module, AuxiliaryTrainingWrapper)]


def _restore_wrapped_modules(pipe) -> None:
    """Put back the original of every module PEFT wrapped whole (outermost first, then again for
    a wrapper found inside another's original)."""
    while wrapped := _wrapped_modules(pipe):
        component, path, wrapper = wrapped[0]
        _replace(getattr(pipe, component), path, wrapper.original_module)


def _replace(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
