"""Reading a LoRA file once, and the preflight: does every key land on a module of this pipeline?

diffusers only logs a warning when a LoRA's keys match nothing ("No LoRA keys associated to ..."),
and the image then comes out unchanged; a shape mismatch surfaces half-way through injection.
So before anything is injected, the file is normalised exactly as diffusers will normalise it
(kohya/A1111 -> diffusers -> PEFT keys) and checked against the pipeline's modules.

`read_lora` reads the file once (hashing it on the way) and hands the same tensors, views of that
one buffer, to the preflight and to diffusers' loaders (`load_lora_weights` would read and convert
the file a second time). Neither needs the pipeline lock: both read only the pipeline's
configuration and module shapes (`inference.prepared`). Once open, a file another worker evicts
from a shared cache stays readable; one already gone raises FileNotFoundError, which the service
answers by fetching it again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.errors import ErrorCode, ServiceError
from inference.integrity import read_verified
from inference.kohya import LYCORIS_MARKERS, fold_kohya_alphas, is_kohya_layout, refuse_other_networks
from inference.lora_validation import check_values, checked_metadata
from inference.peft_internals import base_layer_of
from inference.safetensors_buffer import load_buffer

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' per-component LoraConfig kwargs in the safetensors header


@dataclass
class LoraWeights:
    """A LoRA file as diffusers' loaders take it: diffusers-layout tensors, kohya alphas, adapter metadata."""

    state_dict: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict | None


@dataclass(frozen=True)
class LoraSummary:
    """What a compatible LoRA touches: layers per component, the ranks seen, the modules targeted."""

    layers: dict[str, int]
    ranks: tuple[int, ...]
    modules: frozenset[str] = frozenset()  # "component.module.path"

    @property
    def has_text_encoder_layers(self) -> bool:
        return any(self.layers.get(c, 0) for c in ("text_encoder", "text_encoder_2"))


def incompatible(message: str) -> ServiceError:
    return ServiceError(ErrorCode.LORA_INCOMPATIBLE, message)


def read_lora(pipe, path: Path, expected_sha256: str | None = None, pin_memory: bool = False) -> LoraWeights:
    """Read `path` once, check its sha256 (`CorruptEntry` on a mismatch), and convert it as
    `load_lora_weights` would (kohya/A1111 keys included). With `pin_memory` the tensors live in
    page-locked memory, for a fast copy to the GPU.

    Values and adapter metadata are checked first (`inference.lora_validation`); DoRA and LyCORIS
    are refused on the file's own keys; a kohya-layout file gets its alphas folded in first
    (`inference.kohya`). cog-sdxl (Replicate) saves UNet attention-processor keys
    without the ``unet.`` prefix that diffusers' loaders select by; they get it here.
    """
    buffer = read_verified(path, expected_sha256, pin_memory)  # FileNotFoundError: evicted by another worker
    try:
        raw, header = load_buffer(buffer)
    except ValueError as exc:
        raise ServiceError(ErrorCode.LORA_INVALID, f"not a readable safetensors LoRA: {str(exc)[:300]}") from exc
    check_values(raw)
    metadata = _adapter_metadata(header)
    refuse_other_networks(list(raw))
    if is_kohya_layout(raw):
        raw = fold_kohya_alphas(raw)
    try:
        state_dict, alphas, _ = pipe.lora_state_dict(raw, unet_config=pipe.unet.config, return_lora_metadata=True)
    except Exception as exc:  # diffusers raises ValueError/KeyError/... on layouts it cannot convert
        raise _conversion_error(exc) from exc
    state_dict = {f"unet.{k}" if k.split(".", 1)[0] in UNET_BLOCKS else k: v for k, v in state_dict.items()}
    return LoraWeights(state_dict, alphas or None, checked_metadata(metadata, state_dict))


def _adapter_metadata(header: dict[str, str]) -> dict | None:
    """diffusers' per-component LoraConfig kwargs from the header, as a JSON object, or None."""
    text = header.get(METADATA_KEY)
    if not text:
        return None
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServiceError(ErrorCode.LORA_INVALID, f"{METADATA_KEY} in the header is not JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise ServiceError(ErrorCode.LORA_INVALID, f"{METADATA_KEY} in the header is a {type(metadata).__name__}, "
                                                   "not a JSON object")
    return metadata


def check_lora_weights(pipe, state_dict: dict[str, torch.Tensor]) -> LoraSummary:
    """Raise lora_incompatible (or lora_invalid) unless these diffusers-layout tensors fit `pipe`."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if not state_dict:
        raise ServiceError(ErrorCode.LORA_INVALID, "the file holds no LoRA tensors")
    lycoris = sorted({k for k in state_dict if any(m in k for m in LYCORIS_MARKERS)})
    if lycoris:
        raise incompatible(f"LyCORIS/LoHa/LoKr layers are not supported (e.g. {lycoris[0]})")

    stray = sorted(k for k in state_dict if k.split(".", 1)[0] not in COMPONENTS)
    if stray:
        raise incompatible(f"{len(stray)} of {len(state_dict)} keys match no component of an SDXL pipeline, e.g. {stray[0]!r}")

    layers: dict[str, int] = {}
    ranks: set[int] = set()
    modules: set[str] = set()
    for component in COMPONENTS:
        part = {k.split(".", 1)[1]: v for k, v in state_dict.items() if k.split(".", 1)[0] == component}
        if not part:
            continue
        model = getattr(pipe, component)
        if component == "unet":
            if not any("lora_A" in k for k in part):
                part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not hasattr(model, "text_model"):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        component_modules, component_ranks = _check_component(component, model, part)
        layers[component] = len(component_modules)
        modules |= {f"{component}.{m}" for m in component_modules}
        ranks |= component_ranks
    if not layers:
        raise incompatible("no LoRA layer in the file targets this model")
    return LoraSummary(layers=layers, ranks=tuple(sorted(ranks)), modules=frozenset(modules))


def _conversion_error(exc: Exception) -> ServiceError:
    text = str(exc)
    if "correctly renamed" in text or any(m in text for m in LYCORIS_MARKERS):
        return incompatible(f"unsupported LoRA layout (LyCORIS or another non-LoRA network?): {text[:300]}")
    if "lora" in text.lower() or isinstance(exc, (KeyError, ValueError, IndexError)):
        return incompatible(f"cannot map the file's keys onto SDXL: {text[:300]}")
    return ServiceError(ErrorCode.LORA_INVALID, f"cannot read the file as a LoRA: {text[:300]}")


def _check_component(component: str, model: torch.nn.Module, part: dict[str, torch.Tensor]) -> tuple[set[str], set[int]]:
    """Check PEFT-layout keys (`module.lora_A.weight`, ...) against `model`; return (module paths, ranks)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in part.items():
        for role in ("lora_A", "lora_B"):
            marker = f".{role}."
            if marker in key:
                module_path, suffix = key.split(marker, 1)
                if suffix == "weight":
                    pairs.setdefault(module_path, {})[role] = tensor
                elif not (role == "lora_B" and suffix == "bias"):
                    raise incompatible(f"{component}: unexpected LoRA tensor {key!r}")
                break
        else:
            raise incompatible(f"{component}: {key!r} is not a LoRA up/down weight")

    ranks = set()
    for module_path, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise incompatible(f"{component}.{module_path}: has only {sorted(pair)}, needs both down and up weights")
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise incompatible(f"{component} has no module {module_path!r} (a LoRA for another architecture, e.g. SD 1.5?)") from None
        base = base_layer_of(module)
        down, up = pair["lora_A"], pair["lora_B"]
        rank = down.shape[0]
        if isinstance(base, torch.nn.Linear):
            expected_down, expected_up = (rank, base.in_features), (base.out_features, rank)
        elif isinstance(base, torch.nn.Conv2d):
            expected_down = (rank, base.in_channels // base.groups, *base.kernel_size)
            expected_up = (base.out_channels, rank, 1, 1)
        else:
            raise incompatible(f"{component}.{module_path} is a {type(base).__name__}, not a Linear or Conv2d layer")
        if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
            raise incompatible(
                f"{component}.{module_path}: LoRA shapes down {tuple(down.shape)} / up {tuple(up.shape)} "
                f"do not fit the layer (expects {expected_down} / {expected_up})"
            )
        ranks.add(rank)
    return set(pairs), ranks
