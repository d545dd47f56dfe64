"""What a LoRA file may hold, checked once when it is read, before diffusers or PEFT see any of it.

Values: every tensor a float (an alpha may be an integer: diffusers' `--output_kohya_format` writes
int64), finite, not empty, and only alphas 0-dim. A NaN answers a black image and an int8 or fp8
tensor is not a weight anyone trained.

Metadata: diffusers passes a file's ``lora_adapter_metadata`` to ``LoraConfig(**kwargs)`` as it is,
so a file could ask PEFT for `modules_to_save` (a full trainable copy of a block, left behind by a
failed load), layer replication, or an init scheme that rewrites base weights (PiSSA, OLoRA,
LoftQ, EVA, CorDA). Each key is checked against an allow-list (OWASP: untrusted input is validated
against what is expected, never passed through), and PEFT is given only what a LoRA needs: rank,
alpha, target modules, rank and alpha patterns, rsLoRA, and a bias flag the tensors back.
"""

from __future__ import annotations

import math

import torch

from inference.errors import ErrorCode, ServiceError

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ALPHA_DTYPES = FLOATS + (torch.int64, torch.int32, torch.int16)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# What a LoRA needs; passed on to PEFT once checked.
NEEDED = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "lora_bias")
# What PEFT's LoraConfig.to_dict() writes that only describes the training run; dropped.
DESCRIPTIVE = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
               "inference_mode", "lora_dropout", "megatron_core", "qalora_group_size", "runtime_config",
               "init_lora_weights", "use_dora")
# Features that change more than the LoRA layers; accepted only switched off (None, False, {}, [], "none").
SWITCHED_OFF = ("modules_to_save", "layer_replication", "layers_to_transform", "layers_pattern", "exclude_modules",
                "trainable_token_indices", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                "velora_config", "alora_invocation_tokens", "monteclora_config", "arrow_config", "kasa_config",
                "use_bdlora", "megatron_config", "target_parameters", "use_qalora", "fan_in_fan_out",
                "ensure_weight_tying", "bias")


def invalid(message: str) -> ServiceError:
    return ServiceError(ErrorCode.LORA_INVALID, message)


def check_values(tensors: dict[str, torch.Tensor]) -> None:
    """lora_invalid for a non-float, empty, 0-dim (alphas aside) or non-finite tensor, naming it."""
    for key, tensor in tensors.items():
        is_alpha = key.endswith(".alpha")
        if tensor.dtype not in (ALPHA_DTYPES if is_alpha else FLOATS):
            raise invalid(f"tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')}; LoRA weights are "
                          "float16, bfloat16 or float32")
        if tensor.numel() == 0:
            raise invalid(f"tensor {key!r} is empty (shape {tuple(tensor.shape)}): a LoRA needs rank >= 1")
        if tensor.dim() == 0 and not is_alpha:
            raise invalid(f"tensor {key!r} is a single number, not a LoRA weight matrix")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise invalid(f"tensor {key!r} holds NaN or infinite values")


def checked_metadata(metadata: dict | None, state_dict: dict[str, torch.Tensor]) -> dict | None:
    """The file's per-component LoraConfig kwargs (``unet.r``, ...) reduced to the allow-listed keys
    PEFT needs, or lora_invalid naming the first key that is not acceptable. `state_dict` is the
    converted file (diffusers keys), for the claims its tensors must back."""
    if metadata is None:
        return None
    per_component: dict[str, dict] = {}
    for flat_key, value in metadata.items():
        component, _, key = flat_key.partition(".")
        if component not in COMPONENTS or not key:
            raise invalid(f"lora_adapter_metadata key {flat_key!r} names no SDXL component (unet., text_encoder., ...)")
        reason = _refusal(key, value, _tensor_keys(state_dict, component))
        if reason:
            raise invalid(f"lora_adapter_metadata {flat_key!r} = {_short(value)} is not accepted: {reason}")
        if key in NEEDED:
            per_component.setdefault(component, {})[key] = value
    present = {key.split(".", 1)[0] for key in state_dict}
    for component in sorted(present & set(COMPONENTS)):
        missing = [key for key in ("r", "target_modules") if key not in per_component.get(component, {})]
        if missing:
            raise invalid(f"lora_adapter_metadata has no {component}.{missing[0]} for the file's {component} layers")
    return {f"{c}.{k}": v for c, config in per_component.items() for k, v in config.items()} or None


def _tensor_keys(state_dict: dict, component: str) -> list[str]:
    return [key for key in state_dict if key.startswith(component + ".")]


def _refusal(key: str, value, tensor_keys: list[str]) -> str | None:
    """Why `key` = `value` is refused, or None."""
    if key in SWITCHED_OFF:
        return None if value in (None, False, {}, [], "none") else "it changes more than the LoRA layers"
    if key == "init_lora_weights":
        plain = value is True or value is False or value == "gaussian"
        return None if plain else "an initialisation that rewrites the base weights (PiSSA/OLoRA/LoftQ/EVA/CorDA...)"
    if key == "use_dora":
        if value is False:
            return None
        return "the file claims DoRA, but holds no DoRA magnitude tensors"
    if key == "lora_bias":
        if not isinstance(value, bool):
            return "must be true or false"
        has_bias = any(k.endswith(".bias") and ("lora_B" in k or ".up." in k) for k in tensor_keys)
        return "the file claims LoRA biases, but holds no lora_B bias tensors" if value and not has_bias else None
    if key == "peft_type":
        return None if value in (None, "LORA") else "not a LoRA adapter"
    if key in DESCRIPTIVE:
        return None
    if key not in NEEDED:
        return "not a LoraConfig setting this service accepts"
    return _needed_refusal(key, value)


def _needed_refusal(key: str, value) -> str | None:
    if key == "r":
        return None if _is_int(value) and value >= 1 else "the rank must be an integer >= 1"
    if key == "lora_alpha":
        return None if _is_number(value) else "alpha must be a finite number"
    if key == "use_rslora":
        return None if isinstance(value, bool) else "must be true or false"
    if key == "target_modules":
        ok = isinstance(value, str) or isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        return None if ok else "must be a module name pattern or a list of module names"
    check = (lambda v: _is_int(v) and v >= 1) if key == "rank_pattern" else _is_number
    ok = isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())
    return None if ok else "must map module names to numbers"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
