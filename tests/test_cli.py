"""The command line: synthetic builders and local generation, as a user runs them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdxl_lora_tools.cli import main, parse_lora_arg


def test_full_size_synthetic_model_has_sdxl_base_parameter_counts():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from inference.synthetic import FULL_TEXT_ENCODER, FULL_TEXT_ENCODER_2, FULL_UNET, FULL_VAE

    with init_empty_weights():
        counts = {
            "unet": UNet2DConditionModel(**FULL_UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**FULL_TEXT_ENCODER)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**FULL_TEXT_ENCODER_2)),
            "vae": AutoencoderKL(**FULL_VAE),
        }
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in counts.items()}
    assert params["unet"] == pytest.approx(2.567e9, rel=0.01)
    assert params["text_encoder"] == pytest.approx(123.1e6, rel=0.01)
    assert params["text_encoder_2"] == pytest.approx(694.7e6, rel=0.01)
    assert params["vae"] == pytest.approx(83.65e6, rel=0.01)


def test_parse_lora_arg():
    assert parse_lora_arg("https://x/a.safetensors@0.7") == ("https://x/a.safetensors", 0.7)
    assert parse_lora_arg("/tmp/a.safetensors") == ("/tmp/a.safetensors", 1.0)
    assert parse_lora_arg("s3://b/user@host/a.safetensors") == ("s3://b/user@host/a.safetensors", 1.0)


def test_synth_and_generate_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDXL_LORA_LORA_CACHE_DIR", str(tmp_path / "cache"))
    model, lora = tmp_path / "model", tmp_path / "lora.safetensors"
    assert main(["synth-model", str(model), "--size", "tiny", "--seed", "3"]) == 0
    assert (model / "model_index.json").exists() and (model / "tokenizer" / "vocab.json").exists()
    assert main(["synth-lora", "--model", str(model), "--out", str(lora), "--rank", "8", "--format", "kohya"]) == 0

    common = ["generate", "--model", str(model), "--prompt", "a character", "--steps", "2", "--width", "64",
              "--height", "64", "--device", "cpu"]
    plain, with_lora = tmp_path / "plain.png", tmp_path / "lora.png"
    assert main(common + ["--out", str(plain)]) == 0
    assert main(common + ["--lora", f"{lora}@1.5", "--out", str(with_lora)]) == 0
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(with_lora)))

    grid = tmp_path / "grid.png"
    assert main(common + ["--lora", str(lora), "--grid", "1.5,0.5", "--out", str(grid)]) == 0
    sheet = np.asarray(Image.open(grid))
    assert sheet.shape[1] == 3 * 64  # scale 0 is always added: 0, 0.5, 1.5
    first_tile = sheet[:64, :64]
    assert np.array_equal(first_tile, np.asarray(Image.open(plain))), "scale 0 first, identical to no LoRA"
    assert "scales 0, 0.5, 1.5" in capsys.readouterr().out


def test_generate_reports_a_bad_lora_as_its_error_code(tmp_path, monkeypatch, capsys, tiny_model):
    monkeypatch.setenv("SDXL_LORA_LORA_CACHE_DIR", str(tmp_path / "cache"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"nope" * 100)
    code = main(["generate", "--model", str(tiny_model), "--prompt", "x", "--lora", str(garbage),
                 "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert code == 2
    assert "lora_invalid" in capsys.readouterr().err
