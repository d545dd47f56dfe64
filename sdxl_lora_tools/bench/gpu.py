"""GPU benchmark on the full-size synthetic SDXL: 1024x1024, 30 steps, fp16 (or bf16).

Latency without and with a resident rank-32 LoRA (unfused PEFT layers, and merged into the
weights as the service runs on CUDA), adapter cold-load / resident-switch (unfused and fused) /
naive reload, peak GPU memory, and the latency against a FLOP floor: the FLOPs of one generation
counted with torch's FlopCounterMode, divided by the matrix rate measured on this GPU.

To run it on a machine without internet (e.g. a lent H100): carry wheels for what the image
lacks (diffusers, peft, transformers if older, safetensors, filelock, runpod's pure-python deps
are not needed for this script):
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 peft==0.21.2
    # on the GPU machine:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
    python3 -m bench.gpu --json
"""

from __future__ import annotations

import argparse
import statistics
import time

from sdxl_lora_tools.bench.common import BENCH_CACHE, emit_json, lora_files, machine, print_table, synthetic_model


def matmul_tflops(dtype, n: int = 8192, repeats: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12


def count_flops(engine, job) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        engine.generate(job)
    return float(counter.get_total_flops())


def run(steps: int = 30, resolution: int = 1024, rank: int = 32, repeats: int = 5, dtype: str = "float16",
        as_json: bool = False) -> dict:
    import torch

    from inference.lora_store import LoraStore
    from inference.pipeline import Engine, GenerationJob, resolve_dtype

    if not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA device")
    model = synthetic_model("full")
    engine = Engine(str(model), device="cuda", dtype=dtype, max_resident_adapters=4, fuse_adapters=False)
    pipe = engine.txt2img
    paths = lora_files(pipe, BENCH_CACHE / "loras-full", 3, rank)
    store = LoraStore(BENCH_CACHE / "store-full", max_cache_bytes=1 << 40, max_lora_bytes=1 << 33,
                      allow_local_paths=True)
    files = [store.fetch(p.stem, str(p)) for p in paths]
    job = GenerationJob(prompt="a portrait photo of a character", num_inference_steps=steps, width=resolution,
                        height=resolution, seed=0)

    def timed(fn) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1e3

    engine.generate(job)  # warm-up: cuDNN/cuBLAS heuristics, allocator
    samples: dict[str, list[float]] = {}
    for i in range(repeats):
        engine.adapters.clear()
        samples.setdefault("cold_load_ms", []).append(timed(lambda: engine.adapters.activate([(files[i % 3], 1.0)])))
        for f in files:
            engine.adapters.activate([(f, 1.0)])
        samples.setdefault("resident_switch_ms", []).append(
            timed(lambda: engine.adapters.activate([(files[(i + 1) % 3], 1.0)])))
        engine.adapters.clear()
        pipe.load_lora_weights(str(paths[0].parent), weight_name=paths[0].name, adapter_name="naive")

        def naive():
            pipe.unload_lora_weights()
            pipe.load_lora_weights(str(paths[1].parent), weight_name=paths[1].name, adapter_name="naive")

        samples.setdefault("naive_reload_ms", []).append(timed(naive))
        pipe.unload_lora_weights()
        job.loras = []
        torch.cuda.reset_peak_memory_stats()
        samples.setdefault("base_generate_ms", []).append(timed(lambda: engine.generate(job)))
        base_peak = torch.cuda.max_memory_allocated()
        job.loras = [(files[0], 1.0)]
        engine.generate(job)  # make it resident first: this row is the generation only
        samples.setdefault("lora_generate_ms", []).append(timed(lambda: engine.generate(job)))
        engine.adapters.set_fuse(True)  # the CUDA default: the active LoRA merged into the weights
        engine.adapters.activate([(files[1], 1.0)])
        samples.setdefault("fused_switch_ms", []).append(timed(lambda: engine.adapters.activate([(files[0], 1.0)])))
        samples.setdefault("fused_generate_ms", []).append(timed(lambda: engine.generate(job)))
        engine.adapters.set_fuse(False)
    job.loras = []
    flops = count_flops(engine, job)
    rate = matmul_tflops(resolve_dtype(dtype, torch.device("cuda")))
    floor_ms = flops / (rate * 1e12) * 1e3
    result = {name: statistics.median(v) for name, v in samples.items()}
    result.update(
        peak_memory_gib=base_peak / 2**30, flops_per_image=flops, matmul_tflops=rate, flop_floor_ms=floor_ms,
        base_over_floor=result["base_generate_ms"] / floor_ms,
        lora_over_base=result["lora_generate_ms"] / result["base_generate_ms"],
        fused_over_base=result["fused_generate_ms"] / result["base_generate_ms"],
        resident_over_naive=result["resident_switch_ms"] / result["naive_reload_ms"],
        cold_over_naive=result["cold_load_ms"] / result["naive_reload_ms"],
        machine=machine(), dtype=dtype, steps=steps, resolution=resolution, rank=rank, repeats=repeats,
        spread={n: [min(v), max(v)] for n, v in samples.items()},
    )
    if as_json:
        emit_json(result)
    else:
        print_table(f"gpu: full synthetic SDXL, {resolution}px, {steps} steps, {dtype}, rank {rank}; {result['machine']}",
                    [(n, statistics.median(v), min(v), max(v), len(v)) for n, v in samples.items()],
                    ("variant", "median ms", "min", "max", "n"))
        print(f"peak memory {result['peak_memory_gib']:.1f} GiB; {flops / 1e12:.1f} TFLOP per image at "
              f"{rate:.0f} TFLOP/s = floor {floor_ms:.0f} ms; base/floor {result['base_over_floor']:.2f}; "
              f"lora/base {result['lora_over_base']:.3f}; fused/base {result['fused_over_base']:.3f}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench gpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    run(a.steps, a.resolution, a.rank, a.repeats, a.dtype, a.json)


if __name__ == "__main__":
    main()
