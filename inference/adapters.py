"""LoRA adapters resident in the pipeline through PEFT, least recently used evicted.

A Replicate bundle's pivotal-tuning embeddings ride along with its adapter: loaded into both text
encoders under tokens unique to the LoRA (every Replicate LoRA calls its tokens <s0><s1>, so two
resident bundles would otherwise collide), substituted into the prompt, and unloaded with it.

With `fuse=True` the active adapters are merged into the base weights (PEFT's `merge`) so a
generation runs plain Linear layers, not base + LoRA branches: unfused PEFT layers cost SDXL about
30 % more per image on GPUs (Hugging Face's measurement), paid on every image. The base weights of
every merged layer are copied first and copied back to unfuse, never un-merged by subtraction, so
the base model is restored bit for bit and A -> B -> A gives A's image again. A LoRA request then
always runs fused, whatever came before: same request, same pixels.

Every method here mutates the pipeline's modules, so the caller must hold the engine's lock:
diffusers/PEFT injection, deletion and generation are not safe to interleave (schedulers keep
state, and `low_cpu_mem_usage` patches `nn.Module.register_parameter` process-wide).
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from inference.bundles import load_embedding_rows
from inference.errors import ErrorCode, ServiceError
from inference.lora_compat import LoraSummary, LoraWeights, check_lora_weights, read_lora
from inference.lora_store import LoraFile

log = logging.getLogger(__name__)

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TRAINER_TOKEN = re.compile(r"<s\d+>")


@dataclass
class ResidentAdapter:
    name: str
    lora: LoraFile
    summary: LoraSummary
    loaded_at: float = field(default_factory=time.time)
    uses: int = 0
    tokens: dict[str, str] = field(default_factory=dict)  # trainer's token -> the token loaded for this LoRA


def _can_hotswap(old: LoraSummary, new: LoraSummary) -> bool:
    """diffusers/PEFT hotswap only UNet layers, and only into modules the old adapter already has."""
    return not old.has_text_encoder_layers and not new.has_text_encoder_layers and new.modules <= old.modules


@dataclass
class _UnetLora:
    """A UNet-only LoRA in PEFT keys, with the LoraConfig diffusers would build for it on load."""

    state: dict[str, torch.Tensor]  # "{module path}.lora_A.weight" / ".lora_B.weight"
    config: Any  # peft.LoraConfig
    modules: set[str]

    @classmethod
    def parse(cls, weights: LoraWeights) -> _UnetLora | None:
        """None for what only PEFT's own path handles: text-encoder layers, biases, DoRA."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from diffusers.utils.peft_utils import _create_lora_config

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
        config = _create_lora_config(state, alphas or None, metadata or None, ranks)
        return cls(state, config, {key.rsplit(".lora_", 1)[0] for key in state})

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """Resolved as PEFT resolves them when it injects a layer (by module path)."""
        from peft.utils.other import get_pattern_key

        config = self.config
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), path), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), path), config.lora_alpha)
        return rank, alpha

    def scaling(self, path: str) -> float:
        rank, alpha = self.rank_alpha(path)
        return alpha / rank**0.5 if self.config.use_rslora else alpha / rank


class AdapterCache:
    def __init__(self, pipe, max_resident: int, hotswap: bool = True, fuse: bool = False):
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self.pipe = pipe
        self.max_resident = max_resident
        self.hotswap = hotswap  # reuse the LRU adapter's layers for a new UNet-only LoRA when full
        self._injections = 0
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        # What the PEFT layers were last set to; None after any injection or deletion, which can
        # change the active set behind our back (delete_adapters activates a remaining adapter).
        self._active_state: tuple | None = None
        self._layers: list | None = None  # the pipeline's PEFT LoRA layers; rebuilt after any injection/deletion
        self.fuse = fuse
        self._saved_weights: dict = {}  # merged layer -> its base weight before merging

    # -- queries -------------------------------------------------------------------------------

    def resident(self) -> list[ResidentAdapter]:
        """Most recently used first."""
        return list(reversed(self._resident.values()))

    def injected_names(self) -> set[str]:
        """Adapter names present in any LoRA layer of the pipeline (ground truth, not bookkeeping)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        names: set[str] = set()
        for component in LORA_COMPONENTS:
            model = getattr(self.pipe, component, None)
            for module in model.modules() if model is not None else ():
                if isinstance(module, BaseTunerLayer):
                    for layer_name in module.adapter_layer_names:
                        names.update(getattr(module, layer_name).keys())
        return names

    # -- mutation (engine lock held) -----------------------------------------------------------

    def activate(self, loras: list[tuple[LoraFile, float]]) -> list[str]:
        """Make exactly these LoRAs active at these scales; return each one's source.

        Source is "resident" when the adapter was already in the pipeline, else the store's
        ("disk" or "download"). Without LoRAs every adapter is disabled.
        """
        if len(loras) > self.max_resident:
            raise ServiceError(
                ErrorCode.INVALID_REQUEST,
                f"request uses {len(loras)} LoRAs but at most {self.max_resident} can be resident at once",
            )
        keep = {lora.sha256 for lora, _ in loras}
        placed = [self._ensure_resident(lora, keep) for lora, _ in loras]
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
        """The prompt with each resident bundle's trigger text replaced by its own tokens.

        As Replicate's predictor does: each special_params.json entry (e.g. TOK -> <s0><s1>) is
        replaced verbatim, then the trainer's <sN> names become the tokens loaded for that LoRA.
        With two bundles, the first one listed claims a shared trigger.
        """
        for lora in loras:
            adapter = self._resident.get(lora.sha256)
            if adapter is None or not adapter.tokens or lora.tokens is None:
                continue
            for text, tokens in lora.tokens.substitutions:
                prompt = prompt.replace(text, tokens)
            prompt = TRAINER_TOKEN.sub(lambda m: adapter.tokens.get(m.group(0), m.group(0)), prompt)
        return prompt

    def _ensure_resident(self, lora: LoraFile, keep: set[str]) -> tuple[str, str]:
        """Make `lora` resident; return (its PEFT adapter name, where it came from)."""
        hit = self._resident.get(lora.sha256)
        if hit is not None:
            self._resident.move_to_end(lora.sha256)
            hit.uses += 1
            return hit.name, "resident"
        weights = read_lora(self.pipe, lora.path)  # FileNotFoundError: evicted by another worker
        summary = check_lora_weights(self.pipe, weights.state_dict)
        tokens = None
        if len(self._resident) >= self.max_resident:
            victim_key = next(k for k in self._resident if k not in keep)
            victim = self._resident[victim_key]
            if self.hotswap and _can_hotswap(victim.summary, summary):
                tokens = self._load_tokens(lora)  # first: a bad bundle leaves the victim untouched
                try:
                    swapped = self._hotswap(victim.name, lora, weights)
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
            tokens = self._load_tokens(lora)
        try:
            self._inject(name, lora, weights)
        except Exception:
            self._unload_tokens(tokens)
            raise
        self._resident[lora.sha256] = ResidentAdapter(name=name, lora=lora, summary=summary, uses=1, tokens=tokens)
        return name, lora.source

    def _inject(self, name: str, lora: LoraFile, weights: LoraWeights, hotswap: bool = False) -> None:
        """diffusers' `load_lora_weights`, minus its own read and conversion of the file: `weights` has them."""
        self._forget_layers()
        started = time.perf_counter()
        pipe = self.pipe
        common = dict(network_alphas=weights.network_alphas, adapter_name=name, metadata=weights.metadata,
                      _pipeline=pipe, low_cpu_mem_usage=True, hotswap=hotswap)
        present = {key.split(".", 1)[0] for key in weights.state_dict}  # skip components the file leaves alone
        try:
            if "unet" in present:
                pipe.load_lora_into_unet(weights.state_dict, unet=pipe.unet, **common)
            for prefix, encoder in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
                if prefix in present:
                    with _quiet_transformers():
                        pipe.load_lora_into_text_encoder(weights.state_dict, text_encoder=encoder, prefix=prefix,
                                                         lora_scale=pipe.lora_scale, **common)
        except Exception as exc:
            self._purge(name)
            if isinstance(exc, ServiceError):
                raise
            if isinstance(exc, torch.OutOfMemoryError):  # the device's trouble, not the LoRA's: retryable 503
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise ServiceError(ErrorCode.OUT_OF_MEMORY, "the GPU ran out of memory while loading the LoRA; "
                                   "retry, or use fewer LoRAs at once") from exc
            text = str(exc)
            if "size mismatch" in text or "correctly renamed" in text or "target modules" in text:
                raise ServiceError(ErrorCode.LORA_INCOMPATIBLE, f"LoRA does not fit this model: {text[:300]}") from exc
            raise ServiceError(ErrorCode.LORA_INVALID, f"LoRA could not be loaded: {text[:300]}") from exc
        log.info("adapter %s %s for %s in %.0f ms", name, "hot-swapped" if hotswap else "injected", lora.lora_id,
                 (time.perf_counter() - started) * 1e3)

    def _load_tokens(self, lora: LoraFile) -> dict[str, str]:
        """Load a bundle's embeddings into both text encoders; return trainer token -> loaded token."""
        if lora.tokens is None:
            return {}
        pipe = self.pipe
        names = {token: f"<{lora.sha256[:12]}_{token[1:-1]}>" for token in lora.tokens.tokens}
        pairs = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
        rows = load_embedding_rows(lora.tokens.embeddings)
        for (encoder, _), row in zip(pairs, rows):
            width = encoder.get_input_embeddings().embedding_dim
            if row.shape[1] != width:
                raise ServiceError(ErrorCode.LORA_INCOMPATIBLE,
                                   f"the bundle's token embeddings are {row.shape[1]} wide; this text encoder takes {width}")
        loaded = []
        try:
            for (encoder, tokenizer), row in zip(pairs, rows):
                pipe.load_textual_inversion(row, token=list(names.values()), text_encoder=encoder, tokenizer=tokenizer)
                loaded.append((encoder, tokenizer))
        except Exception as exc:
            for encoder, tokenizer in loaded:
                pipe.unload_textual_inversion(list(names.values()), tokenizer=tokenizer, text_encoder=encoder)
            raise ServiceError(ErrorCode.LORA_INVALID, f"the bundle's token embeddings could not be loaded: {exc}") from exc
        return names

    def _unload_tokens(self, tokens: dict[str, str]) -> None:
        if not tokens:
            return
        self._active_state = None
        pipe = self.pipe
        for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
            present = [t for t in tokens.values() if t in tokenizer.get_vocab()]
            if present:
                pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)

    def _hotswap(self, name: str, lora: LoraFile, weights: LoraWeights) -> bool:
        """Put `lora`'s weights into the existing adapter `name` instead of injecting a new one.

        Same-shaped LoRAs (the usual case: one trainer, one rank) are copied straight into the
        cached layers; other ranks go through diffusers' `hotswap=True`, which walks the model
        twice (`state_dict()`, `modules()`: about 0.7 s of the 1.3-2 s it took on the full-size
        SDXL on CPU). Returns False, having changed nothing, when PEFT would refuse the swap (its
        configs must agree on alpha_pattern, dropout, rsLoRA, DoRA): the caller injects instead.
        """
        from peft.utils.hotswap import check_hotswap_configs_compatible

        unet_lora = _UnetLora.parse(weights)
        if unet_lora is None:
            return False
        if self._copy_into_slot(name, unet_lora):
            log.info("adapter %s hot-swapped for %s (copied in place)", name, lora.lora_id)
            return True
        try:
            check_hotswap_configs_compatible(self.pipe.unet.peft_config[name], unet_lora.config)
        except ValueError as exc:
            log.info("not hot-swapping %s into %s: %s", lora.lora_id, name, str(exc)[:200])
            return False
        self._inject(name, lora, weights, hotswap=True)
        # PEFT's hotswap leaves `r` and `lora_alpha` at the old adapter's values and sets `scaling`
        # from the config's default r/alpha (its rank/alpha patterns are matched against parameter
        # keys, where they never match). `set_scale`, run on every activation, recomputes scaling
        # from `lora_alpha` and `r`: so alpha is rewritten to give each module its own alpha/rank.
        for path, layer in self._named_unet_layers():
            if name in layer.scaling and path in unet_lora.modules:
                scaling = unet_lora.scaling(path)
                layer.lora_alpha[name] = scaling * (layer.r[name] ** 0.5 if layer.use_rslora[name] else layer.r[name])
                layer.scaling[name] = scaling
        return True

    def _copy_into_slot(self, name: str, unet_lora: _UnetLora) -> bool:
        """Copy a UNet LoRA whose every tensor has the shape of adapter `name`'s into its layers.

        Returns False, having changed nothing, when the LoRA does not fit that way. Layers the new
        LoRA leaves out get zero weights, as PEFT's hotswap does.
        """
        slot = {path: layer for path, layer in self._named_unet_layers() if name in layer.lora_A}
        plan = []
        for path in unet_lora.modules:
            layer = slot.get(path)
            down, up = unet_lora.state.get(f"{path}.lora_A.weight"), unet_lora.state.get(f"{path}.lora_B.weight")
            if (layer is None or down is None or up is None or layer.use_rslora[name] != unet_lora.config.use_rslora
                    or down.shape != layer.lora_A[name].weight.shape or up.shape != layer.lora_B[name].weight.shape):
                return False
            plan.append((path, layer, down, up))
        self._unfuse()  # nothing can fail from here on
        self._active_state = None
        covered = {id(layer) for _, layer, _, _ in plan}
        with torch.no_grad():
            for layer in slot.values():
                if id(layer) not in covered:
                    layer.lora_A[name].weight.zero_()
                    layer.lora_B[name].weight.zero_()
            for path, layer, down, up in plan:
                layer.lora_A[name].weight.copy_(down)
                layer.lora_B[name].weight.copy_(up)
                layer.r[name], layer.lora_alpha[name] = unet_lora.rank_alpha(path)
                layer.scaling[name] = unet_lora.scaling(path)
        return True

    def _evict(self, key: str) -> None:
        adapter = self._resident.pop(key)
        self._purge(adapter.name)
        self._unload_tokens(adapter.tokens)
        log.info("adapter %s (%s) evicted", adapter.name, adapter.lora.lora_id)

    def _purge(self, name: str) -> None:
        """Remove every trace of adapter `name`, even after a half-finished injection."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._forget_layers()
        try:
            self.pipe.delete_adapters([name])
        except Exception:  # a half-injected adapter may be unknown to some component's peft_config
            log.debug("delete_adapters(%s) failed; sweeping layers", name, exc_info=True)
        for component in LORA_COMPONENTS:
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and any(
                    name in getattr(module, layer_name) for layer_name in module.adapter_layer_names
                ):
                    module.delete_adapter(name)
            config = getattr(model, "peft_config", None)
            if isinstance(config, dict):
                config.pop(name, None)

    def _forget_layers(self) -> None:
        """Before the LoRA layers change: unfuse, and forget the active state and the layer list."""
        self._unfuse()
        self._active_state = None
        self._layers = None

    def _fuse(self, names: list[str]) -> None:
        for layer in self._lora_layers():
            here = [name for name in names if name in layer.lora_A]
            if here:
                self._saved_weights[layer] = layer.get_base_layer().weight.detach().clone()
                layer.merge(adapter_names=here)

    def _unfuse(self) -> None:
        """Copy the saved base weights back: exact, unlike PEFT's unmerge (W + dW - dW != W in floats)."""
        for layer, weight in self._saved_weights.items():
            layer.get_base_layer().weight.data.copy_(weight)
            layer.merged_adapters.clear()
        self._saved_weights.clear()

    def _set_active(self, active: list[tuple[str, float]]) -> None:
        """Set exactly these adapters active at these scales, unless the layers are known to be so.

        The per-layer calls of diffusers' `set_adapters`/`enable_lora`/`disable_lora`, over a cached
        list of the LoRA layers and with PEFT's `inference_mode=True`: a switch then skips the walk
        over every module and the requires_grad toggling (40 % less time on the tiny model), and the
        same LoRAs as last time cost nothing.
        """
        state = tuple(active)
        previous, self._active_state = self._active_state, None  # unknown until every layer is set
        if not self._resident or state == previous:
            self._active_state = previous
            return
        self._unfuse()
        names = [name for name, _ in active]
        for layer in self._lora_layers():
            if not active:
                layer.enable_adapters(False)
                continue
            if previous is None or previous == ():
                layer.enable_adapters(True)
            layer.set_adapter(names, inference_mode=True)
            for name, scale in active:
                layer.set_scale(name, scale)  # ignores adapters this layer does not have
        if self.fuse and active:
            self._fuse(names)
        self._active_state = state

    def _named_layers(self) -> list[tuple[str, str, object]]:
        """(component, module path, layer) for every PEFT LoRA layer; cached until the layers change."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self._layers is None:
            models = [(c, getattr(self.pipe, c, None)) for c in LORA_COMPONENTS]
            self._layers = [(c, path, m) for c, model in models if model is not None
                            for path, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    def _lora_layers(self) -> list:
        return [layer for _, _, layer in self._named_layers()]

    def _named_unet_layers(self) -> list[tuple[str, object]]:
        return [(path, layer) for component, path, layer in self._named_layers() if component == "unet"]


@contextmanager
def _quiet_transformers():
    """transformers 5 logs a "LOAD REPORT" calling every LoRA key MISSING (they are loaded: the
    hand-merged reference tests check it) and a progress bar per text encoder; keep the log clean."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
