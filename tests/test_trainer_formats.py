"""LoRA files as the real trainers write them (tests/trainer_files.py), loaded by the engine and
checked weight by weight against an independent merge: after activation at scale s with fusing on,
every weight the file targets is W + s * alpha/rank * up @ down (convolutions included) and every
other weight of the UNet and text encoders is bit for bit the base one.
"""

from __future__ import annotations

import tarfile

import pytest
import torch
from safetensors.torch import save_file

from inference.errors import ErrorCode, ServiceError
from inference.lora_store import LoraStore
from inference.pipeline import Engine
from tests import trainer_files as tf

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
SCALE = 0.8


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(str(tiny_model), device="cpu", max_resident_adapters=2, fuse_adapters=True)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_model)


@pytest.fixture
def store(tmp_path):
    return LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 28, allow_local_paths=True)


def weights(engine) -> dict[str, torch.Tensor]:
    """Every Linear/Conv2d weight of the UNet and text encoders as the forward pass uses it (fused)."""
    found = {}
    for component in COMPONENTS:
        for name, module in getattr(engine.txt2img, component).named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name:
                found[f"{component}.{name.removesuffix('.base_layer')}"] = module.weight.detach().clone()
    return found


def apply(engine, store, path, scale=SCALE) -> tuple[dict, dict]:
    """(weights with no LoRA, weights with the file's LoRA fused at `scale`); the LoRA is deactivated after."""
    engine.adapters.activate([])
    base = weights(engine)
    lora = store.fetch(path.stem, str(path))
    engine.adapters.activate([(lora, scale)])
    assert engine.adapters.fusing.merged
    fused = weights(engine)
    engine.adapters.activate([])
    return base, fused


def check_against_reference(base, fused, deltas, scale=SCALE) -> int:
    """Assert fused == base + scale * delta for the file's modules, == base elsewhere; return how many matched."""
    assert deltas and set(deltas) <= set(base), sorted(set(deltas) - set(base))[:3]
    wrong = []
    for name, weight in base.items():
        if name not in deltas:
            assert torch.equal(fused[name], weight), f"{name} changed but the file does not target it"
            continue
        expected = weight.double() + scale * deltas[name]
        tolerance = 1e-6 + 1e-5 * float(deltas[name].abs().max())
        if not torch.allclose(fused[name].double(), expected, rtol=0, atol=tolerance):
            wrong.append(name)
        assert float(deltas[name].abs().max()) > 0
    assert not wrong, f"{len(wrong)} of {len(deltas)} weights differ from the hand merge, e.g. {wrong[:3]}"
    return len(deltas)


KOHYA_FILES = {
    "kohya_unet_and_text_encoders_fp16": dict(),
    "kohya_unet_only_bf16": dict(dtype=torch.bfloat16, text_encoders=False),
    "kohya_locon_conv_dim": dict(conv=True, text_encoders=False),
    "kohya_block_dims_and_alphas": dict(dims=tf.block_dims),
    "kohya_resize_lora_dynamic": dict(dims=tf.resized_dims, conv=True,
                                      metadata={"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}),
    "kohya_text_encoders_only": dict(unet=False),
}


@pytest.mark.parametrize("name", list(KOHYA_FILES))
def test_kohya_files_match_the_hand_merge_weight_by_weight(engine, store, pipe, tmp_path, name):
    """sd-scripts' files: every module's own alpha/rank, whatever mix of modules, ranks and dtypes."""
    file = tf.write_kohya(pipe, tmp_path / f"{name}.safetensors", seed=len(name), **KOHYA_FILES[name])
    matched = check_against_reference(*apply(engine, store, file.path), file.deltas)
    print(f"{name}: {matched}/{len(file.deltas)} weights match the hand merge")


def test_ai_toolkit_sdxl_layout_loads_with_add_embedding(engine, store, pipe, tmp_path):
    file = tf.write_ai_toolkit(pipe, tmp_path / "ai_toolkit.safetensors", seed=4)
    assert {"unet.add_embedding.linear_1", "unet.time_embedding.linear_1"} <= set(file.deltas)
    matched = check_against_reference(*apply(engine, store, file.path), file.deltas)
    print(f"ai-toolkit: {matched}/{len(file.deltas)} weights match the hand merge")


@pytest.mark.parametrize("text_encoders", [False, True], ids=["unet", "unet_and_text_encoders"])
def test_diffusers_dreambooth_output_matches_the_hand_merge(engine, store, tiny_model, tmp_path, text_encoders):
    file = tf.write_dreambooth(tiny_model, tmp_path / "out", seed=5, text_encoders=text_encoders)
    check_against_reference(*apply(engine, store, file.path), file.deltas)


def test_diffusers_output_kohya_format_with_int64_alphas_matches(engine, store, tiny_model, tmp_path):
    file = tf.write_dreambooth_kohya(tf.write_dreambooth(tiny_model, tmp_path / "out", seed=6, text_encoders=False))
    check_against_reference(*apply(engine, store, file.path), file.deltas)


def refusal(engine, store, path) -> ServiceError:
    """The ServiceError the file is refused with; no adapter is left behind."""
    before = engine.adapters.injected_names()
    with pytest.raises(ServiceError) as caught:
        engine.adapters.activate([(store.fetch(path.stem, str(path)), 1.0)])
    assert engine.adapters.injected_names() == before
    return caught.value


def test_a_peft_dora_file_is_refused_before_conversion_naming_dora(engine, store, tiny_model, tmp_path):
    file = tf.write_dreambooth(tiny_model, tmp_path / "dora", seed=7, text_encoders=False, use_dora=True)
    error = refusal(engine, store, file.path)
    assert error.code == ErrorCode.LORA_INCOMPATIBLE and "DoRA" in error.message
    assert "lora_magnitude_vector" in error.message


def test_a_kohya_dora_file_is_refused_naming_dora_and_its_own_keys(engine, store, pipe, tmp_path):
    """LyCORIS (lycoris/modules/locon.py, dora_wd=True) writes a ``dora_scale`` per module beside kohya keys."""
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    file = tf.write_kohya(pipe, tmp_path / "dora.safetensors", seed=8, text_encoders=False,
                          extra={f"{name}.dora_scale": torch.ones(1, 32, dtype=torch.float16)})
    error = refusal(engine, store, file.path)
    assert error.code == ErrorCode.LORA_INCOMPATIBLE and "DoRA" in error.message and f"{name}.dora_scale" in error.message


@pytest.mark.parametrize("kind, keys", [
    ("loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    ("lokr", ("lokr_w1", "lokr_w2_a", "lokr_w2_b")),
])
def test_lycoris_networks_are_refused_quoting_the_files_own_keys(engine, store, tmp_path, kind, keys):
    module = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    tensors = {f"{module}.{key}": torch.randn(4, 4) for key in keys} | {f"{module}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(tmp_path / f"{kind}.safetensors"))
    error = refusal(engine, store, tmp_path / f"{kind}.safetensors")
    assert error.code == ErrorCode.LORA_INCOMPATIBLE and "LyCORIS" in error.message
    assert f"'{module}.{keys[0]}'" in error.message, error.message


def test_stray_keys_are_counted_right_and_quoted_as_the_file_names_them(engine, store, pipe, tmp_path):
    extra = {"bundle_emb.tok.clip_l": torch.randn(2, 32), "bundle_emb.tok.clip_g": torch.randn(2, 32)}
    file = tf.write_kohya(pipe, tmp_path / "stray.safetensors", seed=9, extra=extra)
    error = refusal(engine, store, file.path)
    assert error.code == ErrorCode.LORA_INCOMPATIBLE
    assert error.message.startswith(f"2 of {3 * len(file.deltas) + 2} keys"), error.message
    assert "'bundle_emb.tok.clip_g'" in error.message


def test_an_sd15_kohya_file_is_refused_as_another_architecture(engine, store, tmp_path):
    """SD 1.5 kohya files name diffusers' SD 1.5 modules: down_blocks.0 has attentions there, not in SDXL."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 768), f"{name}.lora_up.weight": torch.randn(320, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(tmp_path / "sd15.safetensors"))
    error = refusal(engine, store, tmp_path / "sd15.safetensors")
    assert error.code == ErrorCode.LORA_INCOMPATIBLE and "down_blocks.0.attentions.0" in error.message


def tar_folder(folder, out):
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return out


def test_the_advanced_trainers_output_folder_as_a_tar_loads_its_lora_and_pivotal_tokens(engine, store, tiny_model,
                                                                                        tmp_path):
    """train_dreambooth_lora_sdxl_advanced.py's folder, tarred as it is: the LoRA and ``*_emb.safetensors``
    (clip_l/clip_g) are found, checkpoints are skipped, the tokens <s0><s1> are loaded into both text
    encoders under this LoRA's own names, and the prompt's <s0><s1> is rewritten to them."""
    lora, rows = tf.write_advanced_output_folder(tiny_model, tmp_path / "my-character", seed=10)
    path = tar_folder(tmp_path / "my-character", tmp_path / "my-character.tar.gz")
    base, fused = apply(engine, store, path)
    check_against_reference(base, fused, lora.deltas)
    file = store.fetch("my-character", str(path))
    engine.adapters.activate([(file, 1.0)])
    prompt = engine.adapters.prompt_for("a photo of <s0><s1>", [file])
    assert "<s0>" not in prompt
    pipe = engine.txt2img
    for (tokenizer, encoder), key in (((pipe.tokenizer, pipe.text_encoder), "clip_l"),
                                      ((pipe.tokenizer_2, pipe.text_encoder_2), "clip_g")):
        loaded = [t for t in tokenizer.get_vocab() if t.startswith(f"<{file.sha256[:12]}_s")]
        ids = tokenizer.convert_tokens_to_ids(sorted(loaded))
        assert torch.equal(encoder.get_input_embeddings().weight[ids].detach(), rows[key])
    engine.adapters.clear()


def test_a_folder_tar_with_two_embedding_files_is_refused(store, tiny_model, tmp_path):
    tf.write_advanced_output_folder(tiny_model, tmp_path / "twice", seed=11)
    data = (tmp_path / "twice" / "twice_emb.safetensors").read_bytes()
    (tmp_path / "twice" / "other_emb.safetensors").write_bytes(data)
    with pytest.raises(ServiceError) as caught:
        store.fetch("twice", str(tar_folder(tmp_path / "twice", tmp_path / "twice.tar")))
    assert caught.value.code == ErrorCode.LORA_INVALID and "embedding" in caught.value.message


def test_a_block_weighted_kohya_file_renders_the_hand_merged_image(engine, store, pipe, tiny_model, tmp_path):
    """Image level: the engine's render against plain diffusers with the deltas added by hand."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline

    from inference.pipeline import GenerationJob

    file = tf.write_kohya(pipe, tmp_path / "blocks.safetensors", seed=12, dims=tf.block_dims)
    settings = dict(prompt="a portrait photo of a character", num_inference_steps=4, width=64, height=64,
                    guidance_scale=7.0)
    job = GenerationJob(seed=7, loras=[(store.fetch("blocks", str(file.path)), SCALE)], **settings)
    got = np.asarray(engine.generate(job).images[0], dtype=np.int16)
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    reference.set_progress_bar_config(disable=True)
    base = np.asarray(reference(**settings, generator=torch.Generator().manual_seed(7)).images[0], dtype=np.int16)
    with torch.no_grad():
        for name, change in file.deltas.items():
            component, path = name.split(".", 1)
            getattr(reference, component).get_submodule(path).weight += (SCALE * change).float()
    expected = np.asarray(reference(**settings, generator=torch.Generator().manual_seed(7)).images[0], dtype=np.int16)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(expected - base).mean() > 3, "the LoRA should visibly change the image"
