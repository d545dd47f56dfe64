"""Does `torch.compile` survive our LoRA switching? The UNet compiled in place, then the request
sequence a worker sees (a resident switch, a new scale, no LoRA, two LoRAs, a hotswap), counting
the graphs torch compiles at each step and checking A -> B -> A gives A's image again.

Why it is a benchmark and not a setting: dynamo guards on PEFT's Python state (which adapters are
active, each layer's scaling), so a worker switching among characters recompiles for each new
combination; this measures how often, on the tiny model (any backend) or the full one.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from sdxl_lora_tools.bench.common import (BENCH_CACHE, emit_json, lora_files, machine, print_table, quiet_adapter_loads,
                                          synthetic_model)

PROMPT = "a photo of a person"


def run(size: str = "tiny", backend: str = "inductor", steps: int = 3, requests: int | None = None,
        as_json: bool = False) -> dict:
    """`requests`: only the first that many of the sequence."""
    import torch
    from torch._dynamo.utils import counters

    from inference.lora_store import LoraStore
    from inference.pipeline import Engine, GenerationJob

    quiet_adapter_loads()
    model = synthetic_model(size)
    engine = Engine(str(model), device="auto", max_resident_adapters=2)
    store = LoraStore(Path(tempfile.mkdtemp(prefix="compile-", dir=BENCH_CACHE)), max_cache_bytes=1 << 40,
                      max_lora_bytes=1 << 33, allow_local_paths=True)
    a, b, c = (store.fetch(p.stem, str(p)) for p in lora_files(engine.txt2img, BENCH_CACHE / f"loras-{size}", 3, 4))
    resolution = 64 if size == "tiny" else 512
    sequence = [("A", [(a, 1.0)]), ("A again", [(a, 1.0)]), ("B (injected)", [(b, 1.0)]),
                ("A (resident switch)", [(a, 1.0)]), ("B (resident switch)", [(b, 1.0)]),
                ("A at scale 0.5", [(a, 0.5)]), ("A at scale 0.7", [(a, 0.7)]), ("no LoRA", []),
                ("A + B", [(a, 1.0), (b, 0.8)]), ("C (hotswapped into the LRU slot)", [(c, 1.0)]),
                ("A", [(a, 1.0)])]

    torch._dynamo.reset()
    counters.clear()
    engine.txt2img.unet.compile(backend=backend)  # in place: PEFT's layers stay the module's own
    rows = []
    for name, loras in sequence[:requests]:
        graphs_before = counters["stats"]["unique_graphs"]
        started = time.perf_counter()
        image = engine.generate(GenerationJob(prompt=PROMPT, num_inference_steps=steps, width=resolution,
                                              height=resolution, seed=7, loras=loras)).images[0]
        digest = hashlib.sha256(image.tobytes()).hexdigest()[:12]
        rows.append((name, counters["stats"]["unique_graphs"] - graphs_before, (time.perf_counter() - started) * 1e3,
                     digest))
    recompiling_steps = sum(1 for _, graphs, _, _ in rows[1:] if graphs)
    a_images = {digest for name, _, _, digest in rows if name in ("A", "A again", "A (resident switch)")}
    result = {"size": size, "backend": backend, "steps": steps, "machine": machine(),
              "steps_seen": [{"step": n, "new_graphs": g, "ms": ms, "image": d} for n, g, ms, d in rows],
              "steps_that_compiled_again": recompiling_steps, "a_b_a_identical": len(a_images) == 1}
    if as_json:
        emit_json(result)
    else:
        print_table(f"compile: {size} synthetic SDXL, UNet compiled with backend {backend}, {steps} steps at "
                    f"{resolution}px; {result['machine']}", rows, ("request", "new graphs", "ms", "image"))
        print(f"requests after the first that compiled again: {recompiling_steps} of {len(rows) - 1}; "
              f"A -> B -> A identical: {'yes' if result['a_b_a_identical'] else 'NO'}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: dynamo's guards only)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    run(a.size, a.backend, a.steps, as_json=a.json)
