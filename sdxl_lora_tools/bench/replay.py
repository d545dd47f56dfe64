"""A seeded Zipf-like stream of LoRA requests through the real service (HTTP, loopback) against
the same stream through the naive baseline (one pipeline; unload + load_lora_weights per request).

The two are run in alternating blocks, so machine noise hits both alike. The naive baseline reads
its LoRA files from local disk (no download): the comparison favours it.
"""

from __future__ import annotations

import argparse
import random
import time

from sdxl_lora_tools.bench.common import (
    BENCH_CACHE, emit_json, lora_files, machine, percentile, print_table,
    synthetic_model,
)

PROMPT = "a portrait photo of a character"
STAGES = ("fetch", "adapter", "inference", "encode")


def zipf_stream(n: int, loras: int, seed: int, s: float = 1.1) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(loras)]
    return rng.choices(range(loras), weights=weights, k=n)


def run(size: str = "tiny", requests: int = 200, loras: int = 20, rank: int = 8, steps: int = 4,
        max_resident: int = 8, block: int = 20, seed: int = 0, as_json: bool = False) -> dict:
    import httpx

    from api.app import create_app
    from sdxl_lora_tools.local_servers import LocalFileServer, LocalServer
    from inference.pipeline import Engine, GenerationJob
    from inference.settings import Settings

    model = synthetic_model(size)
    resolution = 64 if size == "tiny" else 512
    naive_engine = Engine(str(model), device="auto")
    naive_pipe = naive_engine.txt2img
    paths = lora_files(naive_pipe, BENCH_CACHE / f"loras-{size}", loras, rank)
    stream = zipf_stream(requests, loras, seed)
    cache_dir = BENCH_CACHE / f"replay-cache-{time.time_ns()}"
    settings = Settings(model=str(model), allow_private_urls=True, lora_cache_dir=cache_dir,
                        max_resident_adapters=max_resident, queue_max=4)

    service_ms: list[float] = []
    stages = {stage: 0.0 for stage in STAGES}  # the service's own timings, summed
    naive_ms: list[float] = []
    reload_ms: list[float] = []
    with LocalFileServer(paths[0].parent) as files, LocalServer(create_app(settings), wait_ready=True) as base:
        http = httpx.Client(base_url=base, timeout=600)
        for start in range(0, requests, block):
            for index in stream[start:start + block]:
                body = {"prompt": PROMPT, "num_inference_steps": steps, "width": resolution, "height": resolution,
                        "seed": 0, "loras": [{"id": f"lora-{index}", "url": f"{files}/{paths[index].name}"}]}
                began = time.perf_counter()
                response = http.post("/v1/generate", json=body)
                service_ms.append((time.perf_counter() - began) * 1e3)
                response.raise_for_status()
                timings = response.json()["timings_ms"]
                for stage in STAGES:
                    stages[stage] += timings[stage]
            for index in stream[start:start + block]:
                began = time.perf_counter()
                naive_pipe.unload_lora_weights()
                naive_pipe.load_lora_weights(str(paths[index].parent), weight_name=paths[index].name,
                                             use_safetensors=True)
                reload_ms.append((time.perf_counter() - began) * 1e3)
                naive_engine._one_image(GenerationJob(prompt=PROMPT, num_inference_steps=steps, width=resolution,
                                                      height=resolution), 0)
                naive_ms.append((time.perf_counter() - began) * 1e3)
        http.close()

    result = {
        "service_s": sum(service_ms) / 1e3, "naive_s": sum(naive_ms) / 1e3,
        "ratio": sum(service_ms) / sum(naive_ms),
        "p50_ms": percentile(service_ms, 50), "p95_ms": percentile(service_ms, 95),
        "naive_p50_ms": percentile(naive_ms, 50), "naive_p95_ms": percentile(naive_ms, 95),
        "adapter_share": stages["adapter"] / sum(service_ms),
        # where the service's time goes (the rest: HTTP, validation, queueing, JSON): its shares
        **{f"{stage}_share": total / sum(service_ms) for stage, total in stages.items()},
        "naive_reload_share": sum(reload_ms) / sum(naive_ms),
        "distinct_loras": len(set(stream)), "machine": machine(), "size": size, "requests": requests,
        "loras": loras, "rank": rank, "steps": steps, "max_resident": max_resident,
    }
    if as_json:
        emit_json(result)
    else:
        print_table(f"replay: {requests} Zipf requests over {loras} LoRAs (rank {rank}, {result['distinct_loras']} "
                    f"distinct), {size} SDXL, {steps} steps at {resolution}px, MAX_RESIDENT_ADAPTERS "
                    f"{max_resident}; {result['machine']}",
                    [("service (HTTP)", result["service_s"], result["p50_ms"], result["p95_ms"]),
                     ("naive reload", result["naive_s"], result["naive_p50_ms"], result["naive_p95_ms"])],
                    ("path", "total s", "p50 ms", "p95 ms"))
        print(f"ratio service/naive {result['ratio']:.3f}; service time: "
              + ", ".join(f"{stage} {result[f'{stage}_share']:.1%}" for stage in STAGES)
              + f"; naive time: reload {result['naive_reload_share']:.1%}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench replay")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--loras", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-resident", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    run(a.size, a.requests, a.loras, a.rank, a.steps, a.max_resident, seed=a.seed, as_json=a.json)
