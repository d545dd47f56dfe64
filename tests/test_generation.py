"""The inference core against independent references, on the tiny synthetic SDXL (CPU).

The reference for "a LoRA at scale s" is the base pipeline with W + s * alpha/rank * up @ down
merged into its Linear weights by hand, from tensors read straight out of the file: no PEFT.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from inference.errors import ErrorCode, ServiceError
from inference.lora_store import LoraStore
from inference.pipeline import Engine, GenerationJob

PROMPT = "a portrait photo of a character, studio light"
STEPS = 4


@pytest.fixture
def store(tmp_path):
    return LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 28, allow_local_paths=True)


@pytest.fixture
def engine(tiny_model):
    return Engine(str(tiny_model), device="cpu", max_resident_adapters=3)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def render(engine, store, loras=(), seed=7, width=64, height=64, **kwargs) -> np.ndarray:
    files = [(store.fetch(path.stem, str(path)), scale) for path, scale in loras]
    job = GenerationJob(prompt=PROMPT, num_inference_steps=STEPS, seed=seed, width=width, height=height,
                        loras=files, **kwargs)
    return pixels(engine.generate(job).images[0])


def reference_image(model_dir, lora_scales, seed=7) -> np.ndarray:
    """Plain diffusers, LoRAs merged into the weights by hand."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for path, scale in lora_scales:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["lora_adapter_metadata"])
                for key in f.keys():
                    if not key.endswith(".lora_A.weight"):
                        continue
                    component, module_path = key.removesuffix(".lora_A.weight").split(".", 1)
                    down, up = f.get_tensor(key), f.get_tensor(key.replace("lora_A", "lora_B"))
                    factor = scale * meta[f"{component}.lora_alpha"] / meta[f"{component}.r"]
                    getattr(pipe, component).get_submodule(module_path).weight += factor * (up @ down)
    out = pipe(PROMPT, num_inference_steps=STEPS, width=64, height=64, guidance_scale=7.0,
               generator=torch.Generator("cpu").manual_seed(seed))
    return pixels(out.images[0])


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_same_request_gives_identical_pixels(engine, store):
    assert np.array_equal(render(engine, store), render(engine, store))


def test_base_image_matches_plain_diffusers(engine, store, tiny_model):
    assert max_diff(render(engine, store), reference_image(tiny_model, [])) == 0


def test_attention_uses_sdpa(engine):
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert {type(p) for p in engine.txt2img.unet.attn_processors.values()} == {AttnProcessor2_0}


@pytest.mark.parametrize("scale", [0.6, 1.0, 1.8])
def test_lora_matches_hand_merged_weights(engine, store, tiny_model, make_lora, scale):
    lora = make_lora(seed=1, text_encoders=True)
    got = render(engine, store, [(lora, scale)])
    expected = reference_image(tiny_model, [(lora, scale)])
    assert max_diff(got, expected) <= 2
    assert np.abs(got - render(engine, store)).mean() > 3, "the LoRA should visibly change the image"


def test_two_loras_combine_as_the_sum_of_their_deltas(engine, store, tiny_model, make_lora):
    a, b = make_lora(seed=1), make_lora(seed=2, text_encoders=True)
    got = render(engine, store, [(a, 0.7), (b, 0.5)])
    assert max_diff(got, reference_image(tiny_model, [(a, 0.7), (b, 0.5)])) <= 2


def test_scale_zero_is_the_base_image(engine, store, make_lora):
    base = render(engine, store)
    assert np.array_equal(render(engine, store, [(make_lora(seed=1, text_encoders=True), 0.0)]), base)


def test_switching_a_b_a_is_bit_identical_and_no_lora_is_base(engine, store, make_lora):
    a, b = make_lora(seed=1, text_encoders=True), make_lora(seed=2)
    base = render(engine, store)
    image_a = render(engine, store, [(a, 1.0)])
    image_b = render(engine, store, [(b, 1.0)])
    assert not np.array_equal(image_a, image_b)
    assert np.array_equal(render(engine, store, [(a, 1.0)]), image_a)
    assert np.array_equal(render(engine, store), base)
    assert np.array_equal(render(engine, store, [(b, 1.0)]), image_b)


def test_kohya_and_diffusers_files_of_the_same_weights_give_the_same_image(engine, store, make_lora):
    diffusers_image = render(engine, store, [(make_lora(seed=3, fmt="diffusers", text_encoders=True), 0.9)])
    kohya_image = render(engine, store, [(make_lora(seed=3, fmt="kohya", text_encoders=True), 0.9)])
    assert max_diff(diffusers_image, kohya_image) <= 1


def test_sources_report_resident_after_first_use(engine, store, make_lora):
    path = make_lora(seed=1)
    lora = store.fetch("a", str(path))
    job = GenerationJob(prompt=PROMPT, num_inference_steps=1, width=64, height=64, loras=[(lora, 1.0)])
    assert engine.generate(job).lora_sources == [lora.source]
    assert engine.generate(job).lora_sources == ["resident"]


def test_resident_adapters_never_exceed_the_cap(tiny_model, store, make_lora):
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=2)
    loras = [store.fetch(f"l{i}", str(make_lora(seed=10 + i))) for i in range(4)]
    for lora in loras + loras[:2]:
        job = GenerationJob(prompt=PROMPT, num_inference_steps=1, width=64, height=64, loras=[(lora, 1.0)])
        engine.generate(job)
        assert len(engine.adapters.resident()) <= 2
        assert len(engine.adapters.injected_names()) <= 2
    too_many = GenerationJob(prompt=PROMPT, num_inference_steps=1, loras=[(lora, 1.0) for lora in loras[:3]])
    with pytest.raises(ServiceError) as err:
        engine.generate(too_many)
    assert err.value.code == ErrorCode.INVALID_REQUEST


# -- incompatible and broken LoRAs --------------------------------------------------------------


def sd15_shaped_lora(path):
    """Keys of an SD 1.5 kohya LoRA: attention in down_blocks.0 at width 320, which SDXL lacks."""
    tensors = {}
    for proj in ("to_q", "to_k", "to_v"):
        key = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_{proj}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, 320)
        tensors[f"{key}.lora_up.weight"] = torch.randn(320, 4)
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return path


def unmatched_keys_lora(path):
    save_file({"unet.not_a_block.proj.lora_A.weight": torch.randn(4, 16),
               "unet.not_a_block.proj.lora_B.weight": torch.randn(16, 4)}, str(path))
    return path


def wrong_shape_lora(path, source):
    """The right module names with the wrong widths (as a LoRA for a wider model would have)."""
    with safe_open(str(source), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    key = next(k for k in tensors if k.endswith("attn2.to_k.lora_A.weight"))
    tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] * 2)
    save_file(tensors, str(path), metadata=metadata)
    return path


def lycoris_lora(path):
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.hada_w1_a": torch.randn(16, 4), f"{key}.hada_w1_b": torch.randn(4, 16),
               f"{key}.hada_w2_a": torch.randn(16, 4), f"{key}.hada_w2_b": torch.randn(4, 16),
               f"{key}.alpha": torch.tensor(4.0)}, str(path))
    return path


@pytest.mark.parametrize("builder", ["sd15", "unmatched", "wrong_shape", "lycoris"])
def test_incompatible_loras_are_refused_and_leave_nothing_behind(engine, store, make_lora, tmp_path, builder):
    good = make_lora(seed=1)
    image_good = render(engine, store, [(good, 1.0)])
    path = tmp_path / f"{builder}.safetensors"
    {"sd15": sd15_shaped_lora, "unmatched": unmatched_keys_lora, "lycoris": lycoris_lora,
     "wrong_shape": lambda p: wrong_shape_lora(p, good)}[builder](path)
    before = engine.adapters.injected_names()
    with pytest.raises(ServiceError) as err:
        render(engine, store, [(path, 1.0)])
    assert err.value.code == ErrorCode.LORA_INCOMPATIBLE, err.value.message
    assert engine.adapters.injected_names() == before
    assert np.array_equal(render(engine, store, [(good, 1.0)]), image_good)


def test_a_load_failing_half_way_leaves_no_adapter_injected(engine, store, make_lora, monkeypatch):
    base = render(engine, store)
    lora = store.fetch("te", str(make_lora(seed=4, text_encoders=True)))

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure after the UNet was injected")

    monkeypatch.setattr(engine.txt2img, "load_lora_into_text_encoder", fail)
    with pytest.raises(ServiceError):
        engine.generate(GenerationJob(prompt=PROMPT, num_inference_steps=STEPS, loras=[(lora, 1.0)]))
    assert engine.adapters.injected_names() == set()
    assert engine.adapters.resident() == []
    monkeypatch.undo()
    assert np.array_equal(render(engine, store), base)


# -- img2img -----------------------------------------------------------------------------------


def test_img2img_keeps_the_reference_size_and_is_deterministic(engine, store, make_lora):
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    first = render(engine, store, [(make_lora(seed=1), 1.0)], image=reference, strength=0.5, width=None, height=None)
    again = render(engine, store, [(make_lora(seed=1), 1.0)], image=reference, strength=0.5, width=None, height=None)
    assert first.shape == (48, 80, 3)
    assert np.array_equal(first, again)


# -- hotswap: a full cache reuses the least recently used adapter's layers -----------------------------


def lora_with_alpha(engine, path, rank: int, alpha: float, seed: int):
    from inference.synthetic import lora_state_dict, random_lora

    tensors, metadata = lora_state_dict(random_lora(engine.txt2img, rank=rank, seed=seed, alpha=alpha), "diffusers")
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_hotswapped_lora_matches_hand_merged_weights_and_swaps_back_bit_identical(tiny_model, store, make_lora,
                                                                                   tmp_path):
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=1)
    a = make_lora(seed=5, rank=4)  # alpha 2 / rank 4
    b = lora_with_alpha(engine, tmp_path / "b.safetensors", rank=8, alpha=6.0, seed=6)  # other rank, other alpha/r
    image_a = render(engine, store, [(a, 1.0)])
    slot = engine.adapters.injected_names()
    image_b = render(engine, store, [(b, 0.7)])
    assert engine.adapters.injected_names() == slot, "B went into A's layers, no new adapter injected"
    assert max_diff(image_b, reference_image(tiny_model, [(b, 0.7)])) <= 2
    assert np.array_equal(render(engine, store, [(a, 1.0)]), image_a)


def kohya_lora_with_mixed_alphas(engine, path, seed: int, keep_every: int = 1, text_encoders: bool = False):
    """A rank-4 kohya file whose modules have alphas 1, 2, 4, 8 in turn (one module in `keep_every`),
    as resized or block-weighted LoRAs have; returns (path, its layers)."""
    from dataclasses import replace

    from inference.synthetic import lora_state_dict, random_lora

    layers = list(random_lora(engine.txt2img, rank=4, seed=seed, text_encoders=text_encoders).items())[::keep_every]
    lora = {name: replace(layer, alpha=(1.0, 2.0, 4.0, 8.0)[i % 4]) for i, (name, layer) in enumerate(layers)}
    tensors, metadata = lora_state_dict(lora, "kohya")
    save_file(tensors, str(path), metadata=metadata)
    return path, lora


def reference_from_layers(model_dir, layers: dict, scale: float, seed=7) -> np.ndarray:
    """Plain diffusers with W + scale * alpha/rank * up @ down merged by hand from the LoRA's own layers."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for name, layer in layers.items():
            component, module_path = name.split(".", 1)
            factor = scale * layer.alpha / layer.down.shape[0]
            getattr(pipe, component).get_submodule(module_path).weight += factor * (layer.up @ layer.down)
    out = pipe(PROMPT, num_inference_steps=STEPS, width=64, height=64, guidance_scale=7.0,
               generator=torch.Generator("cpu").manual_seed(seed))
    return pixels(out.images[0])


def test_a_kohya_lora_with_per_module_alphas_matches_hand_merged_weights(engine, store, tiny_model, tmp_path):
    """diffusers alone would give every module the most common alpha (its alpha_pattern keys match
    no module); read_lora folds each alpha/rank into the up weights instead."""
    path, layers = kohya_lora_with_mixed_alphas(engine, tmp_path / "mixed.safetensors", seed=9, text_encoders=True)
    assert max_diff(render(engine, store, [(path, 0.8)]), reference_from_layers(tiny_model, layers, 0.8)) <= 2


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("keep_every", [1, 3])
def test_a_same_shaped_lora_is_copied_into_the_slot_and_matches_hand_merged_weights(tiny_model, store, make_lora,
                                                                                    tmp_path, fuse, keep_every):
    """The in-place hotswap (no PEFT call): per-module alphas, and modules the new LoRA leaves out
    zeroed; A comes back bit-identical."""
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=1, fuse_adapters=fuse)
    a = make_lora(seed=5, rank=4)
    b, layers = kohya_lora_with_mixed_alphas(engine, tmp_path / "b.safetensors", seed=6, keep_every=keep_every)
    image_a = render(engine, store, [(a, 1.0)])
    slot = engine.adapters.injected_names()
    calls = []
    real = engine.txt2img.load_lora_into_unet
    engine.txt2img.load_lora_into_unet = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    image_b = render(engine, store, [(b, 0.7)])
    assert engine.adapters.injected_names() == slot and calls == [], "copied into A's layers, no PEFT load"
    assert max_diff(image_b, reference_from_layers(tiny_model, layers, 0.7)) <= 2
    assert np.abs(image_b - image_a).mean() > 1
    assert np.array_equal(render(engine, store, [(a, 1.0)]), image_a)


@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_a_lora_of_other_ranks_into_a_full_cache_keeps_each_modules_scaling(tiny_model, store, make_lora, tmp_path,
                                                                            pattern):
    """Ranks 8 and 2 into a rank-4 slot: not a copy, so PEFT's hotswap, which would give every module
    the config's default alpha/rank. rank_pattern (alpha 8 everywhere): swapped, each module scaled
    by its own 8/rank. alpha_pattern (alphas 4 and 16): PEFT refuses to swap differing alpha
    patterns, so the slot is evicted and the LoRA injected instead of the request failing."""
    from dataclasses import replace

    from inference.synthetic import lora_state_dict, random_lora

    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=1)
    layers = {}
    for i, (name, layer) in enumerate(random_lora(engine.txt2img, rank=8, seed=11).items()):
        if pattern == "rank_pattern":
            rank = (8, 2)[i % 2]
            layers[name] = replace(layer, down=layer.down[:rank].contiguous(), up=layer.up[:, :rank].contiguous(),
                                   alpha=8.0)
        else:
            layers[name] = replace(layer, alpha=(4.0, 16.0)[i % 2])
    tensors, header = lora_state_dict(layers, "diffusers")
    metadata = json.loads(header["lora_adapter_metadata"])
    metadata["unet.r"], metadata["unet.lora_alpha"] = 8, (8.0 if pattern == "rank_pattern" else 4.0)
    key = "down" if pattern == "rank_pattern" else "alpha"
    metadata[f"unet.{pattern}"] = {
        name.removeprefix("unet."): (layer.down.shape[0] if key == "down" else layer.alpha)
        for name, layer in layers.items()
        if (layer.down.shape[0] != 8 if key == "down" else layer.alpha != 4.0)}
    b = tmp_path / "b.safetensors"
    save_file(tensors, str(b), metadata={**header, "lora_adapter_metadata": json.dumps(metadata)})
    render(engine, store, [(make_lora(seed=5, rank=4), 1.0)])
    slot = engine.adapters.injected_names()
    image_b = render(engine, store, [(b, 0.7)])
    assert (engine.adapters.injected_names() == slot) == (pattern == "rank_pattern")
    assert len(engine.adapters.injected_names()) == 1
    assert max_diff(image_b, reference_from_layers(tiny_model, layers, 0.7)) <= 2


def test_text_encoder_loras_are_never_hotswapped(tiny_model, store, make_lora):
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=1)
    render(engine, store, [(make_lora(seed=5), 1.0)])
    first = engine.adapters.injected_names()
    te = make_lora(seed=7, text_encoders=True)
    got = render(engine, store, [(te, 1.0)])
    assert engine.adapters.injected_names() != first
    assert max_diff(got, reference_image(tiny_model, [(te, 1.0)])) <= 2


def test_a_lora_coming_back_after_its_layers_were_reused_gets_its_own_adapter(tiny_model, store, make_lora):
    """A is evicted by hotswap (its adapter now holds B); a failed injection leaves room; A is injected again."""
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=2)
    a, b, c = make_lora(seed=5), make_lora(seed=6), make_lora(seed=8)
    image_a = render(engine, store, [(a, 1.0)])
    image_c = render(engine, store, [(c, 1.0)])
    render(engine, store, [(b, 1.0)])  # full: B is hot-swapped into A's adapter
    engine.adapters._evict(next(iter(engine.adapters._resident)))  # room again, as after a failed load
    assert np.array_equal(render(engine, store, [(a, 1.0)]), image_a)
    assert np.array_equal(render(engine, store, [(c, 1.0)]), image_c)


# -- fused adapters (the default on CUDA) ------------------------------------------------------


@pytest.fixture
def fused_engine(tiny_model):
    return Engine(str(tiny_model), device="cpu", max_resident_adapters=3, fuse_adapters=True)


def base_weights(engine) -> dict[str, torch.Tensor]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module.get_base_layer().weight.detach().clone()
            for component in ("unet", "text_encoder", "text_encoder_2")
            for name, module in getattr(engine.txt2img, component).named_modules()
            if isinstance(module, BaseTunerLayer)}


def test_fused_loras_match_hand_merged_weights(fused_engine, store, tiny_model, make_lora):
    a, b = make_lora(seed=1, text_encoders=True), make_lora(seed=2)
    got = render(fused_engine, store, [(a, 0.7), (b, 0.5)])
    assert fused_engine.adapters.fusing.merged, "the active adapters should be merged into the weights"
    assert max_diff(got, reference_image(tiny_model, [(a, 0.7), (b, 0.5)])) <= 2
    assert np.abs(got - render(fused_engine, store)).mean() > 3


def test_fused_switching_restores_the_base_weights_bit_for_bit(fused_engine, engine, store, make_lora):
    a, b = make_lora(seed=1, text_encoders=True), make_lora(seed=2)
    base = render(fused_engine, store)
    image_a = render(fused_engine, store, [(a, 1.0)])
    assert np.array_equal(render(fused_engine, store, [(a, 1.0)]), image_a)  # same request, same pixels
    unfused_weights = None
    for _ in range(2):
        render(fused_engine, store, [(b, 0.8)])
        assert np.array_equal(render(fused_engine, store, [(a, 1.0)]), image_a)
        assert np.array_equal(render(fused_engine, store), base)
        weights = base_weights(fused_engine)  # unfused now: no LoRA requested
        if unfused_weights is not None:
            assert all(torch.equal(weights[k], unfused_weights[k]) for k in weights)
        unfused_weights = weights
    assert np.array_equal(base, render(engine, store))  # the fused engine's base is the plain base
    assert max_diff(image_a, render(engine, store, [(a, 1.0)])) <= 2  # fused vs unfused: rounding only
