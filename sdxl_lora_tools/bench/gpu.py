"""GPU benchmark on the full-size synthetic SDXL: 1024x1024, 30 steps, fp16 (or bf16).

Latency without and with a resident rank-32 LoRA (unfused PEFT layers, and merged into the
weights as the service runs on CUDA), adapter cold-load (cache with room: a worker's first LoRA,
injected by PEFT, and a later one, added to the wrapped layers; cache full: hotswap into the LRU
adapter's layers; end to end, and the part that holds the pipeline lock) /
resident switch (unfused and fused; with 2, 8 and 16 adapters resident) / naive reload, time
from process start to a loaded pipeline, peak GPU memory, and the latency against a FLOP floor:
the FLOPs of one generation counted with torch's FlopCounterMode, divided by the matrix rate
measured on this device.

`--dry` runs the same code on the CPU with the tiny model, a few steps, once: the test suite runs
it, so the script cannot rot between GPU sessions. The GPU run itself: scripts/gpu-run.sh (one
`device` call; the wheels it carries are listed in gpu_wheels.txt beside this file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sdxl_lora_tools.bench.common import (BENCH_CACHE, RESIDENT_COUNTS, cold_load, emit_json, lora_files, machine,
                                          print_table, switch_ms_by_resident, synthetic_model)

LORAS = 4  # one more than the resident slots: the last one is hot-swapped into a full cache
SLOTS = 3


def matmul_tflops(device: str, dtype, n: int, repeats: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def count_flops(engine, job) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        engine.generate(job)
    return float(counter.get_total_flops())


STARTUP = """
import sys, time
from inference.pipeline import Engine
Engine(sys.argv[1], device=sys.argv[2], dtype=sys.argv[3])
print("READY", flush=True)
"""


def seconds_to_ready(model, device: str, dtype: str) -> float:
    """A new Python process, from its start to a loaded pipeline on the device (imports included;
    the RunPod worker adds the runpod SDK's import, ~2 s, to this)."""
    started = time.perf_counter()
    isolated = ["-S"] if sys.flags.no_site else []  # as the caller runs (tests/test_gpu_run.py: -S)
    out = subprocess.run([sys.executable, *isolated, "-c", STARTUP, str(model), device, dtype], check=True,
                         capture_output=True, text=True).stdout
    if "READY" not in out:
        raise RuntimeError(f"the start-up probe did not get ready: {out[-500:]}")
    return time.perf_counter() - started


def run(steps: int = 30, resolution: int = 1024, rank: int = 32, repeats: int = 5, dtype: str = "float16",
        as_json: bool = False, dry: bool = False) -> dict:
    import torch

    from inference.lora_store import LoraStore
    from inference.pipeline import Engine, GenerationJob, resolve_dtype

    if dry:  # the same code path on the CPU: tiny model, few steps, one repeat
        size, device, dtype, steps, resolution, rank, repeats = "tiny", "cpu", "float32", 2, 64, 4, 1
    else:
        size, device = "full", "cuda"
        if not torch.cuda.is_available():
            raise SystemExit("bench gpu needs a CUDA device (or --dry for the CPU check)")
    model = synthetic_model(size)
    startup_s = seconds_to_ready(model, device, dtype)
    engine = Engine(str(model), device=device, dtype=dtype, max_resident_adapters=SLOTS, fuse_adapters=False)
    pipe = engine.txt2img
    paths = lora_files(pipe, BENCH_CACHE / f"loras-{size}", max(LORAS, *RESIDENT_COUNTS), rank)
    store = LoraStore(BENCH_CACHE / f"store-{size}", max_cache_bytes=1 << 40, max_lora_bytes=1 << 33,
                      allow_local_paths=True)
    files = [store.fetch(p.stem, str(p)) for p in paths]
    job = GenerationJob(prompt="a portrait photo of a character", num_inference_steps=steps, width=resolution,
                        height=resolution, seed=0)

    def timed(fn) -> float:
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        return (time.perf_counter() - started) * 1e3

    engine.generate(job)  # warm-up: cuDNN/cuBLAS heuristics, allocator
    samples: dict[str, list[float]] = {}

    def sample(name: str, fn) -> None:
        samples.setdefault(name, []).append(timed(fn))

    def cold(total_name: str, locked_name: str, lora) -> None:
        total_ms, locked_ms = cold_load(engine, lora, lambda: synchronize(device))
        samples.setdefault(total_name, []).append(total_ms)
        samples.setdefault(locked_name, []).append(locked_ms)

    for i in range(repeats):
        engine.adapters.clear()  # the naive reload below unwrapped every layer: this is a worker's first LoRA
        cold("first_cold_load_ms", "first_cold_locked_ms", files[i % SLOTS])
        engine.adapters.clear()  # a worker that has served a LoRA: the layers are wrapped, the cache has room
        cold("cold_load_ms", "cold_locked_ms", files[i % SLOTS])
        for f in files[:SLOTS]:
            engine.adapters.activate([(f, 1.0)])
        sample("resident_switch_ms", lambda: engine.adapters.activate([(files[(i + 1) % SLOTS], 1.0)]))
        cold("hotswap_ms", "hotswap_locked_ms", files[SLOTS])  # full: into the LRU's layers
        engine.adapters.clear()
        pipe.load_lora_weights(str(paths[0].parent), weight_name=paths[0].name, adapter_name="naive")

        def naive():
            pipe.unload_lora_weights()
            pipe.load_lora_weights(str(paths[1].parent), weight_name=paths[1].name, adapter_name="naive")

        sample("naive_reload_ms", naive)
        pipe.unload_lora_weights()
        job.loras = []
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sample("base_generate_ms", lambda: engine.generate(job))
        base_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        job.loras = [(files[0], 1.0)]
        engine.generate(job)  # make it resident first: this row is the generation only
        sample("lora_generate_ms", lambda: engine.generate(job))
        engine.adapters.set_fuse(True)  # the CUDA default: the active LoRA merged into the weights
        engine.adapters.activate([(files[1], 1.0)])
        sample("fused_switch_ms", lambda: engine.adapters.activate([(files[0], 1.0)]))
        sample("fused_generate_ms", lambda: engine.generate(job))
        engine.adapters.set_fuse(False)
    job.loras = []
    by_resident = switch_ms_by_resident(engine, files, repeats, lambda: synchronize(device))
    flops = count_flops(engine, job)
    rate = matmul_tflops(device, resolve_dtype(dtype, torch.device(device)), 8192 if device == "cuda" else 512)
    floor_ms = flops / (rate * 1e12) * 1e3
    result = {name: statistics.median(v) for name, v in samples.items()}
    result.update(
        startup_s=startup_s, peak_memory_gib=base_peak / 2**30 if base_peak is not None else None,
        flops_per_image=flops, matmul_tflops=rate, flop_floor_ms=floor_ms,
        base_over_floor=result["base_generate_ms"] / floor_ms,
        lora_over_base=result["lora_generate_ms"] / result["base_generate_ms"],
        fused_over_base=result["fused_generate_ms"] / result["base_generate_ms"],
        resident_over_naive=result["resident_switch_ms"] / result["naive_reload_ms"],
        cold_over_naive=result["cold_load_ms"] / result["naive_reload_ms"],
        cold_locked_over_naive=result["cold_locked_ms"] / result["naive_reload_ms"],
        first_cold_locked_over_naive=result["first_cold_locked_ms"] / result["naive_reload_ms"],
        switch_ms_by_resident=by_resident, switch_spread=max(by_resident.values()) / min(by_resident.values()),
        hotswap_over_naive=result["hotswap_ms"] / result["naive_reload_ms"],
        machine=machine(), dtype=dtype, steps=steps, resolution=resolution, rank=rank, repeats=repeats, dry=dry,
        spread={n: [min(v), max(v)] for n, v in samples.items()},
    )
    if as_json:
        emit_json(result)
    else:
        print_table(f"gpu: {size} synthetic SDXL, {resolution}px, {steps} steps, {dtype}, rank {rank}; "
                    f"{result['machine']}", [(n, statistics.median(v), min(v), max(v), len(v))
                                             for n, v in samples.items()],
                    ("variant", "median ms", "min", "max", "n"))
        peak = f"{result['peak_memory_gib']:.1f} GiB" if base_peak is not None else "n/a (CPU)"
        print(f"process start to ready {startup_s:.1f} s; peak memory {peak}; {flops / 1e12:.2f} TFLOP per image "
              f"at {rate:.0f} TFLOP/s = floor {floor_ms:.0f} ms; base/floor {result['base_over_floor']:.2f}; "
              f"lora/base {result['lora_over_base']:.3f}; fused/base {result['fused_over_base']:.3f}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench gpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny model, 2 steps, once: checks the script runs")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON to this file")
    a = parser.parse_args(argv)
    result = run(a.steps, a.resolution, a.rank, a.repeats, a.dtype, a.json, a.dry)
    if a.out:
        a.out.write_text(json.dumps(result, sort_keys=True, indent=1))


if __name__ == "__main__":
    main()
