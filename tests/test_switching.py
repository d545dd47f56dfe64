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


def test_fusing_keeps_the_base_weights_in_one_buffer_reused_by_every_switch(tiny_model, store, make_lora):
    """A fresh clone per layer and per fused switch went through the allocator the generation's
    activations use: on the full model the generation after a fuse page-faulted its activations in
    anew (3 M faults, ~6 s of system time per 512² step) and ran slower than base. The copies now
    live in one buffer, allocated at the first fuse and reused; the merged weights keep the base
    layout."""
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=3, fuse_adapters=True)
    a, b = (store.fetch(f"f{seed}", str(make_lora(seed=seed, text_encoders=seed == 1))) for seed in (1, 2))
    engine.adapters.activate([(a, 1.0)])
    fusing = engine.adapters.fusing
    buffers = {key: buffer.data_ptr() for key, buffer in fusing.buffers.items()}
    layouts = {layer: (layer.get_base_layer().weight.stride(), layer.get_base_layer().weight.data_ptr())
               for layer in fusing.saved}
    for request in ([(b, 0.5)], [], [(a, 1.0)], [(b, 1.0), (a, 0.3)], [(a, 1.0)]):
        engine.adapters.activate(request)
        assert {key: buffer.data_ptr() for key, buffer in fusing.buffers.items()} == buffers, "no new allocation"
        for layer, saved in fusing.saved.items():
            assert saved.untyped_storage().data_ptr() == fusing.buffers[(saved.dtype, saved.device)].data_ptr()
    assert {layer: (layer.get_base_layer().weight.stride(), layer.get_base_layer().weight.data_ptr())
            for layer in fusing.saved} == layouts, "merged in place, in the base weights' own layout"


def test_base_weights_from_an_fp16_checkpoint_are_kept_in_half_precision_and_come_back_exactly():
    from inference.fusing import Fusing

    def layer(weight):  # what Fusing reads of a PEFT layer
        base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        base.weight.data = weight
        wrapper = torch.nn.Module()
        wrapper.get_base_layer = lambda: base
        return wrapper

    fp16_values = torch.randn(64, 32).half().float()
    finer = fp16_values + 1e-6
    fusing = Fusing()
    assert fusing._dtype_for(layer(fp16_values)) == torch.float16
    assert fusing._dtype_for(layer(finer)) == torch.float32
    [held] = fusing._views([(fp16_values, torch.float16)])
    held.copy_(fp16_values)
    assert torch.equal(held.float(), fp16_values)
