"""Identity consistency score: how close an enhanced image stays to the character reference.

The score is the cosine similarity of CLIP image embeddings (`CLIPVisionModelWithProjection`'s
`image_embeds`): identical images score exactly 1.0 (after rounding to 4 decimals), and the
further CLIP sees an image drift from the reference, the lower it scores. It is a cheap guard
against a LoRA or a strength that loses the character, not a face-recognition model.

Imports torch and transformers only, never diffusers: the service loads it next to the engine,
and `write_tiny_clip` gives tests a random-weight model on disk (no hub download).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from PIL import Image

from inference.quiet import quiet_libraries

TINY_CLIP = dict(
    image_size=32, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, projection_dim=16,
)


def _image_processor_class():
    """transformers 5 has a PIL-backed CLIP processor (no torchvision needed); 4.x has only one."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


@cache
def _vision_model_class():
    """CLIPVisionModelWithProjection that loads quietly from a full CLIPModel checkpoint (such as
    openai/clip-vit-large-patch14): the text tower's weights are expected there, and skipped."""
    from transformers import CLIPVisionModelWithProjection

    class VisionTower(CLIPVisionModelWithProjection):
        _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]

    return VisionTower


def _vision_config(model: str):
    """The vision config of a vision-only or a full CLIP checkpoint. A full one keeps
    `projection_dim` at its top level, which the vision config alone would miss (512 by default)."""
    from transformers import AutoConfig, CLIPConfig

    config = AutoConfig.from_pretrained(model)
    if isinstance(config, CLIPConfig):
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return vision
    return config


class IdentityScorer:
    """A CLIP vision tower on one device. Holds no state between calls: `score` may run under the
    caller's lock or from several threads (the model is only read, in inference mode)."""

    def __init__(self, model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        quiet_libraries(diffusers=False)
        self.model_id = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.processor = _image_processor_class().from_pretrained(model)
        self.model = _vision_model_class().from_pretrained(model, config=_vision_config(model), dtype=dtype)
        self.model.to(self.device, dtype).eval()  # dtype again: transformers < 4.56 ignores `dtype=`

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """(len(images), projection_dim) float32 embeddings of unit length; any image size and mode."""
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            embeds = self.model(pixel_values=pixels).image_embeds
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    def score(self, reference: Image.Image, images: list[Image.Image]) -> list[float]:
        """Cosine similarity of each image to `reference`, rounded to 4 decimals (1.0 = identical).

        The reference is embedded in the same batch as the images, so an identical image gets the
        very same embedding and scores exactly 1.0.
        """
        if not images:
            return []
        embeds = self.embed([reference, *images])
        similarity = (embeds[1:] @ embeds[0]).clamp(-1.0, 1.0)
        return [round(float(value), 4) for value in similarity.cpu()]


def write_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """A random-weight CLIP vision model with projection and its image processor, saved in the
    `from_pretrained` layout: the identity score's stand-in for tests (32x32 input, ~50k parameters)."""
    quiet_libraries(diffusers=False)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):  # deterministic per seed, without touching the caller's RNG
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP))
    model.save_pretrained(directory)
    size = TINY_CLIP["image_size"]
    processor = _image_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(directory)
    return directory
