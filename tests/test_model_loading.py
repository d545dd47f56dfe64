"""What the engine loads: fp16-variant files where they are there and will do, a VAE of the
deployer's choosing (SDXL_LORA_VAE), and no silent CPU fallback for a GPU it was told to use."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from inference.pipeline import DeviceUnavailable, Engine, GenerationJob, resolve_device, weights_variant
from inference.synthetic import write_model, write_vae

JOB = GenerationJob(prompt="a portrait", num_inference_steps=2, width=64, height=64, seed=1)


@pytest.fixture(scope="module")
def fp16_only(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("fp16-only") / "model", variant="fp16")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    directory = tmp_path_factory.mktemp("both") / "model"
    write_model(directory)
    write_model(directory, variant="fp16")
    return directory


def unet_weight(engine: Engine) -> torch.Tensor:
    return engine.txt2img.unet.conv_in.weight.detach()


def test_a_directory_with_only_fp16_files_loads_them(fp16_only):
    assert not [f for f in fp16_only.glob("*/*.safetensors") if ".fp16." not in f.name], "only variant files"
    assert weights_variant(str(fp16_only), torch.float32) == "fp16"
    engine = Engine(str(fp16_only), device="cpu", dtype="float32")
    saved = load_file(str(fp16_only / "unet" / "diffusion_pytorch_model.fp16.safetensors"))["conv_in.weight"]
    assert torch.equal(unet_weight(engine), saved.float())
    assert engine.generate(JOB).images[0].size == (64, 64)


def test_with_both_the_fp16_files_are_read_in_half_precision(both, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(both, copy)
    for full in copy.glob("*/*.safetensors"):
        if ".fp16." not in full.name:
            full.write_bytes(b"not read")  # loading must not touch these: half the bytes at every cold start
    assert weights_variant(str(copy), torch.float16) == "fp16"
    engine = Engine(str(copy), device="cpu", dtype="float16")
    saved = load_file(str(both / "unet" / "diffusion_pytorch_model.fp16.safetensors"))["conv_in.weight"]
    assert engine.dtype == torch.float16 and torch.equal(unet_weight(engine), saved)


def test_with_both_full_precision_reads_the_full_files(both):
    assert weights_variant(str(both), torch.float32) is None
    engine = Engine(str(both), device="cpu", dtype="float32")
    saved = load_file(str(both / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"]
    assert torch.equal(unet_weight(engine), saved)


@pytest.fixture(scope="module")
def upcasting_model(tmp_path_factory):
    """A model whose own VAE says force_upcast, as SDXL's stock VAE does."""
    directory = write_model(tmp_path_factory.mktemp("upcast") / "model")
    write_vae(directory / "vae", force_upcast=True)
    return directory


def count_upcasts(engine: Engine, monkeypatch) -> list:
    calls = []
    original = type(engine.txt2img).upcast_vae
    monkeypatch.setattr(type(engine.txt2img), "upcast_vae", lambda pipe: (calls.append(1), original(pipe)))
    return calls


def test_an_fp16_safe_vae_replaces_the_models_and_decodes_without_upcasting(upcasting_model, tmp_path, monkeypatch):
    stock = Engine(str(upcasting_model), device="cpu", dtype="float16")
    calls = count_upcasts(stock, monkeypatch)
    stock.generate(JOB)
    assert calls, "the stock VAE is upcast to fp32 for its decode"

    safe = write_vae(tmp_path / "fp16-safe-vae", seed=9, force_upcast=False)
    engine = Engine(str(upcasting_model), device="cpu", dtype="float16", vae=str(safe))
    vae = engine.txt2img.vae
    assert vae.config.force_upcast is False and vae.dtype == torch.float16
    saved = load_file(str(safe / "diffusion_pytorch_model.safetensors"))["decoder.conv_out.weight"]
    assert torch.equal(vae.decoder.conv_out.weight.detach(), saved.half())
    assert engine.img2img.vae is vae, "img2img shares the chosen VAE"
    calls = count_upcasts(engine, monkeypatch)
    assert engine.generate(JOB).images[0].size == (64, 64)
    assert calls == [], "no fp32 upcast per decode"


def test_a_cuda_device_without_cuda_refuses_to_start_and_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    with pytest.raises(DeviceUnavailable) as error:
        resolve_device("cuda")
    message = str(error.value)
    assert "SDXL_LORA_DEVICE=cuda" in message and "SDXL_LORA_DEVICE=cpu" in message
    assert "CUDA" in message and torch.__version__ in message
    assert resolve_device("cpu") == torch.device("cpu")
