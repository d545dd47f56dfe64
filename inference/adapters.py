"""LoRA adapters resident in the pipeline through PEFT, least recently used evicted.

Every method here mutates the pipeline's modules, so the caller must hold the engine's lock:
diffusers/PEFT injection, deletion and generation are not safe to interleave (schedulers keep
state, and `low_cpu_mem_usage` patches `nn.Module.register_parameter` process-wide).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from inference.errors import ErrorCode, ServiceError
from inference.lora_compat import LoraSummary, check_lora_file
from inference.lora_store import LoraFile

log = logging.getLogger(__name__)

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class ResidentAdapter:
    name: str
    lora: LoraFile
    summary: LoraSummary
    loaded_at: float = field(default_factory=time.time)
    uses: int = 0


def adapter_name(lora: LoraFile) -> str:
    """PEFT adapter names become ModuleDict keys: no dots. Keyed by content, not by id."""
    return f"lora_{lora.sha256[:20]}"


class AdapterCache:
    def __init__(self, pipe, max_resident: int):
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self.pipe = pipe
        self.max_resident = max_resident
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        # What the PEFT layers were last set to; None after any injection or deletion, which can
        # change the active set behind our back (delete_adapters activates a remaining adapter).
        self._active_state: tuple | None = None

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
        keep = {adapter_name(lora) for lora, _ in loras}
        sources = [self._ensure_resident(lora, keep) for lora, _ in loras]
        self._set_active([(adapter_name(lora), scale) for lora, scale in loras])
        return sources

    def clear(self) -> None:
        for name in list(self._resident):
            self._evict(name)

    def _ensure_resident(self, lora: LoraFile, keep: set[str]) -> str:
        name = adapter_name(lora)
        if name in self._resident:
            self._resident.move_to_end(name)
            self._resident[name].uses += 1
            return "resident"
        summary = check_lora_file(self.pipe, lora.path)
        while len(self._resident) >= self.max_resident:
            victim = next(n for n in self._resident if n not in keep)
            self._evict(victim)
        self._inject(name, lora)
        self._resident[name] = ResidentAdapter(name=name, lora=lora, summary=summary, uses=1)
        return lora.source

    def _inject(self, name: str, lora: LoraFile) -> None:
        self._active_state = None
        started = time.perf_counter()
        try:
            self.pipe.load_lora_weights(
                str(lora.path.parent), weight_name=lora.path.name, adapter_name=name, use_safetensors=True
            )
        except Exception as exc:
            self._purge(name)
            if isinstance(exc, ServiceError):
                raise
            text = str(exc)
            if "size mismatch" in text or "correctly renamed" in text or "target modules" in text:
                raise ServiceError(ErrorCode.LORA_INCOMPATIBLE, f"LoRA does not fit this model: {text[:300]}") from exc
            raise ServiceError(ErrorCode.LORA_INVALID, f"LoRA could not be loaded: {text[:300]}") from exc
        log.info("adapter %s injected for %s in %.0f ms", name, lora.lora_id, (time.perf_counter() - started) * 1e3)

    def _evict(self, name: str) -> None:
        self._resident.pop(name, None)
        self._purge(name)
        log.info("adapter %s evicted", name)

    def _purge(self, name: str) -> None:
        """Remove every trace of adapter `name`, even after a half-finished injection."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._active_state = None
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

    def _set_active(self, active: list[tuple[str, float]]) -> None:
        """Set exactly these adapters active at these scales, unless the layers are known to be so.

        Each PEFT call below walks every LoRA layer (and toggles requires_grad on every adapter's
        weights), so calls that would change nothing are skipped: the same LoRAs again cost nothing.
        """
        state = tuple(active)
        previous, self._active_state = self._active_state, None  # unknown until the calls succeed
        if not self._resident or state == previous:
            self._active_state = previous
            return
        if not active:
            self.pipe.disable_lora()
        else:
            if previous is None or previous == ():
                self.pipe.enable_lora()
            self.pipe.set_adapters([name for name, _ in active], adapter_weights=[scale for _, scale in active])
        self._active_state = state
