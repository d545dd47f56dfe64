"""LoRA files laid out as the real SDXL trainers save them, for the tiny synthetic SDXL, each with
its independent reference: the change of every weight, alpha / rank * up @ down (convolutions
flattened), computed here from the tensors as written, never through the service's key mapping.

Module names come from the diffusers UNet and are turned into each trainer's names the way the
trainer does it (kohya's SGM names for SDXL, diffusers names in kohya keys for ai-toolkit); where
the trainer's own save code is importable (diffusers' scripts), that code writes the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KOHYA_TE_PREFIX = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@dataclass
class TrainerFile:
    path: Path
    deltas: dict[str, torch.Tensor]  # "component.module.path" -> dW at scale 1 (float64)


# -- which modules each trainer wraps ----------------------------------------------------------------

def layers(model: torch.nn.Module, inside: tuple[str, ...], kinds=(torch.nn.Linear, torch.nn.Conv2d)) -> dict:
    """Linear/Conv2d modules whose path has one of `inside` as a component (PEFT wrappers seen through)."""
    found = {}
    for name, module in model.named_modules():
        if ".lora_" in name or not isinstance(module, kinds):
            continue
        name = name.removesuffix(".base_layer")
        if any(part in inside for part in name.split(".")):
            found[name] = module
    return dict(sorted(found.items()))


def kohya_unet_layers(unet, conv: bool) -> dict:
    """networks/lora.py LoRANetwork: every Linear (and 1x1 conv) in a Transformer2DModel; with
    `conv_dim`, also ResnetBlock2D/Downsample2D/Upsample2D (their 3x3 convs at conv_dim)."""
    return layers(unet, ("attentions", "resnets", "downsamplers", "upsamplers") if conv else ("attentions",))


def kohya_te_layers(encoder) -> dict:
    """networks/lora.py TEXT_ENCODER_TARGET_REPLACE_MODULE: CLIPAttention and CLIPMLP Linears."""
    return layers(encoder, ("self_attn", "mlp"), (torch.nn.Linear,))


def sgm_name(path: str, layers_per_block: int = 2) -> str:
    """diffusers UNet path -> the SGM path of kohya's sdxl_original_unet.py (sdxl_model_util.py's map)."""
    p = path.split(".")
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    per = layers_per_block + 1
    if p[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
        rest = [resnet[p[3]]] if p[1] == "resnets" else p[3:]
        return ".".join(["middle_block", str(index), *rest])
    block, kind = int(p[1]), p[2]
    if p[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{per * (block + 1)}.0.op"
        head = f"input_blocks.{per * block + int(p[3]) + 1}"
    else:
        if kind == "upsamplers":
            return f"output_blocks.{per * block + 2}.2.conv"  # SDXL's upsampling blocks all have attentions
        head = f"output_blocks.{per * block + int(p[3])}"
    if kind == "resnets":
        return f"{head}.0.{resnet[p[4]]}"
    return ".".join([head, "1", *p[4:]])


# -- tensors and references --------------------------------------------------------------------------

def random_pair(module: torch.nn.Module, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's lora_down/lora_up shapes: Linear (r, in) / (out, r); Conv2d (r, in, kh, kw) / (out, r, 1, 1)."""
    if isinstance(module, torch.nn.Conv2d):
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen) / fan_in**0.5
        up = torch.randn(module.out_channels, rank, 1, 1, generator=gen) / rank**0.5
    else:
        down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
        up = torch.randn(module.out_features, rank, generator=gen) / rank**0.5
    return down, up


def delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha / rank * up @ down in float64, shaped like the layer's weight."""
    rank = down.shape[0]
    product = up.double().flatten(1) @ down.double().flatten(1)
    return (product * (alpha / rank)).reshape(up.shape[0], *down.shape[1:])


def written_deltas(path: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Reference deltas from a kohya-layout file as written (its dtype's rounding included), for
    `names`: kohya module name -> diffusers "component.path". kohya's rule: alpha 0/absent = rank."""
    tensors = load_file(str(path))
    deltas = {}
    for kohya, target in names.items():
        down, up = tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"]
        alpha = tensors.get(f"{kohya}.alpha")
        alpha = float(alpha.float()) if alpha is not None else 0.0
        deltas[target] = delta(down, up, alpha or down.shape[0])
    return deltas


# -- kohya sd-scripts --------------------------------------------------------------------------------

def write_kohya(pipe, out: Path, *, seed: int, dtype=torch.float16, unet: bool = True, text_encoders: bool = True,
                conv: bool = False, dims=None, unet_names: str = "sgm", metadata: dict | None = None,
                extra: dict | None = None) -> TrainerFile:
    """As sd-scripts networks/lora.py LoRANetwork.save_weights writes a network: per module
    ``{lora_name}.lora_down.weight``, ``.lora_up.weight`` and a 0-dim ``.alpha`` buffer, all cast to
    the save dtype, lora_name = prefix + module path with "_" (SGM paths for SDXL's UNet,
    sdxl_original_unet.py); ``ss_*`` training metadata. `dims(target, module) -> (rank, alpha)`;
    default network_dim 8, network_alpha 4 (conv_dim 4, conv_alpha 1 for 3x3 convs)."""
    dims = dims or (lambda target, module: (4, 1.0) if _is_3x3(module) else (8, 4.0))
    gen = torch.Generator().manual_seed(seed)
    targets = {}
    if unet:
        for path, module in kohya_unet_layers(pipe.unet, conv).items():
            name = sgm_name(path) if unet_names == "sgm" else path
            targets["lora_unet_" + name.replace(".", "_")] = (f"unet.{path}", module)
    if text_encoders:
        for component, prefix in KOHYA_TE_PREFIX.items():
            for path, module in kohya_te_layers(getattr(pipe, component)).items():
                kohya_path = path if path.startswith("text_model.") else f"text_model.{path}"  # transformers 4's CLIP
                targets[prefix + kohya_path.replace(".", "_")] = (f"{component}.{path}", module)
    tensors = {}
    for name, (target, module) in targets.items():
        rank, alpha = dims(target, module)
        down, up = random_pair(module, rank, gen)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha)).to(dtype)
    tensors.update(extra or {})
    header = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
              "ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_output_name": out.stem,
              "sshs_model_hash": "0" * 64, **(metadata or {})}
    save_file(tensors, str(out), metadata=header)
    return TrainerFile(out, written_deltas(out, {n: t for n, (t, _) in targets.items()}))


def _is_3x3(module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)


def block_dims(target: str, module) -> tuple[int, float]:
    """networks/lora.py `block_dims`/`block_alphas` (get_block_index): rank and alpha set per UNet
    block (input_blocks N, middle_block, output_blocks N), text encoders at network_dim/alpha."""
    if not target.startswith("unet."):
        return 8, 4.0
    name = sgm_name(target.removeprefix("unet."))
    index = {"input_blocks": 0, "middle_block": 9, "output_blocks": 10}[name.split(".")[0]] + int(name.split(".")[1])
    rank = 2 + 2 * (index % 3)
    return rank, float(1 + index % 4)


def resized_dims(target: str, module) -> tuple[int, float]:
    """networks/resize_lora.py with --dynamic_method sv_fro: each module keeps the rank its singular
    values need, and alpha = new_rank * network_alpha / network_dim keeps its scale."""
    rank = 1 + sum(map(ord, target)) % 6
    return rank, rank * 4.0 / 8


# -- ai-toolkit -----------------------------------------------------------------------------------------

def ai_toolkit_layers(unet) -> dict:
    """toolkit/lora_special.py LoRASpecialNetwork on SDXL's diffusers UNet: every Linear and 1x1 conv."""
    found = {}
    for name, module in unet.named_modules():
        if ".lora_" not in name and (isinstance(module, torch.nn.Linear)
                                     or isinstance(module, torch.nn.Conv2d) and not _is_3x3(module)):
            found[name.removesuffix(".base_layer")] = module
    return dict(sorted(found.items()))


def write_ai_toolkit(pipe, out: Path, *, seed: int) -> TrainerFile:
    """As ai-toolkit saves an SDXL LoRA (toolkit/lora_special.py LoRASpecialNetwork, a kohya
    LoRANetwork over diffusers modules; save_weights): kohya keys with diffusers module names
    (``lora_unet_down_blocks_1_attentions_0_..._to_q``, ``lora_unet_add_embedding_linear_1``),
    fp16, 0-dim alphas, its own ``software``/``name`` metadata."""
    gen = torch.Generator().manual_seed(seed)
    tensors, names = {}, {}
    for index, (path, module) in enumerate(ai_toolkit_layers(pipe.unet).items()):
        name = "lora_unet_" + path.replace(".", "_")
        rank, alpha = 4, float(1 + index % 4)
        down, up = random_pair(module, rank, gen)
        tensors.update({f"{name}.lora_down.weight": down.half(), f"{name}.lora_up.weight": up.half(),
                        f"{name}.alpha": torch.tensor(alpha).half()})
        names[name] = f"unet.{path}"
    save_file(tensors, str(out), metadata={"format": "pt", "name": out.stem, "version": "1.0",
                                           "software": json.dumps({"name": "ai-toolkit", "version": "0.1.0"})})
    return TrainerFile(out, written_deltas(out, names))


# -- diffusers' training scripts (their own save code) ---------------------------------------------------

def dreambooth_pipeline(model_dir: Path, *, seed: int, rank: int = 8, text_encoders: bool = True, use_dora: bool = False):
    """A pipeline with the adapters examples/dreambooth/train_dreambooth_lora_sdxl.py adds
    (LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=...)), lora_B
    drawn at random as training would leave it."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    targets = {"unet": ["to_k", "to_q", "to_v", "to_out.0"]}
    if text_encoders:
        targets.update(dict.fromkeys(("text_encoder", "text_encoder_2"), ["q_proj", "k_proj", "v_proj", "out_proj"]))
    gen = torch.Generator().manual_seed(seed)
    for component, modules in targets.items():
        config = LoraConfig(r=rank, lora_alpha=rank, use_dora=use_dora, init_lora_weights="gaussian",
                            target_modules=modules)
        model = getattr(pipe, component)
        if component == "unet":
            model.add_adapter(config)
        else:  # the script's text_encoder.add_adapter, which this transformers wants a newer PEFT for
            inject_adapter_in_model(config, model)
            model.peft_config = {"default": config}
        with torch.no_grad():
            for name, parameter in getattr(pipe, component).named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=gen) / rank**0.5)
    return pipe, list(targets)


def peft_deltas(pipe, components: list[str]) -> dict[str, torch.Tensor]:
    """scaling * B @ A of every LoRA layer, read from the PEFT modules before saving."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for component in components:
        for path, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer):
                down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
                deltas[f"{component}.{path}"] = delta(down.detach(), up.detach(), module.scaling["default"] * down.shape[0])
    return deltas


def write_dreambooth(model_dir: Path, out_dir: Path, *, seed: int, rank: int = 8, text_encoders: bool = True,
                     use_dora: bool = False) -> TrainerFile:
    """train_dreambooth_lora_sdxl.py's save_model_hook / final save:
    StableDiffusionXLPipeline.save_lora_weights(unet_lora_layers=convert_state_dict_to_diffusers(
    get_peft_model_state_dict(unet)), ..., **_collate_lora_metadata(...)): ``.lora.down`` UNet keys,
    ``lora_linear_layer`` text-encoder keys, the full LoraConfig per component in the header."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe, components = dreambooth_pipeline(model_dir, seed=seed, rank=rank, text_encoders=text_encoders,
                                           use_dora=use_dora)
    layers_to_save = {f"{c}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, c)))
                      for c in components}
    metadata = _collate_lora_metadata({c: getattr(pipe, c) for c in components})
    StableDiffusionXLPipeline.save_lora_weights(out_dir, **layers_to_save, **metadata)
    return TrainerFile(out_dir / "pytorch_lora_weights.safetensors", peft_deltas(pipe, components))


def write_dreambooth_kohya(dreambooth: TrainerFile) -> TrainerFile:
    """train_dreambooth_lora_sdxl.py --output_kohya_format: convert_all_state_dict_to_peft, then
    convert_state_dict_to_kohya (an int64 0-dim alpha = rank per module), then save_file."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    out = dreambooth.path.with_name("pytorch_lora_weights_kohya.safetensors")
    save_file(convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(str(dreambooth.path)))), str(out))
    return TrainerFile(out, dreambooth.deltas)


def write_advanced_output_folder(model_dir: Path, folder: Path, *, seed: int, tokens: int = 2) -> tuple[TrainerFile, dict]:
    """examples/advanced_diffusion_training/train_dreambooth_lora_sdxl_advanced.py's output folder:
    pytorch_lora_weights.safetensors (save_lora_weights, UNet only with --train_text_encoder_ti),
    ``{folder name}_emb.safetensors`` from TokenEmbeddingsHandler.save_embeddings (``clip_l``,
    ``clip_g``: the new tokens' rows), a model card and a checkpoint folder."""
    folder.mkdir(parents=True)
    lora = write_dreambooth(model_dir, folder, seed=seed, rank=4, text_encoders=False)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = {"clip_l": torch.randn(tokens, 32, generator=gen) * 0.02, "clip_g": torch.randn(tokens, 32, generator=gen) * 0.02}
    save_file(rows, str(folder / f"{folder.name}_emb.safetensors"))
    (folder / "README.md").write_text("---\ntags: [lora]\n---\nTrigger: TOK -> <s0><s1>\n")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "pytorch_lora_weights.safetensors").write_bytes(lora.path.read_bytes())
    return lora, rows
