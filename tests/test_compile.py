"""COMPILE=on: the UNet compiled once at start, never again, whatever the requests' LoRAs.

The compiled engine runs dynamo with the `eager` backend (its guards and graph capture, no code
generation: cheap on the CPU); the compile cache is tested with inductor on a small module.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from inference.errors import RequestCancelled
from inference.lora_store import LoraStore
from inference.pipeline import Engine, GenerationJob

SIZE = 64


@pytest.fixture(scope="module")
def compiled(tiny_model):
    return Engine(str(tiny_model), device="cpu", max_resident_adapters=4, compile="on",
                  compile_warmup=f"{SIZE}x{SIZE}", compile_backend="eager")


@pytest.fixture(scope="module")
def eager(tiny_model):
    return Engine(str(tiny_model), device="cpu", max_resident_adapters=4)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, make_lora):
    """A..E: UNet LoRAs of ranks 4, 8, 2, 16, 4; T: one with text-encoder layers too."""
    store = LoraStore(tmp_path_factory.mktemp("compile-store"), max_cache_bytes=1 << 40, max_lora_bytes=1 << 33,
                      allow_local_paths=True)
    specs = {"A": (11, 4, False), "B": (12, 8, False), "C": (13, 2, False), "D": (14, 16, False), "E": (15, 4, False),
             "T": (16, 4, True)}
    return {name: store.fetch(f"id-{name}", str(make_lora(seed=seed, rank=rank, text_encoders=te)))
            for name, (seed, rank, te) in specs.items()}


def job(loras, *names_scales, image=None, num_images=1, guidance_scale=7.0) -> GenerationJob:
    chosen = [(loras[name], scale) for name, scale in names_scales]
    return GenerationJob(prompt="a photo of a person", width=SIZE, height=SIZE, num_inference_steps=2, seed=3,
                         loras=chosen, image=image, num_images=num_images, guidance_scale=guidance_scale)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


REFERENCE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))

# (label, LoRAs with scales, extra job arguments): the mix, 34 requests.
SEQUENCE = [
    ("no LoRA", [], {}),
    ("A new (rank 4)", [("A", 1.0)], {}),
    ("A resident", [("A", 1.0)], {}),
    ("B new (rank 8)", [("B", 1.0)], {}),
    ("A resident switch", [("A", 1.0)], {}),
    ("A at 0.5", [("A", 0.5)], {}),
    ("A at -1.5", [("A", -1.5)], {}),
    ("A at 3.7", [("A", 3.7)], {}),
    ("no LoRA again", [], {}),
    ("A + B", [("A", 1.0), ("B", 0.8)], {}),
    ("C new (rank 2) + A + B", [("C", 0.6), ("A", 1.0), ("B", 0.8)], {}),
    ("D new (rank 16): 4 LoRAs", [("A", 1.0), ("B", 0.5), ("C", 0.7), ("D", 1.2)], {}),
    ("E new into a full cache", [("E", 1.0)], {}),
    ("A evicted? reloaded", [("A", 1.0)], {}),
    ("img2img A", [("A", 1.0)], {"image": REFERENCE}),
    ("img2img no LoRA", [], {"image": REFERENCE}),
    ("img2img B + E", [("B", 0.9), ("E", 0.4)], {"image": REFERENCE}),
    ("A, two images", [("A", 1.0)], {"num_images": 2}),
    ("T new (text encoders too)", [("T", 1.0)], {}),
    ("T + A", [("T", 1.0), ("A", 1.0)], {}),
    ("A after T", [("A", 1.0)], {}),
    ("B", [("B", 1.0)], {}),
    ("A after B", [("A", 1.0)], {}),
    ("A without guidance (batch 1)", [("A", 1.0)], {"guidance_scale": 1.0}),
    ("no LoRA without guidance", [], {"guidance_scale": 0.0}),
    ("C, D", [("C", 1.0), ("D", 1.0)], {}),
    ("D, C (other order)", [("D", 1.0), ("C", 1.0)], {}),
    ("E, T, A, B", [("E", 0.3), ("T", 0.5), ("A", 1.0), ("B", 0.2)], {}),
    ("img2img T", [("T", 1.0)], {"image": REFERENCE}),
    ("A at 0", [("A", 0.0)], {}),
    ("three images, C", [("C", 1.0)], {"num_images": 3}),
    ("A last", [("A", 1.0)], {}),
    ("no LoRA last", [], {}),
    ("T last", [("T", 1.0)], {}),
]


def test_no_request_of_the_mix_compiles_again(compiled, eager, loras):
    """34 requests under error_on_recompile: any recompile raises. The images agree with the eager
    (PEFT) engine's within float tolerance, and A's image comes back bit for bit after other LoRAs,
    an eviction and a text-encoder LoRA."""
    assert len(SEQUENCE) >= 30
    images = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for label, chosen, extra in SEQUENCE:
            images[label] = compiled.generate(job(loras, *chosen, **extra)).images
    assert compiled.recompiles == 0
    a = pixels(images["A new (rank 4)"][0])
    for label in ("A resident", "A resident switch", "A evicted? reloaded", "A after T", "A after B", "A last"):
        assert np.array_equal(pixels(images[label][0]), a), label
    assert np.array_equal(pixels(images["A, two images"][0]), a)
    assert np.array_equal(pixels(images["no LoRA last"][0]), pixels(images["no LoRA"][0]))
    assert np.array_equal(pixels(images["A at 0"][0]), pixels(images["no LoRA"][0]))
    assert not np.array_equal(pixels(images["B"][0]), a)
    for label in ("no LoRA", "A new (rank 4)", "A at 3.7", "D new (rank 16): 4 LoRAs", "img2img B + E", "T + A",
                  "A without guidance (batch 1)", "three images, C"):
        _, chosen, extra = next(item for item in SEQUENCE if item[0] == label)
        reference = eager.generate(job(loras, *chosen, **extra)).images
        for got, want in zip(images[label], reference, strict=True):
            assert np.abs(pixels(got) - pixels(want)).max() <= 2, label


def test_the_compiled_unet_holds_no_peft_layer_and_its_weights_keep_their_identity(compiled, loras):
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = compiled.txt2img.unet
    assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())
    before = {name: (id(p), p.data_ptr()) for name, p in unet.named_parameters()}
    compiled.generate(job(loras, ("B", 1.0), ("C", 0.5)))
    compiled.generate(job(loras))
    assert {name: (id(p), p.data_ptr()) for name, p in unet.named_parameters()} == before


def test_a_new_size_compiles_once(compiled, loras):
    before = compiled.recompiles
    bigger = job(loras, ("A", 1.0))
    bigger.width = bigger.height = SIZE + 16
    compiled.generate(bigger)
    once = compiled.recompiles
    assert once > before
    compiled.generate(bigger)
    compiled.generate(job(loras, ("B", 0.5)))
    assert compiled.recompiles == once


class _SetOnThirdLook(threading.Event):
    """A cancel flag the step callback finds set at its third look: before step 1, after step 1,
    after step 2."""

    def __init__(self):
        super().__init__()
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= 3


def test_a_compiled_generation_stops_between_denoising_steps(compiled, loras):
    long = job(loras, ("A", 1.0))
    long.num_inference_steps = 6
    with pytest.raises(RequestCancelled, match="after denoising step 2 of 6"):
        compiled.generate(long, cancel=_SetOnThirdLook())
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert compiled.generate(job(loras, ("A", 1.0))).images


# -- the patcher against PEFT's own layers ---------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 6)
        self.conv = torch.nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x, image):
        return self.proj(x), self.conv(image)


def _unet_lora(rank: int, alpha: float, seed: int):
    from peft import LoraConfig

    from inference.hotswap import UnetLora

    g = torch.Generator().manual_seed(seed)
    state = {"proj.lora_A.weight": torch.randn(rank, 8, generator=g), "proj.lora_B.weight": torch.randn(6, rank, generator=g),
             "conv.lora_A.weight": torch.randn(rank, 4, 3, 3, generator=g),
             "conv.lora_B.weight": torch.randn(5, rank, 1, 1, generator=g)}
    return UnetLora(state, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj", "conv"]), {"proj", "conv"})


def test_patched_weights_compute_what_peft_layers_compute():
    """Two LoRAs (ranks 2 and 5, a conv among the modules) at two scales: the patched plain
    layers give PEFT's unfused layers' outputs."""
    from peft import inject_adapter_in_model

    from inference.peft_internals import set_active_adapters
    from inference.unet_patcher import UnetPatcher

    torch.manual_seed(0)
    block = _Block()
    reference = copy.deepcopy(block)
    loras = {"a": _unet_lora(2, 4.0, 1), "b": _unet_lora(5, 5.0, 2)}
    for name, lora in loras.items():
        inject_adapter_in_model(lora.config, reference, adapter_name=name)
        for path in ("proj", "conv"):
            layer = reference.get_submodule(path)
            layer.lora_A[name].weight.data.copy_(lora.state[f"{path}.lora_A.weight"])
            layer.lora_B[name].weight.data.copy_(lora.state[f"{path}.lora_B.weight"])
    patcher = UnetPatcher(block)
    for name, lora in loras.items():
        patcher.add(name, lora)
    patcher.apply([("a", 0.7), ("b", -1.2)])
    for path in ("proj", "conv"):
        layer = reference.get_submodule(path)
        set_active_adapters(layer, [("a", 0.7), ("b", -1.2)])
    x, image = torch.randn(3, 8), torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        for got, want in zip(block(x, image), reference(x, image)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_to_b_to_a_rebuilds_the_same_bits_and_no_lora_the_original_weights():
    from inference.unet_patcher import UnetPatcher

    block = _Block()
    original = {k: v.clone() for k, v in block.state_dict().items()}
    patcher = UnetPatcher(block)
    patcher.add("a", _unet_lora(3, 3.0, 1))
    patcher.add("b", _unet_lora(4, 8.0, 2))
    patcher.apply([("a", 0.9)])
    with_a = {k: v.clone() for k, v in block.state_dict().items()}
    assert not torch.equal(with_a["proj.weight"], original["proj.weight"])
    patcher.apply([("b", 1.0), ("a", 0.3)])
    patcher.apply([("a", 0.9)])
    assert all(torch.equal(v, with_a[k]) for k, v in block.state_dict().items())
    patcher.drop("a")  # evicted while applied: the weights go back at once
    assert all(torch.equal(v, original[k]) for k, v in block.state_dict().items())


def test_a_lora_that_does_not_fit_is_refused_and_nothing_kept():
    from inference.errors import ServiceError
    from inference.unet_patcher import UnetPatcher

    patcher = UnetPatcher(_Block())
    bad = _unet_lora(2, 2.0, 1)
    bad.state["conv.lora_A.weight"] = torch.zeros(2, 4, 5, 5)
    with pytest.raises(ServiceError, match="does not fit"):
        patcher.add("bad", bad)
    assert patcher.names() == set()


# -- the compile cache, start to ready, metrics -----------------------------------------------------

_CACHE_SCRIPT = """
import json, sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from inference.compiled import CompileCache, CompiledUnet
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
compiled = CompiledUnet(model, "inductor")
cache = CompileCache(Path(sys.argv[1]), {"test": "small"})
with torch.no_grad():
    compiled.warm_up(lambda width, height, guidance: model(torch.randn(2, 16)), [(8, 8)], cache)
saved = [p.name for p in Path(sys.argv[1]).iterdir()]
print(json.dumps({"loaded": compiled.cache_loaded, "saved": saved, "hits": counters["inductor"]["fxgraph_cache_hit"]}))
"""


def test_the_compile_cache_lets_a_fresh_worker_skip_inductor(tmp_path):
    """Two processes with their own (empty) inductor caches: the second finds the first's
    artifacts in the shared folder and takes its graph from them."""
    import os

    def worker(n: int) -> dict:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{n}"))
        done = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(tmp_path / "shared")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold = worker(1)
    assert not cold["loaded"] and cold["hits"] == 0 and len(cold["saved"]) == 1 and cold["saved"][0].startswith("unet-")
    warm = worker(2)
    assert warm["loaded"] and warm["hits"] >= 1 and warm["saved"] == cold["saved"]


def test_cache_key_names_what_decides_the_code():
    from inference.compiled import CompileCache, cache_key, parse_sizes

    key = cache_key("m", torch.device("cpu"), torch.float16, "inductor", parse_sizes("1024x1024, 832x1216"))
    assert key["sizes"] == "1024x1024,832x1216" and key["torch"] == torch.__version__
    other = dict(key, dtype=str(torch.bfloat16))
    assert CompileCache(None, key).path is None
    assert CompileCache(tmp := __import__("pathlib").Path("/x"), key).path != CompileCache(tmp, other).path
    with pytest.raises(ValueError):
        parse_sizes("1024x1000x")


def test_readyz_waits_for_the_warm_up_and_metrics_count_recompiles(tiny_model, tmp_path, monkeypatch):
    from api.app import create_app
    from inference.compiled import CompiledUnet
    from inference.settings import Settings
    from tests.fakes import LiveServer, wait_ready

    during_warm_up = []
    original = CompiledUnet.warm_up

    def observed_warm_up(self, *args, **kwargs):
        during_warm_up.append(httpx.get(f"{base}/readyz").status_code)
        original(self, *args, **kwargs)

    monkeypatch.setattr(CompiledUnet, "warm_up", observed_warm_up)
    settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path / "loras", compile="on",
                        compile_warmup=f"{SIZE}x{SIZE}", compile_backend="eager")
    with LiveServer(create_app(settings)) as base:
        wait_ready(base, timeout=600)
        assert during_warm_up == [503]
        metrics = httpx.get(f"{base}/metrics").text
    assert "sdxl_lora_recompiles_total 0.0" in metrics
