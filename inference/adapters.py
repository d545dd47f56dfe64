"""LoRA adapters resident in the pipeline through PEFT: which are resident, which are active.

A new LoRA comes prepared (`inference.prepared`: read, verified, parsed, preflighted before the
lock). The least recently used adapter makes room for it: its layers are reused for a UNet LoRA
they can hold (`inference.hotswap`), otherwise it is deleted and the new one injected: into the
layers PEFT already wrapped when it fits them (`inference.direct_injection`), else by PEFT. Before each
generation exactly the request's LoRAs are made active at their scales, through PEFT's per-layer
API on a cached list of the LoRA layers; with fusing on, they are then merged into the weights
(`inference.fusing`). A bundle's tokens ride along with its adapter (`inference.bundle_tokens`).

Every method here but the queries mutates the pipeline's modules, so the caller must hold the engine's lock:
diffusers/PEFT injection, deletion and generation are not safe to interleave (schedulers keep
state, and `low_cpu_mem_usage` patches `nn.Module.register_parameter` process-wide).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch

from inference.bundle_tokens import load_tokens, rewrite_prompt, unload_tokens
from inference.direct_injection import inject_into_wrapped, wrapped_plan
from inference.errors import ErrorCode, ServiceError
from inference.fusing import Fusing
from inference.hotswap import can_hotswap, copy_in_place, give_each_module_its_scaling, in_place_plan
from inference.lora_compat import LoraSummary
from inference.lora_file import LoraFile
from inference.peft_internals import (adapter_config, adapter_names, has_adapter, hotswap_refusal, load_fault,
                                      load_into_pipeline, lora_layers, purge_adapter, set_active_adapters)
from inference.prepared import PreparedLora, prepare
from inference.quiet import transformers_errors_only

log = logging.getLogger(__name__)

# The UNet modules SDXL LoRA trainers target: diffusers' train_dreambooth_lora_sdxl.py and
# Replicate's cog-sdxl (attention projections); kohya's add feed-forward and projection layers.
USUAL_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class ResidentAdapter:
    name: str
    lora: LoraFile
    summary: LoraSummary
    loaded_at: float = field(default_factory=time.time)
    uses: int = 0
    tokens: dict[str, str] = field(default_factory=dict)  # trainer's token -> the token loaded for this LoRA


class AdapterCache:
    def __init__(self, pipe, max_resident: int, hotswap: bool = True, fuse: bool = False):
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self.pipe = pipe
        self.max_resident = max_resident
        self.hotswap = hotswap  # reuse the LRU adapter's layers for a new UNet-only LoRA when full
        self.fuse = fuse
        self.fusing = Fusing()
        self._injections = 0
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        # What the PEFT layers were last set to; None after any injection or deletion, which can
        # change the active set behind our back (delete_adapters activates a remaining adapter).
        self._active_state: tuple | None = None
        self._layers: list | None = None  # the pipeline's PEFT LoRA layers; rebuilt after any injection/deletion

    # -- queries -------------------------------------------------------------------------------

    def resident(self) -> list[ResidentAdapter]:
        """Most recently used first."""
        return list(reversed(self._resident.values()))

    def is_resident(self, sha256: str) -> bool:
        """Safe without the lock (a dict lookup); the answer may be stale by the time the lock is taken."""
        return sha256 in self._resident

    def injected_names(self) -> set[str]:
        """Adapter names present in any LoRA layer of the pipeline (ground truth, not bookkeeping)."""
        return {name for _, _, layer in lora_layers(self.pipe) for name in adapter_names(layer)}

    # -- mutation (engine lock held) -----------------------------------------------------------

    def wrap_usual_targets(self) -> None:
        """Wrap the UNet modules trainers usually target in PEFT LoRA layers holding no adapter, so a
        worker's first LoRA, too, is added without PEFT's walk over the model
        (`inference.direct_injection`). A LoRA layer without adapters computes its base layer alone:
        the base image is unchanged bit for bit."""
        from peft import LoraConfig

        self._forget_layers()
        with transformers_errors_only():
            self.pipe.unet.add_adapter(LoraConfig(r=1, target_modules=USUAL_UNET_TARGETS), adapter_name="wrapping")
            self.pipe.unet.delete_adapters("wrapping")
        self._named_layers()  # the layer list, walked now rather than under a request's lock

    def activate(self, loras: list[tuple[LoraFile, float]],
                 prepared: dict[str, PreparedLora] | None = None) -> list[str]:
        """Make exactly these LoRAs active at these scales; return each one's source.

        `prepared` (by sha256) holds the LoRAs prepared before the lock; one not resident and not
        there (it left the cache since it was found resident, or the caller prepares nothing) is
        prepared here. Source is "resident" when the adapter was already in the pipeline, else the
        store's ("disk" or "download"). Without LoRAs every adapter is disabled.
        """
        if len(loras) > self.max_resident:
            raise ServiceError(
                ErrorCode.INVALID_REQUEST,
                f"request uses {len(loras)} LoRAs but at most {self.max_resident} can be resident at once",
            )
        keep = {lora.sha256 for lora, _ in loras}
        prepared = prepared or {}
        placed = [self._ensure_resident(lora, keep, prepared.get(lora.sha256)) for lora, _ in loras]
        self._set_active([(name, scale) for (name, _), (_, scale) in zip(placed, loras)])
        return [source for _, source in placed]

    def clear(self) -> None:
        for key in list(self._resident):
            self._evict(key)

    def set_fuse(self, fuse: bool) -> None:
        """Switch fusing on or off; takes effect at the next activation."""
        self._forget_layers()
        self.fuse = fuse

    def prompt_for(self, prompt: str, loras: list[LoraFile]) -> str:
        """The prompt with each resident bundle's trigger text replaced by its own tokens (the first
        bundle listed claims a trigger two bundles share)."""
        for lora in loras:
            adapter = self._resident.get(lora.sha256)
            if adapter is not None:
                prompt = rewrite_prompt(prompt, lora, adapter.tokens)
        return prompt

    def _ensure_resident(self, lora: LoraFile, keep: set[str], ready: PreparedLora | None) -> tuple[str, str]:
        """Make `lora` resident; return (its PEFT adapter name, where it came from)."""
        hit = self._resident.get(lora.sha256)
        if hit is not None:
            self._resident.move_to_end(lora.sha256)
            hit.uses += 1
            return hit.name, "resident"
        ready = ready or prepare(self.pipe, lora)  # the file's faults name the LoRA: the service drops it
        summary = ready.summary
        tokens = None
        if len(self._resident) >= self.max_resident:
            victim_key = next(k for k in self._resident if k not in keep)
            victim = self._resident[victim_key]
            if self.hotswap and can_hotswap(victim.summary, summary):
                tokens = self._load_tokens(ready)  # first: a bad bundle leaves the victim untouched
                try:
                    swapped = self._hotswap(victim.name, ready)
                except Exception:
                    self._unload_tokens(tokens)
                    self._evict(victim_key)  # whatever the failed swap left of its layers
                    raise
                if swapped:
                    del self._resident[victim_key]
                    self._unload_tokens(victim.tokens)
                    # the layers keep the old adapter's full set of modules (unused ones zeroed)
                    slot = replace(summary, modules=victim.summary.modules)
                    self._resident[lora.sha256] = ResidentAdapter(name=victim.name, lora=lora, summary=slot, uses=1,
                                                                  tokens=tokens)
                    return victim.name, lora.source
            self._evict(victim_key)
        # Never reuse a name: after a hotswap, an adapter named after one LoRA holds another.
        self._injections += 1
        name = f"lora{self._injections}_{lora.sha256[:12]}"  # ModuleDict keys: no dots
        if tokens is None:
            tokens = self._load_tokens(ready)
        try:
            self._inject(name, ready)
        except Exception:
            self._unload_tokens(tokens)
            raise
        self._resident[lora.sha256] = ResidentAdapter(name=name, lora=lora, summary=summary, uses=1, tokens=tokens)
        return name, lora.source

    def _inject(self, name: str, ready: PreparedLora, hotswap: bool = False) -> None:
        """A new adapter (or, with `hotswap`, new weights for adapter `name` through diffusers): into
        the layers PEFT already wrapped when it fits them (`inference.direct_injection`: no walk over
        the model), else through diffusers' component loaders. On any failure the model is left with
        the modules and weights it had, and a refusal names the LoRA (the service drops its file)."""
        lora = ready.lora
        plan = None if hotswap or ready.unet is None else wrapped_plan(dict(self._named_unet_layers()), ready.unet)
        layers_before = self._lora_layers()
        if plan is None:
            self._forget_layers()  # PEFT may wrap more layers
        else:
            self.fusing.unfuse()  # the layer list stays: the adapter goes into layers already in it
            self._active_state = None
        started = time.perf_counter()
        try:
            with transformers_errors_only():
                if plan is not None:
                    inject_into_wrapped(self.pipe.unet, name, plan, ready.unet)
                else:
                    load_into_pipeline(self.pipe, ready.weights.state_dict, adapter_name=name,
                                       network_alphas=ready.weights.network_alphas, metadata=ready.weights.metadata,
                                       hotswap=hotswap)
                    if fault := load_fault(self.pipe, name):
                        raise ServiceError(ErrorCode.LORA_INVALID, f"LoRA could not be loaded: {fault}")
        except Exception as exc:
            self._purge(name, keep_layers=layers_before)
            error = _load_error(exc, lora)
            if error is exc:
                raise
            raise error from exc
        how = "hot-swapped" if hotswap else "added to the wrapped layers" if plan is not None else "injected"
        log.info("adapter %s %s for %r in %.0f ms", name, how, lora.lora_id, (time.perf_counter() - started) * 1e3)

    def _load_tokens(self, ready: PreparedLora) -> dict[str, str]:
        try:
            return load_tokens(self.pipe, ready.lora, ready.token_rows)
        except ServiceError as exc:
            exc.lora = ready.lora
            raise

    def _unload_tokens(self, tokens: dict[str, str]) -> None:
        if tokens:
            self._active_state = None
            unload_tokens(self.pipe, tokens)

    def _hotswap(self, name: str, ready: PreparedLora) -> bool:
        """Put `lora`'s weights into the existing adapter `name` (see `inference.hotswap`).

        Returns False, having changed nothing, when it cannot: text-encoder layers, or a config PEFT
        would refuse to swap (alpha_pattern, dropout, rsLoRA, DoRA must agree); the caller injects.
        """
        lora, unet_lora = ready.lora, ready.unet
        if unet_lora is None:
            return False
        slot = {path: layer for path, layer in self._named_unet_layers() if has_adapter(layer, name)}
        plan = in_place_plan(slot, name, unet_lora)
        if plan is not None:
            self.fusing.unfuse()  # nothing can fail from here on
            self._active_state = None
            copy_in_place(plan, slot, name, unet_lora)
            log.info("adapter %s hot-swapped for %r (copied in place)", name, lora.lora_id)
            return True
        refusal = hotswap_refusal(adapter_config(self.pipe.unet, name), unet_lora.config)
        if refusal:
            log.info("not hot-swapping %r into %s: %r", lora.lora_id, name, refusal[:200])
            return False
        self._inject(name, ready, hotswap=True)
        give_each_module_its_scaling(self._named_unet_layers(), name, unet_lora)
        return True

    def _evict(self, key: str) -> None:
        adapter = self._resident.pop(key)
        self._purge(adapter.name)
        self._unload_tokens(adapter.tokens)
        log.info("adapter %s (%r) evicted", adapter.name, adapter.lora.lora_id)

    def _purge(self, name: str, keep_layers: list | None = None) -> None:
        """Remove every trace of adapter `name`, even after a half-finished injection (and, with
        `keep_layers`, the LoRA layers it wrapped: see `purge_adapter`)."""
        self._forget_layers()
        purge_adapter(self.pipe, name, keep_layers)

    def _forget_layers(self) -> None:
        """Before the LoRA layers change: unfuse, and forget the active state and the layer list."""
        self.fusing.unfuse()
        self._active_state = None
        self._layers = None

    def _set_active(self, active: list[tuple[str, float]]) -> None:
        """Set exactly these adapters active at these scales, unless the layers are known to be so.

        What diffusers' `set_adapters`/`enable_lora`/`disable_lora` do per layer, over a cached list
        of the LoRA layers, without PEFT's requires_grad toggling over every resident adapter
        (`set_active_adapters`): a switch costs the same with 2 or 16 adapters resident, and the
        same LoRAs as last time cost nothing.
        """
        state = tuple(active)
        previous, self._active_state = self._active_state, None  # unknown until every layer is set
        if not self._resident or state == previous:
            self._active_state = previous
            return
        self.fusing.unfuse()
        layers = self._lora_layers()
        for layer in layers:
            set_active_adapters(layer, active)
        if self.fuse and active:
            self.fusing.fuse(layers, [name for name, _ in active])
        self._active_state = state

    def _named_layers(self) -> list[tuple[str, str, object]]:
        """(component, module path, layer) for every PEFT LoRA layer; cached until the layers change."""
        if self._layers is None:
            self._layers = lora_layers(self.pipe)
        return self._layers

    def _lora_layers(self) -> list:
        return [layer for _, _, layer in self._named_layers()]

    def _named_unet_layers(self) -> list[tuple[str, object]]:
        return [(path, layer) for component, path, layer in self._named_layers() if component == "unet"]


def _load_error(exc: Exception, lora: LoraFile) -> ServiceError:
    """The contract error for a failed injection; a refusal (lora_invalid, lora_incompatible) names
    the LoRA, so the service drops its file from the disk cache."""
    if isinstance(exc, torch.OutOfMemoryError):  # the device's trouble, not the LoRA's: retryable 503
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return ServiceError(ErrorCode.OUT_OF_MEMORY, "the GPU ran out of memory while loading the LoRA; "
                            "retry, or use fewer LoRAs at once")
    text = str(exc)
    if isinstance(exc, ServiceError):
        error = exc
    elif "size mismatch" in text or "correctly renamed" in text or "target modules" in text:
        error = ServiceError(ErrorCode.LORA_INCOMPATIBLE, f"LoRA does not fit this model: {text[:300]}")
    else:
        error = ServiceError(ErrorCode.LORA_INVALID, f"LoRA could not be loaded: {text[:300]}")
    if error.code in (ErrorCode.LORA_INVALID, ErrorCode.LORA_INCOMPATIBLE) and error.lora is None:
        error.lora = lora
    return error
