"""A LoRA file's values and adapter metadata are checked when it is read, before PEFT sees them:
every hostile file is lora_invalid (a 4xx), through the real read/prepare path and over HTTP, and
leaves the UNet and text encoders with exactly the modules and weights they had."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inference.errors import ErrorCode, ServiceError
from inference.lora_store import LoraStore
from inference.pipeline import Engine

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def read(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lora_adapter_metadata"])


def write(path, tensors, adapter_metadata) -> None:
    text = adapter_metadata if isinstance(adapter_metadata, str) else json.dumps(adapter_metadata)
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": text})


def first(tensors, marker="lora_A") -> str:
    return next(k for k in sorted(tensors) if marker in k)


def with_metadata(**changes):
    return lambda tensors, meta: (tensors, {**meta, **{f"unet.{k}": v for k, v in changes.items()}})


def with_tensor(change):
    def mutate(tensors, meta):
        tensors = dict(tensors)
        change(tensors)
        return tensors, meta
    return mutate


def _set(key_marker, value):
    return with_tensor(lambda t: t.__setitem__(first(t, key_marker), value(t[first(t, key_marker)])))


def _nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[0] = float("-inf")
    return t


HOSTILE = {
    # metadata keys refused, each named in the message
    "modules_to_save": (with_metadata(modules_to_save=["mid_block"]), "modules_to_save"),
    "layer_replication": (with_metadata(layer_replication=[[0, 1]]), "layer_replication"),
    "init_pissa": (with_metadata(init_lora_weights="pissa"), "init_lora_weights"),
    "init_olora": (with_metadata(init_lora_weights="olora"), "init_lora_weights"),
    "init_loftq": (with_metadata(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), "init_lora_weights"),
    "init_eva": (with_metadata(init_lora_weights="eva"), "init_lora_weights"),
    "init_corda": (with_metadata(init_lora_weights="corda"), "init_lora_weights"),
    "use_dora_without_magnitudes": (with_metadata(use_dora=True), "use_dora"),
    "lora_bias_without_biases": (with_metadata(lora_bias=True), "lora_bias"),
    "trainable_tokens": (with_metadata(trainable_token_indices=[1, 2]), "trainable_token_indices"),
    "bias_all": (with_metadata(bias="all"), "unet.bias"),
    "unknown_key": (with_metadata(surprise=1), "surprise"),
    "rank_zero_in_metadata": (with_metadata(r=0), "unet.r"),
    "rank_as_string": (with_metadata(r="4"), "unet.r"),
    "no_component_prefix": (lambda t, m: (t, {**m, "r": 4}), "'r'"),
    "missing_target_modules": (lambda t, m: (t, {k: v for k, v in m.items() if k != "unet.target_modules"}),
                               "unet.target_modules"),
    "rank_not_the_tensors": (with_metadata(r=8), "rank 8"),
    "metadata_a_list": (lambda t, m: (t, [1, 2]), "list"),
    "metadata_a_string": (lambda t, m: (t, json.dumps("unet")), "str"),
    "metadata_not_json": (lambda t, m: (t, "{not json"), "not JSON"),
    # values
    "nan_in_down": (_set("lora_A", _nan), "NaN"),
    "inf_in_up": (_set("lora_B", _inf), "NaN or infinite"),
    "int8_weight": (_set("lora_A", lambda t: t.to(torch.int8)), "int8"),
    "bool_weight": (_set("lora_B", lambda t: t > 0), "bool"),
    "fp8_weight": (_set("lora_A", lambda t: t.to(torch.float8_e4m3fn)), "float8"),
    "zero_dim_weight": (_set("lora_A", lambda t: t.flatten()[0].clone()), "single number"),
    "empty_rank": (_set("lora_A", lambda t: t[:0].clone()), "empty"),
}


def kohya_module(rank=4, alpha=2.0):
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    return name, {f"{name}.lora_down.weight": torch.randn(rank, 32), f"{name}.lora_up.weight": torch.randn(32, rank),
                  f"{name}.alpha": torch.tensor(alpha)}


def write_kohya_case(path, case) -> None:
    name, tensors = kohya_module()
    if case == "kohya_rank_zero":
        tensors = kohya_module(rank=0)[1]
    elif case == "kohya_nan_alpha":
        tensors[f"{name}.alpha"] = torch.tensor(float("nan"))
    elif case == "kohya_zero_dim_down":
        tensors[f"{name}.lora_down.weight"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})


KOHYA_CASES = {"kohya_rank_zero": "empty", "kohya_nan_alpha": "NaN", "kohya_zero_dim_down": "single number"}


@pytest.fixture(scope="module")
def hostile_files(make_lora, tmp_path_factory) -> dict:
    """case -> (path, what the message must name)."""
    root = tmp_path_factory.mktemp("hostile")
    tensors, meta = read(make_lora(seed=1, text_encoders=False))
    files = {}
    for case, (mutate, named) in HOSTILE.items():
        write(root / f"{case}.safetensors", *mutate(tensors, meta))
        files[case] = (root / f"{case}.safetensors", named)
    for case, named in KOHYA_CASES.items():
        write_kohya_case(root / f"{case}.safetensors", case)
        files[case] = (root / f"{case}.safetensors", named)
    return files


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(str(tiny_model), device="cpu", max_resident_adapters=2, fuse_adapters=True)


def model_digest(engine) -> str:
    """The module tree (names and types) and every parameter and buffer of the UNet and text encoders."""
    digest = hashlib.sha256()
    for component in COMPONENTS:
        model = getattr(engine.txt2img, component)
        for name, module in model.named_modules():
            digest.update(f"{component}.{name}:{type(module).__name__};".encode())
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            digest.update(name.encode())
            digest.update(tensor.detach().float().numpy().tobytes())
    return digest.hexdigest()


CASES = sorted(HOSTILE) + sorted(KOHYA_CASES)


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_file_is_lora_invalid_at_prepare_and_changes_nothing(engine, hostile_files, tmp_path, make_lora, case):
    path, named = hostile_files[case]
    store = LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 28, allow_local_paths=True)
    good = store.fetch("good", str(make_lora(seed=2)))
    engine.adapters.activate([(good, 0.7)])  # a resident, fused LoRA beside the refused one
    before = model_digest(engine)
    lora = store.fetch(case, str(path))
    with pytest.raises(ServiceError) as caught:
        engine.prepare(lora)
    assert caught.value.code == ErrorCode.LORA_INVALID, caught.value.message
    assert named in caught.value.message, caught.value.message
    assert caught.value.lora is lora, "the file's fault names the LoRA, so the service drops it from the cache"
    with pytest.raises(ServiceError):
        engine.adapters.activate([(good, 0.7), (lora, 1.0)])  # prepared under the lock: the same refusal
    assert model_digest(engine) == before


def test_real_peft_metadata_is_accepted_and_reduced_to_what_a_lora_needs(engine, make_lora, tmp_path):
    """LoraConfig.to_dict() as diffusers' training scripts save it: every key, neutral values."""
    from peft import LoraConfig

    from inference.lora_compat import read_lora

    tensors, meta = read(make_lora(seed=1, text_encoders=False))
    full = LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q"]).to_dict()
    full = {k: (sorted(v) if isinstance(v, set) else v) for k, v in full.items()}
    full["peft_type"] = "LORA"
    write(tmp_path / "full.safetensors", tensors, {**{f"unet.{k}": v for k, v in full.items()}, **meta})
    weights = read_lora(engine.txt2img, tmp_path / "full.safetensors")
    assert set(weights.metadata) == {f"unet.{k}" for k in ("r", "lora_alpha", "target_modules", "rank_pattern",
                                                           "alpha_pattern", "use_rslora", "lora_bias")}


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory, hostile_files, make_lora):
    from api.app import create_app
    from inference.settings import Settings
    from tests.fakes import LiveServer, wait_ready
    from tests.servers import FileServer

    root = tmp_path_factory.mktemp("served")
    for case in ("modules_to_save", "nan_in_down", "metadata_a_list", "kohya_rank_zero", "fp8_weight"):
        (root / f"{case}.safetensors").write_bytes(hostile_files[case][0].read_bytes())
    (root / "good.safetensors").write_bytes(make_lora(seed=2).read_bytes())
    settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path_factory.mktemp("cache"),
                        allow_private_urls=True, max_resident_adapters=2, fuse_adapters="on")
    with FileServer(root) as files, LiveServer(create_app(settings)) as base:
        wait_ready(base)
        yield base, files, settings


def generate(base, files, name):
    body = {"prompt": "a portrait", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 3,
            "loras": [{"id": name, "url": files.url(f"{name}.safetensors")}]}
    return httpx.post(f"{base}/v1/generate", json=body, timeout=120)


@pytest.mark.parametrize("case", ["modules_to_save", "nan_in_down", "metadata_a_list", "kohya_rank_zero", "fp8_weight"])
def test_over_http_a_hostile_file_is_422_lora_invalid_and_the_next_image_is_unchanged(service, case):
    base, files, settings = service
    first_good = generate(base, files, "good")
    assert first_good.status_code == 200, first_good.text
    refused = generate(base, files, case)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "lora_invalid"
    again = generate(base, files, "good")
    assert again.json()["images"][0]["sha256"] == first_good.json()["images"][0]["sha256"]
    sha = hashlib.sha256(files.root.joinpath(f"{case}.safetensors").read_bytes()).hexdigest()
    cached = [p.name for p in settings.lora_cache_dir.rglob("*")]
    assert not any(sha in name for name in cached), "a refused file leaves the disk cache"
