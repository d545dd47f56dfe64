"""Identity score: CLIP image-embedding similarity, on a tiny random CLIP loaded from disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_lora_client.contract import GenerateResponse, ImageOut

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from inference.identity import IdentityScorer, write_tiny_clip

ROOT = Path(__file__).resolve().parents[1]


def noise(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="module")
def scorer(tiny_clip) -> IdentityScorer:
    return IdentityScorer(str(tiny_clip))


def test_identical_image_scores_exactly_one_and_a_different_one_lower(scorer):
    reference = noise(1)
    same, other, gradient = reference.copy(), noise(2), Image.linear_gradient("L").convert("RGB")
    scores = scorer.score(reference, [same, other, gradient, reference])
    assert scores[0] == 1.0 and scores[3] == 1.0
    # A random CLIP sees two noise images as close, yet still not identical.
    assert scores[1] < 0.999 and scores[2] < 0.99
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert all(round(s, 4) == s for s in scores)


def test_any_size_and_mode_is_accepted(scorer):
    reference = noise(3, (96, 64))
    images = [reference.convert("RGBA"), noise(4, (40, 72)).convert("L"), noise(5, (1024, 512))]
    scores = scorer.score(reference, images)
    assert len(scores) == 3 and scores[0] == 1.0
    assert scorer.score(reference, []) == []


def test_embeddings_are_unit_length_float32(scorer):
    embeds = scorer.embed([noise(6), noise(7)])
    assert embeds.shape == (2, 16) and embeds.dtype == torch.float32
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_tiny_clip_is_deterministic_per_seed_and_leaves_the_global_rng_alone(tmp_path, scorer):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    again = IdentityScorer(str(write_tiny_clip(tmp_path / "again", seed=0)))
    assert torch.equal(torch.random.get_rng_state(), state)
    other_seed = IdentityScorer(str(write_tiny_clip(tmp_path / "seed1", seed=1)))
    images = [noise(8), noise(9)]
    assert torch.equal(again.embed(images), scorer.embed(images))
    assert not torch.allclose(other_seed.embed(images), scorer.embed(images))


def test_tiny_clip_is_a_from_pretrained_directory(tiny_clip):
    from transformers import CLIPVisionModelWithProjection

    assert {p.name for p in tiny_clip.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    model = CLIPVisionModelWithProjection.from_pretrained(tiny_clip)
    assert model.config.projection_dim == 16 and model.config.image_size == 32


def test_a_full_clip_checkpoint_loads_its_vision_tower_and_projection(tmp_path):
    """Production's openai/clip-vit-large-patch14 is a CLIPModel checkpoint (text and vision towers,
    projection_dim at the top of its config): the scorer must use its trained visual projection."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from inference.identity import TINY_CLIP

    vision = {k: v for k, v in TINY_CLIP.items() if k != "projection_dim"}
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    full.save_pretrained(tmp_path / "full")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "full")

    scorer = IdentityScorer(str(tmp_path / "full"))
    assert torch.equal(scorer.model.visual_projection.weight, full.visual_projection.weight)
    images = [noise(10), noise(11)]
    pixels = scorer.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = full.get_image_features(pixel_values=pixels)
    features = getattr(features, "pooler_output", features)  # a tensor in 4.x, an output object in 5.x
    expected = torch.nn.functional.normalize(features, dim=-1)
    assert torch.allclose(scorer.embed(images), expected, atol=1e-5)


def test_importing_identity_does_not_import_diffusers():
    code = "import sys, inference.identity; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_identity_setting_is_off_by_default_and_read_from_the_environment(monkeypatch):
    from inference.settings import Settings

    monkeypatch.delenv("SDXL_LORA_IDENTITY_MODEL", raising=False)
    assert Settings().identity_model is None
    monkeypatch.setenv("SDXL_LORA_IDENTITY_MODEL", "openai/clip-vit-large-patch14")
    assert Settings().identity_model == "openai/clip-vit-large-patch14"


def test_identity_score_in_the_response_schema_only_when_computed():
    common = dict(seed=1, width=64, height=64, mime="image/png", sha256="0" * 64, base64="AA==")
    assert "identity_score" not in ImageOut(**common).model_dump(mode="json", exclude_none=True)
    scored = ImageOut(**common, identity_score=0.8731).model_dump(mode="json", exclude_none=True)
    assert scored["identity_score"] == 0.8731
    field = GenerateResponse.model_json_schema()["$defs"]["ImageOut"]["properties"]["identity_score"]
    assert "CLIP image embeddings" in field["description"] and "SDXL_LORA_IDENTITY_MODEL" in field["description"]
