"""What the HTTP service adds: the same request through HTTP (loopback) and as an in-process
pipeline call with the same parameters, on the same loaded pipeline, interleaved."""

from __future__ import annotations

import argparse

from sdxl_lora_tools.bench.common import Samples, emit_json, machine, print_table, synthetic_model


def run(size: str = "tiny", repeats: int = 20, steps: int = 4, as_json: bool = False) -> dict:
    import httpx

    from api.app import create_app
    from sdxl_lora_tools.local_servers import LocalServer
    from inference.pipeline import GenerationJob
    from inference.service import InferenceService
    from inference.settings import Settings

    model = synthetic_model(size)
    resolution = 64 if size == "tiny" else 512
    settings = Settings(model=str(model))
    service = InferenceService(settings)
    service.load()
    engine = service.engine
    body = {"prompt": "a portrait photo", "num_inference_steps": steps, "width": resolution, "height": resolution,
            "seed": 3}
    job = GenerationJob(prompt=body["prompt"], num_inference_steps=steps, width=resolution, height=resolution, seed=3)
    samples = Samples()
    with LocalServer(create_app(settings, service=service), wait_ready=True) as base:
        http = httpx.Client(base_url=base, timeout=600)
        http.post("/v1/generate", json=body).raise_for_status()  # warm-up
        engine.generate(job)
        for _ in range(repeats):
            samples.time("http_ms", lambda: http.post("/v1/generate", json=body).raise_for_status())
            samples.time("direct_ms", lambda: engine.generate(job))
        http.close()
    result = {"http_ms": samples.median("http_ms"), "direct_ms": samples.median("direct_ms")}
    result.update(ratio=result["http_ms"] / result["direct_ms"], machine=machine(), size=size, repeats=repeats,
                  steps=steps, spread={n: [min(v), max(v)] for n, v in samples.values.items()})
    if as_json:
        emit_json(result)
    else:
        print_table(f"overhead: {size} SDXL, {steps} steps at {resolution}px, {repeats} interleaved repeats; "
                    f"{result['machine']}", [samples.row("http_ms"), samples.row("direct_ms")],
                    ("path", "median ms", "min", "max", "n"))
        print(f"ratio http/direct {result['ratio']:.3f}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench overhead")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    run(a.size, a.repeats, a.steps, a.json)
