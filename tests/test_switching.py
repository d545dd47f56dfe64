"""What a switch between resident adapters costs does not grow with the number resident."""

from __future__ import annotations

import pytest
import torch

from inference.lora_store import LoraStore
from inference.pipeline import Engine


@pytest.fixture
def store(tmp_path):
    return LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 28, allow_local_paths=True)


def test_a_switch_touches_only_the_layers_fields_never_each_resident_adapter(tiny_model, store, make_lora,
                                                                             monkeypatch):
    """PEFT's set_adapter/enable_adapters toggle requires_grad on every parameter of every adapter a
    layer holds (diffusers #11816: slower with each adapter resident); the cache's switch sets the
    active list and the disabled flag only, and the layers end up as PEFT would leave them."""
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=4)
    files = [store.fetch(f"s{seed}", str(make_lora(seed=seed, text_encoders=seed == 1))) for seed in (1, 2, 3, 4)]
    for lora in files:
        engine.adapters.activate([(lora, 1.0)])
    names = {a.lora.sha256: a.name for a in engine.adapters.resident()}
    toggles = []
    for owner in (torch.Tensor, torch.nn.Module):
        real = owner.requires_grad_
        monkeypatch.setattr(owner, "requires_grad_",
                            lambda self, *a, real=real, **k: toggles.append(1) or real(self, *a, **k))

    layers = engine.adapters._lora_layers()
    for request in ([(files[0], 1.0)], [], [(files[1], 0.5), (files[2], 1.0)], [(files[3], 1.0)]):
        engine.adapters.activate(request)
        wanted = [names[lora.sha256] for lora, _ in request]
        for layer in layers:
            assert layer.disable_adapters == (not request)
            if request:
                assert layer.active_adapters == wanted
            for lora, scale in request:
                name = names[lora.sha256]
                if name in layer.scaling:
                    assert layer.scaling[name] == pytest.approx(scale * layer.lora_alpha[name] / layer.r[name])
    assert toggles == [], "no per-adapter work in a switch"
