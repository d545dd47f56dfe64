"""Random-weight SDXL pipelines and LoRAs, for tests and benchmarks with no download.

`tiny` keeps SDXL's structure (two CLIP text encoders, text_time conditioning, three UNet levels
with two layers each, an 8x VAE) at toy widths, so every loader code path (diffusers and kohya
key layouts included) runs as it would on the real model. `full` uses the real SDXL-base
configurations, so parameter counts and FLOPs match the production checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.adapters import USUAL_UNET_TARGETS
from inference.quiet import quiet_libraries

# SDXL-base's configurations, as published with stabilityai/stable-diffusion-xl-base-1.0.
FULL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
FULL_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
FULL_TEXT_ENCODER_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
FULL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025, force_upcast=True,
)

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=64,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)
TINY_TEXT_ENCODER = dict(
    vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,  # = len(tokenizer), as in SDXL
    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
)
TINY_TEXT_ENCODER_2 = dict(TINY_TEXT_ENCODER, hidden_act="gelu")
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
    block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025, force_upcast=False,  # fp32 on CPU anyway; avoids a .to() warning per img2img call
)

SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
)

SIZES = {
    "tiny": (TINY_UNET, TINY_TEXT_ENCODER, TINY_TEXT_ENCODER_2, TINY_VAE),
    "full": (FULL_UNET, FULL_TEXT_ENCODER, FULL_TEXT_ENCODER_2, FULL_VAE),
}

UNET_TARGETS = tuple(USUAL_UNET_TARGETS)  # what the engine wraps at start: the trainers' usual targets
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_FORMATS = ("diffusers", "kohya", "replicate")
PIVOTAL_TOKENS = 2  # Replicate bundles: random embeddings for <s0><s1>


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(directory: Path) -> None:
    """A byte-level CLIP BPE vocabulary (no merges): every prompt tokenizes, nothing is downloaded."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def build_pipeline(size: str = "tiny", seed: int = 0):
    """An in-memory StableDiffusionXLPipeline with random weights (fp32, CPU)."""
    import tempfile

    quiet_libraries()
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet_cfg, te_cfg, te2_cfg, vae_cfg = SIZES[size]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"), model_max_length=77)
        tokenizer_2 = CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"), model_max_length=77, pad_token="!")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )


def write_model(directory: str | Path, size: str = "tiny", seed: int = 0, variant: str | None = None) -> Path:
    """Save a synthetic pipeline in the diffusers layout, loadable with from_pretrained.

    `variant="fp16"`: fp16 weights in `*.fp16.safetensors` files, as the hub's SDXL ships them (call
    again without a variant into the same directory for a model that has both).
    """
    directory = Path(directory)
    pipe = build_pipeline(size, seed)
    if size == "full" or variant == "fp16":  # full: 2.6 B parameters, the size of the real fp16 checkpoint
        pipe.to(torch.float16)
    pipe.save_pretrained(directory, safe_serialization=True, variant=variant)
    for tokenizer in ("tokenizer", "tokenizer_2"):  # also the BPE source files, for slow-tokenizer loaders
        write_clip_tokenizer_files(directory / tokenizer)
    (directory / "synthetic.json").write_text(json.dumps({"size": size, "seed": seed}))
    return directory


# ---------------------------------------------------------------------------------------------
# LoRAs


@dataclass(frozen=True)
class LoraLayer:
    """One LoRA pair for a Linear layer: W' = W + scale * alpha / rank * up @ down."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float


def lora_target_layers(pipe, text_encoders: bool = False) -> dict[str, torch.nn.Linear]:
    """The usual LoRA targets: UNet attention projections (and CLIP self-attention projections).

    Keys are `component.module.path` in diffusers naming; sorted, so random draws are reproducible.
    """
    components = [("unet", pipe.unet, UNET_TARGETS)]
    if text_encoders:
        components += [("text_encoder", pipe.text_encoder, TEXT_ENCODER_TARGETS),
                       ("text_encoder_2", pipe.text_encoder_2, TEXT_ENCODER_TARGETS)]
    layers = {}
    for prefix, model, targets in components:
        for name, module in model.named_modules():
            name = name.removesuffix(".base_layer")  # a layer PEFT wrapped (the engine wraps at start)
            if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in targets):
                if prefix == "unet" and ".attentions." not in name and not name.startswith("mid_block.attentions"):
                    continue
                layers[f"{prefix}.{name}"] = module
    return dict(sorted(layers.items()))


def random_lora(pipe, rank: int = 4, seed: int = 0, text_encoders: bool = False, alpha: float | None = None) -> dict[str, LoraLayer]:
    """Random LoRA weights for `pipe`, of a magnitude that visibly changes the image."""
    gen = torch.Generator().manual_seed(seed)
    alpha = float(rank) / 2 if alpha is None else float(alpha)
    lora = {}
    for name, linear in lora_target_layers(pipe, text_encoders).items():
        down = torch.randn(rank, linear.in_features, generator=gen) / linear.in_features**0.5
        up = torch.randn(linear.out_features, rank, generator=gen) / rank**0.5
        lora[name] = LoraLayer(down=down, up=up, alpha=alpha)
    return lora


KOHYA_EXTRA_TARGETS = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def kohya_untrained_layers(pipe, rank: int) -> dict[str, LoraLayer]:
    """The other Linear layers kohya's networks/lora.py wraps in every Transformer2DModel (projections,
    feed-forward), with the zero up weights kohya initialises them to: a kohya file carries them, at no
    change to the weights, so every format of one seed still holds the same LoRA."""
    gen = torch.Generator().manual_seed(rank)
    layers = {}
    for name, module in sorted(pipe.unet.named_modules()):
        name = name.removesuffix(".base_layer")
        if (isinstance(module, torch.nn.Linear) and ".attentions." in f".{name}"
                and any(name.endswith("." + t) for t in KOHYA_EXTRA_TARGETS)):
            down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            layers[f"unet.{name}"] = LoraLayer(down=down, up=torch.zeros(module.out_features, rank), alpha=float(rank))
    return dict(sorted(layers.items()))


def _sgm_unet_path(path: str, layers_per_block: int) -> str:
    """diffusers UNet module path -> the original (SGM) UNet path that kohya's SDXL LoRAs use."""
    parts = path.split(".")
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        block = int(parts[1]) * (layers_per_block + 1) + int(parts[3]) + 1
        return ".".join(["input_blocks", str(block), "1", *parts[4:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        block = int(parts[1]) * (layers_per_block + 1) + int(parts[3])
        return ".".join(["output_blocks", str(block), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    raise ValueError(f"no SGM name for UNet module {path}")


def lora_state_dict(lora: dict[str, LoraLayer], fmt: str, layers_per_block: int = 2) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Serialize LoRA layers into one of the on-disk key layouts: (tensors, safetensors metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    if fmt == "diffusers":
        for name, layer in lora.items():
            tensors[f"{name}.lora_A.weight"] = layer.down.contiguous()
            tensors[f"{name}.lora_B.weight"] = layer.up.contiguous()
        metadata = {}
        for component in ("unet", "text_encoder", "text_encoder_2"):
            names = [n.split(".", 1)[1] for n in lora if n.split(".", 1)[0] == component]
            if names:
                first = lora[f"{component}.{names[0]}"]
                config = {"r": first.down.shape[0], "lora_alpha": first.alpha, "target_modules": names}
                metadata[component] = config
        return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(_prefixed(metadata))}
    if fmt == "kohya":
        # Per-module alphas, as resized and block-weighted kohya files have: module i gets alpha * 2^(i%3 - 1)
        # and its up weight the inverse power of two, so alpha/rank * up, and the weights, are exactly the
        # other formats'. Text encoders are named as kohya names transformers 4's CLIP (text_model.).
        kohya_prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
        for index, (name, layer) in enumerate(lora.items()):
            component, path = name.split(".", 1)
            if component == "unet":
                path = _sgm_unet_path(path, layers_per_block)
            elif not path.startswith("text_model."):
                path = f"text_model.{path}"
            key = f"{kohya_prefix[component]}_{path.replace('.', '_')}"
            ratio = 2.0 ** (index % 3 - 1)
            tensors[f"{key}.lora_down.weight"] = layer.down.contiguous()
            tensors[f"{key}.lora_up.weight"] = (layer.up / ratio).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(layer.alpha * ratio)
        return tensors, {"format": "pt", "ss_network_module": "networks.lora"}
    if fmt == "replicate":
        # cog-sdxl's attention-processor layout, no alpha (scale 1): alpha/r is folded into `up`,
        # exactly when it is a power of two, as the default rank/2 is.
        for name, layer in lora.items():
            component, path = name.split(".", 1)
            if component != "unet":
                raise ValueError("Replicate's SDXL bundles hold UNet LoRA layers only (text encoders get embeddings)")
            attention, projection = path.removesuffix(".0").rsplit(".", 1)
            rank = layer.down.shape[0]
            prefix = f"{attention}.processor.{projection}_lora"
            tensors[f"{prefix}.down.weight"] = layer.down.contiguous()
            tensors[f"{prefix}.up.weight"] = (layer.up * (layer.alpha / rank)).contiguous()
        return tensors, {"format": "pt"}
    raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {LORA_FORMATS}")


def _prefixed(per_component: dict[str, dict]) -> dict:
    """diffusers stores per-component LoraConfig kwargs flattened as `component.key`."""
    return {f"{component}.{key}": value for component, config in per_component.items() for key, value in config.items()}


def write_vae(directory: str | Path, size: str = "tiny", seed: int = 0, force_upcast: bool = False) -> Path:
    """A random-weight SDXL VAE alone, for SDXL_LORA_VAE: `force_upcast=False` is what an fp16-safe
    VAE (madebyollin/sdxl-vae-fp16-fix) says in its config."""
    quiet_libraries()
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**SIZES[size][3], "force_upcast": force_upcast})
    vae.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def write_lora(model_dir: str | Path, out: str | Path, *, rank: int = 4, fmt: str = "diffusers",
               text_encoders: bool = False, seed: int = 0) -> Path:
    """Write a random LoRA that fits the model at `model_dir` (same seed: same weights in every format)."""
    quiet_libraries()
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    lora = random_lora(pipe, rank=rank, seed=seed, text_encoders=text_encoders)
    if fmt == "kohya":
        lora = {**lora, **kohya_untrained_layers(pipe, rank)}
    tensors, metadata = lora_state_dict(lora, fmt, pipe.unet.config.layers_per_block)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "replicate":
        write_replicate_bundle(out, tensors, pivotal_embeddings(pipe, seed))
    else:
        save_file(tensors, str(out), metadata=metadata)
    return out


def pivotal_embeddings(pipe, seed: int, tokens: int = PIVOTAL_TOKENS) -> dict[str, torch.Tensor]:
    """Random token embeddings for both text encoders, at the scale of the existing ones."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    rows = {}
    for index, encoder in enumerate((pipe.text_encoder, pipe.text_encoder_2)):
        weight = encoder.get_input_embeddings().weight
        rows[f"text_encoders_{index}"] = torch.randn(tokens, weight.shape[1], generator=gen) * weight.std().item()
    return rows


def write_replicate_bundle(out: Path, lora_tensors: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor]) -> None:
    """A `trained_model.tar` as Replicate's SDXL trainer writes it."""
    import io
    import tarfile

    from safetensors.torch import save

    tokens = "".join(f"<s{i}>" for i in range(next(iter(embeddings.values())).shape[0]))
    members = {
        "lora.safetensors": save(lora_tensors),
        "embeddings.pti": save(embeddings),
        "special_params.json": json.dumps({"TOK": tokens}).encode(),
    }
    with tarfile.open(out, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
