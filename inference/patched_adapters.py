"""The adapter cache of a compiled engine: LoRAs' UNet parts patched into the weights, the rest through PEFT.

`AdapterCache` keeps its bookkeeping (residency, least-recently-used eviction, bundle tokens, the
text encoders' PEFT layers); only where a LoRA's UNet part lives changes. It goes to a
`UnetPatcher`, never into PEFT layers, so the compiled UNet's graph is the same for every request
(`inference.unet_patcher`). The text encoders are not compiled: a LoRA's text-encoder layers are
injected by PEFT as in the eager engine, and cannot touch the UNet's graph. A full cache evicts and
adds; there is no hot-swap to do, as adding a UNet part only keeps its factors.
"""

from __future__ import annotations

from dataclasses import replace

from inference.adapters import AdapterCache
from inference.errors import ErrorCode, ServiceError
from inference.hotswap import UnetLora
from inference.lora_compat import LoraWeights
from inference.prepared import PreparedLora
from inference.unet_patcher import UnetPatcher


class PatchedAdapterCache(AdapterCache):
    def __init__(self, pipe, max_resident: int, fuse: bool = False):
        super().__init__(pipe, max_resident, hotswap=False, fuse=fuse)
        self.patcher = UnetPatcher(pipe.unet)
        self._in_peft: set[str] = set()  # adapters with text-encoder layers

    def wrap_usual_targets(self) -> None:
        """Nothing to wrap: the UNet stays plain Linear and Conv2d layers."""

    def injected_names(self) -> set[str]:
        return super().injected_names() | self.patcher.names()

    def _inject(self, name: str, ready: PreparedLora, hotswap: bool = False) -> None:
        unet_part, text_part = split_by_component(ready.weights)
        if unet_part is not None:
            unet_lora = ready.unet or UnetLora.parse(unet_part)  # parsed already when the LoRA is UNet-only
            try:
                if unet_lora is None:
                    raise ServiceError(ErrorCode.LORA_INCOMPATIBLE, "with SDXL_LORA_COMPILE=on a LoRA's UNet layers "
                                       "must be plain lora_A/lora_B pairs (no biases, no DoRA)")
                self.patcher.add(name, unet_lora)
            except ServiceError as exc:
                exc.lora = ready.lora  # a refusal names the LoRA: the service drops its file
                raise
        if text_part is not None:
            self._in_peft.add(name)
            try:
                super()._inject(name, replace(ready, weights=text_part, unet=None))
            except Exception:
                self.patcher.drop(name)
                raise

    def _purge(self, name: str, keep_layers: list | None = None) -> None:
        self.patcher.drop(name)
        if name in self._in_peft:
            self._in_peft.discard(name)
            super()._purge(name, keep_layers)

    def _set_active(self, active: list[tuple[str, float]]) -> None:
        self.patcher.apply(active)
        super()._set_active(active)


def split_by_component(weights: LoraWeights) -> tuple[LoraWeights | None, LoraWeights | None]:
    """(the UNet's tensors, the text encoders'), each None when the LoRA has none."""
    parts = []
    for wanted in (lambda key: key.startswith("unet."), lambda key: not key.startswith("unet.")):
        state = {k: v for k, v in weights.state_dict.items() if wanted(k)}
        alphas = {k: v for k, v in (weights.network_alphas or {}).items() if wanted(k)} or None
        parts.append(LoraWeights(state, alphas, weights.metadata) if state else None)
    return parts[0], parts[1]
