"""A LoRA added to the layers PEFT already wrapped (no walk over the model) is the LoRA PEFT's own
injection gives: same layers, same image bit for bit, the hand-merged reference; and it falls back
to PEFT wherever the layers are not there yet, leaving nothing behind when it fails."""

from __future__ import annotations

import numpy as np
import pytest

from inference import direct_injection
from inference.errors import ErrorCode, ServiceError
from inference.pipeline import Engine
from tests.test_generation import max_diff, reference_from_layers, reference_image, render


@pytest.fixture
def store(tmp_path):
    from inference.lora_store import LoraStore

    return LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 28, allow_local_paths=True)


def count_peft_loads(engine, monkeypatch) -> list:
    calls = []
    real = engine.txt2img.load_lora_into_unet
    monkeypatch.setattr(engine.txt2img, "load_lora_into_unet",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def adapter_of(engine, store, path) -> str:
    sha256 = store.fetch(path.stem, str(path)).sha256
    return next(a.name for a in engine.adapters.resident() if a.lora.sha256 == sha256)


def test_a_lora_after_the_first_skips_peft_and_matches_the_hand_merged_reference(tiny_model, store, make_lora,
                                                                                  monkeypatch):
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=3)
    render(engine, store, [(make_lora(seed=1), 1.0)])  # the first LoRA wraps the layers, through PEFT
    calls = count_peft_loads(engine, monkeypatch)
    b, c = make_lora(seed=2), make_lora(seed=3, rank=8)  # the same rank, and another rank
    image_b = render(engine, store, [(b, 0.8)])
    image_c = render(engine, store, [(c, 1.0)])
    assert calls == [], "both added to the wrapped layers"
    assert len(engine.adapters.injected_names()) == 3
    assert max_diff(image_b, reference_image(tiny_model, [(b, 0.8)])) <= 2
    assert max_diff(image_c, reference_image(tiny_model, [(c, 1.0)])) <= 2
    assert np.array_equal(render(engine, store, [(b, 0.8)]), image_b)


def test_the_layers_are_what_peft_injection_leaves_and_the_image_is_bit_identical(tiny_model, store, make_lora):
    """The reference is plain diffusers: `load_lora_weights` (PEFT's injection) on its own pipeline."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tests.test_generation import PROMPT, STEPS, pixels

    direct = Engine(str(tiny_model), device="cpu", max_resident_adapters=3)
    b = make_lora(seed=2, rank=8)
    image = render(direct, store, [(b, 0.6)])
    peft = StableDiffusionXLPipeline.from_pretrained(str(tiny_model))
    peft.set_progress_bar_config(disable=True)
    peft.load_lora_weights(str(b.parent), weight_name=b.name, adapter_name="ref")
    peft.set_adapters(["ref"], [0.6])
    reference = peft(PROMPT, num_inference_steps=STEPS, width=64, height=64, guidance_scale=7.0,
                     generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.array_equal(image, pixels(reference))

    name = adapter_of(direct, store, b)
    ours = {path: layer for _, path, layer in direct.adapters._named_layers() if name in layer.lora_A}
    theirs = {path: m for path, m in peft.unet.named_modules() if isinstance(m, BaseTunerLayer) and "ref" in m.lora_A}
    assert ours.keys() == theirs.keys() and ours
    for path, layer in ours.items():
        other = theirs[path]
        for field in ("r", "lora_alpha", "use_rslora", "use_dora", "lora_bias"):
            assert getattr(layer, field)[name] == getattr(other, field)["ref"], (path, field)
        assert layer.scaling[name] == pytest.approx(other.scaling["ref"])  # both at scale 0.6 now
        for kind in ("lora_A", "lora_B"):
            mine, peft_weight = getattr(layer, kind)[name].weight, getattr(other, kind)["ref"].weight
            assert mine.dtype == peft_weight.dtype and mine.device == peft_weight.device
            assert mine.is_contiguous() and peft_weight.is_contiguous()
            assert np.array_equal(mine.detach().numpy(), peft_weight.detach().numpy()), (path, kind)
        assert type(layer.lora_dropout[name]) is type(other.lora_dropout["ref"])
        assert layer.lora_dropout[name].training == layer.training
    config_direct = direct.txt2img.unet.peft_config[name]
    config_peft = peft.unet.peft_config["ref"]
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora"):
        assert getattr(config_direct, field) == getattr(config_peft, field), field
    # PEFT's injection shortens target_modules to the fewest suffixes naming the same modules
    assert set(config_direct.target_modules) == set(ours)
    assert all(any(path == t or path.endswith(f".{t}") for t in config_peft.target_modules) for path in ours)


def test_a_workers_first_lora_is_added_to_the_layers_wrapped_at_start(tiny_model, store, make_lora, monkeypatch):
    """The engine wraps the usual targets at start with no adapter in them: the base image is plain
    diffusers' bit for bit (test_generation), and the first LoRA needs no PEFT injection."""
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=3)
    assert engine.adapters.injected_names() == set() and engine.adapters._lora_layers()
    calls = count_peft_loads(engine, monkeypatch)
    a = make_lora(seed=1)
    image = render(engine, store, [(a, 1.0)])
    assert calls == []
    assert max_diff(image, reference_image(tiny_model, [(a, 1.0)])) <= 2


def test_after_every_adapter_was_deleted_the_layers_still_take_a_new_one(tiny_model, store, make_lora, monkeypatch):
    """diffusers deletes the UNet's `peft_config` with its last adapter; the wrapped layers stay."""
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=2)
    a, b = make_lora(seed=1), make_lora(seed=2)
    image_a = render(engine, store, [(a, 1.0)])
    engine.adapters.clear()
    assert not getattr(engine.txt2img.unet, "peft_config", None)
    calls = count_peft_loads(engine, monkeypatch)
    image_b = render(engine, store, [(b, 1.0)])
    assert calls == []
    assert list(engine.txt2img.unet.peft_config) == [adapter_of(engine, store, b)]
    assert max_diff(image_b, reference_image(tiny_model, [(b, 1.0)])) <= 2
    engine.adapters.clear()  # diffusers' delete_adapters knows the adapter added this way
    assert engine.adapters.injected_names() == set()
    assert np.array_equal(render(engine, store, [(a, 1.0)]), image_a)


def test_a_failure_half_way_through_the_layers_leaves_no_trace(tiny_model, store, make_lora, monkeypatch):
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=3)
    a, b = make_lora(seed=1), make_lora(seed=2)
    image_a = render(engine, store, [(a, 1.0)])
    before = engine.adapters.injected_names()
    real, added = direct_injection.add_adapter_to_layer, []

    def fail_at_the_fifth(*args, **kwargs):
        if len(added) == 4:
            raise RuntimeError("simulated failure in the fifth layer")
        added.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(direct_injection, "add_adapter_to_layer", fail_at_the_fifth)
    with pytest.raises(ServiceError) as err:
        render(engine, store, [(b, 1.0)])
    assert err.value.code == ErrorCode.LORA_INVALID and len(added) == 4
    assert engine.adapters.injected_names() == before
    assert set(engine.txt2img.unet.peft_config) == before
    assert [r.lora.sha256 for r in engine.adapters.resident()] == [store.fetch(a.stem, str(a)).sha256]
    monkeypatch.undo()
    assert np.array_equal(render(engine, store, [(a, 1.0)]), image_a)
    assert max_diff(render(engine, store, [(b, 1.0)]), reference_image(tiny_model, [(b, 1.0)])) <= 2


def test_a_lora_reaching_layers_not_wrapped_yet_goes_through_peft(tiny_model, store, make_lora, tmp_path,
                                                                   monkeypatch):
    """A module outside the usual targets (a feed-forward layer, as kohya trains) is wrapped by PEFT
    the first time; the next LoRA for it is added directly."""
    import torch
    from safetensors.torch import save_file

    from inference.synthetic import LoraLayer, lora_state_dict, random_lora

    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=3)
    unet = engine.txt2img.unet
    ff = next(name for name, m in unet.named_modules() if name.endswith("ff.net.2") and isinstance(m, torch.nn.Linear))

    def with_feed_forward(seed: int):
        layers = random_lora(engine.txt2img, rank=4, seed=seed)
        linear = unet.get_submodule(ff)
        gen = torch.Generator().manual_seed(seed)
        layers[f"unet.{ff}"] = LoraLayer(down=torch.randn(4, linear.in_features, generator=gen) / 8,
                                         up=torch.randn(linear.out_features, 4, generator=gen) / 2, alpha=2.0)
        path = tmp_path / f"ff-{seed}.safetensors"
        tensors, metadata = lora_state_dict(layers, "diffusers")
        save_file(tensors, str(path), metadata=metadata)
        return path, layers

    calls = count_peft_loads(engine, monkeypatch)
    (first, first_layers), (second, second_layers) = with_feed_forward(11), with_feed_forward(12)
    image_first = render(engine, store, [(first, 1.0)])
    assert calls == [1], "the feed-forward module needed PEFT to wrap it"
    image_second = render(engine, store, [(second, 1.0)])
    assert calls == [1], "then it was wrapped: the second LoRA is added directly"
    assert max_diff(image_first, reference_from_layers(tiny_model, first_layers, 1.0)) <= 2
    assert max_diff(image_second, reference_from_layers(tiny_model, second_layers, 1.0)) <= 2


def test_text_encoder_loras_go_through_peft(tiny_model, store, make_lora, monkeypatch):
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=3)
    render(engine, store, [(make_lora(seed=1, text_encoders=True), 1.0)])
    calls = count_peft_loads(engine, monkeypatch)
    te = make_lora(seed=2, text_encoders=True)
    image = render(engine, store, [(te, 1.0)])
    assert calls == [1]
    assert max_diff(image, reference_image(tiny_model, [(te, 1.0)])) <= 2
