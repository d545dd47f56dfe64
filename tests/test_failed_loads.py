"""A refused LoRA leaves the pipeline as it found it, and fusing gives back everything it changed.

Issue 32: a file whose metadata PEFT acts on (`modules_to_save`, DoRA or bias claims without the
tensors, a rank that is not the tensors') or that fails part-way through injection must leave the
UNet and both text encoders with exactly the modules (names and types) and weights (every parameter
and buffer, hashed) they held before, and the next good image bit-identical; with fusing on and off.
A bias LoRA merged and unmerged must leave the no-LoRA image bit-identical. A refusal raised during
injection names the LoRA, so the service drops its file from the disk cache.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from inference import direct_injection
from inference.errors import ErrorCode, ServiceError
from inference.lora_store import LoraStore
from inference.pipeline import Engine
from inference.synthetic import LoraLayer, lora_state_dict, random_lora
from tests.test_generation import max_diff, render

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
REFUSED = (ErrorCode.LORA_INVALID, ErrorCode.LORA_INCOMPATIBLE)


def snapshot(engine) -> tuple[dict, str]:
    """(module tree: names and types per component, sha256 over every parameter and buffer)."""
    tree, digest = {}, hashlib.sha256()
    for component in COMPONENTS:
        model = getattr(engine.txt2img, component)
        tree[component] = [(name, type(module).__qualname__) for name, module in model.named_modules()]
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            digest.update(f"{component}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(b"meta" if tensor.is_meta else tensor.detach().cpu().contiguous().numpy().tobytes())
    return tree, digest.hexdigest()


def feed_forward(pipe) -> str:
    """A UNet module outside the usual targets: not wrapped at start, so PEFT wraps it on first use."""
    return next(name for name, m in pipe.unet.named_modules() if name.endswith("ff.net.2")
                and isinstance(m, torch.nn.Linear))


def write(pipe, path: Path, seed: int = 5, text_encoders: bool = False, metadata: dict | None = None,
          with_feed_forward: bool = False, biases: bool = False, swap_one: bool = False) -> Path:
    """A synthetic diffusers-format LoRA, with its `lora_adapter_metadata` changed as given."""
    layers = random_lora(pipe, rank=4, seed=seed, text_encoders=text_encoders)
    if with_feed_forward:
        name = feed_forward(pipe)
        linear = pipe.unet.get_submodule(name)
        gen = torch.Generator().manual_seed(seed)
        layers[f"unet.{name}"] = LoraLayer(down=torch.randn(4, linear.in_features, generator=gen) / 8,
                                           up=torch.randn(linear.out_features, 4, generator=gen) / 2, alpha=2.0)
    tensors, header = lora_state_dict(layers, "diffusers")
    if biases:  # one per lora_B: what PEFT's `lora_bias=True` trains
        gen = torch.Generator().manual_seed(seed + 100)
        for key in [k for k in tensors if k.endswith("lora_B.weight")]:
            tensors[key.removesuffix("weight") + "bias"] = torch.randn(tensors[key].shape[0], generator=gen) / 4
    if swap_one:  # one module's down and up weights swapped: shapes that do not fit
        down = next(k for k in tensors if k.endswith("lora_A.weight"))
        up = down.replace("lora_A", "lora_B")
        tensors[down], tensors[up] = tensors[up].contiguous(), tensors[down].contiguous()
    config = json.loads(header["lora_adapter_metadata"])
    config.update(metadata or {})
    header["lora_adapter_metadata"] = json.dumps(config)
    save_file(tensors, str(path), metadata=header)
    return path


@contextmanager
def failing_at_the_fifth(owner, attribute: str):
    """`owner.attribute` raising at its fifth call, after four real ones."""
    real, calls = getattr(owner, attribute), []

    def fifth_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated failure at the fifth layer")
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(owner, attribute, fifth_fails)
        yield
    assert len(calls) == 5, "the failure was reached"


def peft_update_layer_fails_at_the_fifth():
    from peft.tuners.lora.layer import LoraLayer as PeftLoraLayer

    return failing_at_the_fifth(PeftLoraLayer, "update_layer")


@dataclass
class Hostile:
    file: dict = field(default_factory=dict)  # write()'s arguments
    during: Callable = nullcontext


HOSTILE = {
    "modules_to_save on the UNet": Hostile(dict(text_encoders=True, metadata={"unet.modules_to_save": ["mid_block"]})),
    "modules_to_save on a text encoder": Hostile(dict(text_encoders=True,
                                                      metadata={"text_encoder.modules_to_save": ["final_layer_norm"]})),
    "use_dora without magnitudes": Hostile(dict(metadata={"unet.use_dora": True})),
    "lora_bias without biases": Hostile(dict(metadata={"unet.lora_bias": True})),
    "shapes that do not fit": Hostile(dict(swap_one=True)),
    "a rank that is not the tensors', reaching an unwrapped module": Hostile(dict(with_feed_forward=True,
                                                                                   metadata={"unet.r": 8})),
    "a text-encoder LoRA failing half-way": Hostile(dict(text_encoders=True, metadata={"text_encoder_2.r": 8})),
    "PiSSA init": Hostile(dict(metadata={"unet.init_lora_weights": "pissa"})),
    "layer replication": Hostile(dict(text_encoders=True, metadata={"unet.layer_replication": [[0, 1]]})),
    "a failure at the fifth layer (added to wrapped layers)": Hostile(
        dict(seed=6), lambda: failing_at_the_fifth(direct_injection, "add_adapter_to_layer")),
    "a failure at the fifth layer (PEFT's injection)": Hostile(
        dict(seed=7, text_encoders=True, with_feed_forward=True), peft_update_layer_fails_at_the_fifth),
}


@pytest.fixture(scope="module", params=["off", "on"])
def engine(request, tiny_model):
    return Engine(str(tiny_model), device="cpu", max_resident_adapters=2, fuse_adapters=request.param)


@pytest.fixture
def store(tmp_path):
    return LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 28, allow_local_paths=True)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_failed_load_leaves_the_modules_and_weights_as_they_were(engine, store, make_lora, tmp_path, case):
    good = make_lora(seed=1)
    engine.adapters.clear()
    image = render(engine, store, [(good, 1.0)])
    a = store.fetch(good.stem, str(good))
    before = snapshot(engine)
    hostile = HOSTILE[case]
    path = write(engine.txt2img, tmp_path / "hostile.safetensors", **hostile.file)
    lora = store.fetch(path.stem, str(path))
    with hostile.during(), pytest.raises(ServiceError) as err:
        engine.adapters.activate([(lora, 1.0)])
    assert err.value.code in REFUSED and err.value.http_status == 422, err.value
    assert err.value.lora is lora, "the refusal names the LoRA: the service drops its file"
    assert [r.lora.sha256 for r in engine.adapters.resident()] == [a.sha256]
    engine.adapters.activate([(a, 1.0)])  # as before the failure (fused again, with fusing on)
    after = snapshot(engine)
    for component in COMPONENTS:
        assert after[0][component] == before[0][component], f"{component}'s modules changed"
    assert after[1] == before[1], "a weight or buffer changed"
    assert np.array_equal(render(engine, store, [(good, 1.0)]), image), "the next good image changed"


def test_metadata_claims_are_refused_before_peft_and_the_rest_reach_it(tiny_model, store, tmp_path):
    """The metadata claims PEFT would act on are refused by `lora_validation` before any injection
    (naming the key); the text-encoder file that fails half-way does go through PEFT, so the
    clean-up above is proved on a real PEFT failure and not on an early refusal."""
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=2)
    calls = []
    real = engine.txt2img.load_lora_into_unet
    engine.txt2img.load_lora_into_unet = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    refused_first = {"modules_to_save on the UNet": "unet.modules_to_save",
                     "modules_to_save on a text encoder": "text_encoder.modules_to_save",
                     "use_dora without magnitudes": "unet.use_dora", "lora_bias without biases": "unet.lora_bias",
                     "PiSSA init": "unet.init_lora_weights", "layer replication": "unet.layer_replication",
                     "a rank that is not the tensors', reaching an unwrapped module": "rank 8"}
    for number, case in enumerate([*refused_first, "a text-encoder LoRA failing half-way"]):
        path = write(engine.txt2img, tmp_path / f"h{number}.safetensors", **HOSTILE[case].file)
        with pytest.raises(ServiceError) as err:
            engine.adapters.activate([(store.fetch(f"h-{number}", str(path)), 1.0)])
        if case in refused_first:
            assert calls == [] and refused_first[case] in str(err.value), (case, str(err.value))
        else:
            assert len(calls) == 1, case
        calls.clear()


def kinds_of_lora(make_lora, pipe, directory: Path) -> dict[str, Path]:
    return {
        "UNet, diffusers": make_lora(seed=1),
        "UNet and text encoders": make_lora(seed=2, text_encoders=True),
        "kohya": make_lora(seed=3, fmt="kohya"),
        "rank 8": make_lora(seed=4, rank=8),
        "a module not wrapped at start": write(pipe, directory / "ff.safetensors", seed=8, with_feed_forward=True),
        "lora_B biases": write(pipe, directory / "bias.safetensors", seed=9, biases=True,
                               metadata={"unet.lora_bias": True}),
    }


def test_the_no_lora_image_is_bit_identical_after_each_kind_of_lora_fused_and_unfused(tiny_model, make_lora,
                                                                                     store, tmp_path):
    """Fusing merges each LoRA into the weights and copies them back, the bias included: PEFT's merge
    adds a bias LoRA's `lora_B` bias to the base layer's, which was not restored before."""
    engines = {fuse: Engine(str(tiny_model), device="cpu", max_resident_adapters=2, fuse_adapters=fuse)
               for fuse in ("off", "on")}
    kinds = kinds_of_lora(make_lora, engines["off"].txt2img, tmp_path)
    images = {}
    for fuse, engine in engines.items():
        base = render(engine, store)
        for kind, path in kinds.items():
            images[fuse, kind] = render(engine, store, [(path, 1.0)])
            assert max_diff(images[fuse, kind], base) > 0, f"{kind} changes the image"
            if fuse == "on" and kind == "lora_B biases":
                assert engine.adapters.fusing.saved_bias, "the merge changed biases: they were kept to restore"
            assert np.array_equal(render(engine, store), base), f"fusing {fuse}: {kind} left the base model changed"
        assert np.array_equal(render(engine, store, [(kinds["UNet, diffusers"], 1.0)]),
                              images[fuse, "UNet, diffusers"]), "A -> ... -> A"
    for kind in kinds:  # fused and unfused compute the same LoRA (the bias on layers without a bias unmerged)
        assert max_diff(images["on", kind], images["off", kind]) <= 2, kind


def test_a_refusal_during_injection_drops_the_file_from_the_disk_cache(engine, tmp_path):
    """Through the service: the 422 names the LoRA, and the repair removes its cached file."""
    from sdxl_lora_client.contract import GenerateRequest, LoraSpec

    from inference.service import InferenceService
    from inference.settings import Settings
    from tests.servers import FileServer

    served = tmp_path / "served"
    served.mkdir()
    write(engine.txt2img, served / "half-way.safetensors", **HOSTILE["a text-encoder LoRA failing half-way"].file)
    settings = Settings(model="unused", device="cpu", lora_cache_dir=tmp_path / "cache", allow_private_urls=True,
                        max_resident_adapters=engine.adapters.max_resident)
    service = InferenceService(settings, engine=engine)
    engine.adapters.clear()
    before = snapshot(engine)
    with FileServer(served) as server:
        request = GenerateRequest(prompt="a character portrait", num_inference_steps=2, width=64, height=64, seed=1,
                                  loras=[LoraSpec(id="half-way", url=server.url("half-way.safetensors"))])
        with pytest.raises(ServiceError) as err:
            service.generate(request)
        assert err.value.http_status == 422 and err.value.lora is not None
        assert server.hits["/half-way.safetensors"] == 1
        assert service.adapters()["disk"] == [], "the refused file left the cache"
        with pytest.raises(ServiceError):
            service.generate(request)
        assert server.hits["/half-way.safetensors"] == 2, "fetched again: nothing was kept"
    assert snapshot(engine) == before
