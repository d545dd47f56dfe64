"""COMPILE=on measured: recompiles over a worker's request mix, start to ready with a cold and a warm
compile cache, and compiled against eager generation.

The compiled engine's UNet holds no PEFT layer (its LoRAs are patched into the weights:
`inference.unet_patcher`), so the sequence (new LoRAs of several ranks, resident switches, scales, no
LoRA, 1-4 LoRAs, eviction into a full cache, img2img, two images, a text-encoder LoRA) should compile
nothing after the warm-up. Start to ready is a fresh process each time, with its own empty inductor
cache: the cold one finds no shared compile cache and writes it, the warm one loads it.

`--gpu`: the full model on CUDA, 1024x1024, 30 steps, fp16, with a rank-32 LoRA, and `--variants
channels_last,fused_qkv` to see whether either pays on top of compiling (fused QKV replaces the
to_q/to_k/to_v the LoRAs patch, so it is measured without a LoRA). `--dry`: the same code on the
CPU with the tiny model and the eager backend, for the test suite.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdxl_lora_tools.bench.common import (BENCH_CACHE, emit_json, lora_files, machine, print_table, quiet_adapter_loads,
                                          synthetic_model)

PROMPT = "a portrait photo of a character"
STARTUP = """
import json, sys
from inference.pipeline import Engine
engine = Engine(sys.argv[1], device=sys.argv[2], dtype=sys.argv[3], compile="on", compile_warmup=sys.argv[4],
                compile_backend=sys.argv[5], compile_cache_dir=sys.argv[6])
print("READY " + json.dumps({"warm_up_s": engine.compiled.warm_up_seconds, "cache_loaded": engine.compiled.cache_loaded}))
"""


def start_to_ready(model: Path, device: str, dtype: str, size: str, backend: str, shared: Path) -> dict:
    """A new process, from its start to a compiled, warmed engine; its own empty inductor cache, so
    only the shared compile cache can spare it the compile."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-", dir=BENCH_CACHE))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", STARTUP, str(model), device, dtype, size, backend, str(shared)],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    line = next((line for line in done.stdout.splitlines() if line.startswith("READY ")), None)
    if line is None:
        raise RuntimeError(f"the start-up probe did not get ready: {done.stderr[-1500:]}")
    return {"s": seconds, **json.loads(line.removeprefix("READY "))}


def sequence(files: list, reference) -> list[tuple[str, list, dict]]:
    a, b, c, d, e, t = files
    return [("no LoRA", [], {}), ("A new", [(a, 1.0)], {}), ("A again", [(a, 1.0)], {}), ("B new", [(b, 1.0)], {}),
            ("A resident switch", [(a, 1.0)], {}), ("A at 0.5", [(a, 0.5)], {}), ("A + B", [(a, 1.0), (b, 0.8)], {}),
            ("C, D new: 4 LoRAs", [(a, 1.0), (b, 0.5), (c, 0.7), (d, 1.2)], {}), ("E into a full cache", [(e, 1.0)], {}),
            ("img2img A", [(a, 1.0)], {"image": reference}), ("A, two images", [(a, 1.0)], {"num_images": 2}),
            ("T (text encoders)", [(t, 1.0)], {}), ("A without guidance", [(a, 1.0)], {"guidance_scale": 1.0}),
            ("A", [(a, 1.0)], {})]


def timed_generate(engine, job, repeats: int, sync) -> float:
    samples = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        engine.generate(job)
        sync()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def progress(line: str) -> None:
    """Figures as they come, on stderr: a full-model run takes long enough to be cut short."""
    print(f"[bench compile] {line}", file=sys.stderr, flush=True)


def run(size: str = "tiny", backend: str = "inductor", steps: int = 3, resolution: int | None = None,
        device: str = "cpu", dtype: str = "float32", rank: int = 4, repeats: int = 3, variants: tuple[str, ...] = (),
        startup: bool = True, as_json: bool = False) -> dict:
    """`startup`: also time two fresh processes to ready (cold, then warm compile cache).
    `steps` >= 2: img2img at strength 0.6 runs int(steps * 0.6) denoising steps."""
    import torch
    from PIL import Image

    from inference.lora_store import LoraStore
    from inference.pipeline import Engine, GenerationJob

    quiet_adapter_loads()
    model = synthetic_model(size)
    resolution = resolution or (64 if size == "tiny" else 512)
    warmup = f"{resolution}x{resolution}"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    shared = Path(tempfile.mkdtemp(prefix="compile-cache-", dir=BENCH_CACHE))
    none = {"s": None, "warm_up_s": None, "cache_loaded": None}
    cold = start_to_ready(model, device, dtype, warmup, backend, shared) if startup else none
    progress(f"start to ready, cold compile cache: {cold}")
    warm = start_to_ready(model, device, dtype, warmup, backend, shared) if startup else none
    progress(f"start to ready, warm compile cache: {warm}")

    engine = Engine(str(model), device=device, dtype=dtype, max_resident_adapters=4, compile="on",
                    compile_warmup=warmup, compile_backend=backend, compile_cache_dir=shared)
    store = LoraStore(Path(tempfile.mkdtemp(prefix="compile-", dir=BENCH_CACHE)), max_cache_bytes=1 << 40,
                      max_lora_bytes=1 << 33, allow_local_paths=True)
    paths = lora_files(engine.txt2img, BENCH_CACHE / f"loras-{size}", 5, rank)
    paths += lora_files(engine.txt2img, BENCH_CACHE / f"loras-{size}-te", 1, rank, text_encoders=True)
    files = [store.fetch(p.stem, str(p)) for p in paths]
    reference = Image.new("RGB", (resolution, resolution), (120, 90, 60))
    rows = []
    for label, loras, extra in sequence(files, reference):
        before = engine.recompiles
        job = GenerationJob(prompt=PROMPT, num_inference_steps=steps, width=resolution, height=resolution, seed=7,
                            loras=loras, **extra)
        started = time.perf_counter()
        image = engine.generate(job).images[0]
        rows.append((label, engine.recompiles - before, (time.perf_counter() - started) * 1e3,
                     hashlib.sha256(image.tobytes()).hexdigest()[:12]))
        progress(f"{rows[-1]}")
    a_images = {digest for label, _, _, digest in rows if label in ("A new", "A again", "A resident switch", "A")}

    job = GenerationJob(prompt=PROMPT, num_inference_steps=steps, width=resolution, height=resolution, seed=7,
                        loras=[(files[0], 1.0)])
    compiled_ms = timed_generate(engine, job, repeats, sync)
    progress(f"compiled generate with a LoRA: {compiled_ms:.0f} ms")
    del engine
    torch._dynamo.reset()  # its caches hold the compiled UNet: the full model twice does not fit 24 GiB
    gc.collect()
    eager = Engine(str(model), device=device, dtype=dtype, max_resident_adapters=4)
    eager.generate(job)  # resident, allocator warm
    eager_ms = timed_generate(eager, job, repeats, sync)
    progress(f"eager generate with a LoRA: {eager_ms:.0f} ms")
    eager.adapters.set_fuse(True)
    eager.generate(job)
    eager_fused_ms = timed_generate(eager, job, repeats, sync)
    del eager
    result = {"size": size, "backend": backend, "device": device, "dtype": dtype, "steps": steps,
              "resolution": resolution, "rank": rank, "machine": machine(),
              "steps_seen": [{"step": n, "new_graphs": g, "ms": ms, "image": d} for n, g, ms, d in rows],
              "recompiles": sum(g for _, g, _, _ in rows), "a_b_a_identical": len(a_images) == 1,
              "start_to_ready_cold_s": cold["s"], "start_to_ready_warm_s": warm["s"],
              "warm_up_cold_s": cold["warm_up_s"], "warm_up_warm_s": warm["warm_up_s"],
              "warm_cache_loaded": warm["cache_loaded"], "compiled_lora_ms": compiled_ms, "eager_lora_ms": eager_ms,
              "eager_fused_lora_ms": eager_fused_ms, "compiled_over_eager": compiled_ms / eager_ms,
              "compiled_over_eager_fused": compiled_ms / eager_fused_ms,
              "variants": {v: variant_ms(v, model, device, dtype, backend, warmup, job, repeats, sync) for v in variants}}
    report(result, rows, as_json)
    return result


def variant_ms(variant: str, model: Path, device: str, dtype: str, backend: str, warmup: str, job, repeats: int,
               sync) -> dict:
    """A compiled engine with `variant` applied before its first compile: generate ms against the
    plain compiled engine's (fused QKV without a LoRA: it replaces the modules LoRAs patch)."""
    import torch

    from inference.compiled import parse_sizes
    from inference.pipeline import Engine, GenerationJob

    if variant not in ("channels_last", "fused_qkv"):
        raise SystemExit(f"unknown variant {variant!r}: channels_last or fused_qkv")
    if variant == "fused_qkv":
        job = GenerationJob(prompt=job.prompt, num_inference_steps=job.num_inference_steps, width=job.width,
                            height=job.height, seed=job.seed)
    times = {}
    for applied in (False, True):
        engine = Engine(str(model), device=device, dtype=dtype, compile="on", compile_warmup="", compile_backend=backend)
        if applied and variant == "channels_last":
            engine.txt2img.unet.to(memory_format=torch.channels_last)
        elif applied:
            engine.txt2img.unet.fuse_qkv_projections()
        for width, height in parse_sizes(warmup):  # compile before timing
            engine.generate(GenerationJob(prompt="warm-up", width=width, height=height, num_inference_steps=2,
                                          loras=job.loras))
        times["with" if applied else "without"] = timed_generate(engine, job, repeats, sync)
        del engine
    return {**{f"{k}_ms": v for k, v in times.items()}, "ratio": times["with"] / times["without"]}


def report(result: dict, rows: list[tuple], as_json: bool) -> None:
    if as_json:
        emit_json(result)
        return
    print_table(f"compile: {result['size']} synthetic SDXL on {result['device']}, backend {result['backend']}, "
                f"{result['steps']} steps at {result['resolution']}px; {result['machine']}", rows,
                ("request", "new graphs", "ms", "image"))
    print(f"recompiles after the warm-up: {result['recompiles']}; A -> B -> A identical: "
          f"{'yes' if result['a_b_a_identical'] else 'NO'}")
    if result["start_to_ready_cold_s"] is not None:
        print(f"start to ready: cold cache {result['start_to_ready_cold_s']:.1f} s (warm-up {result['warm_up_cold_s']:.1f} s), "
              f"warm cache {result['start_to_ready_warm_s']:.1f} s (warm-up {result['warm_up_warm_s']:.1f} s, loaded: "
              f"{result['warm_cache_loaded']})")
    print(f"generate with a LoRA: compiled {result['compiled_lora_ms']:.0f} ms, eager {result['eager_lora_ms']:.0f} ms "
          f"(fused {result['eager_fused_lora_ms']:.0f} ms): compiled/eager {result['compiled_over_eager']:.3f}, "
          f"compiled/eager fused {result['compiled_over_eager_fused']:.3f}")
    for name, v in result["variants"].items():
        print(f"{name}: compiled {v['without_ms']:.0f} ms, with {name} {v['with_ms']:.0f} ms, ratio {v['ratio']:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: dynamo's guards only)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int, help="default 64 (tiny), 512 (full)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="", help="comma list: channels_last, fused_qkv")
    parser.add_argument("--gpu", action="store_true", help="full model, CUDA, fp16, 1024x1024, 30 steps, rank 32")
    parser.add_argument("--dry", action="store_true", help="tiny model, eager backend, 2 steps, once: the script runs")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON to this file")
    a = parser.parse_args(argv)
    options = dict(size=a.size, backend=a.backend, steps=a.steps, resolution=a.resolution, repeats=a.repeats,
                   variants=tuple(filter(None, a.variants.split(","))), as_json=a.json)
    if a.gpu:
        options.update(size="full", device="cuda", dtype="float16", steps=30, resolution=1024, rank=32)
    if a.dry:
        options.update(size="tiny", backend="eager", steps=2, repeats=1)
    result = run(**options)
    if a.out:
        a.out.write_text(json.dumps(result, sort_keys=True, indent=1))


if __name__ == "__main__":
    main()
