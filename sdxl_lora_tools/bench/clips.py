"""A video job's clips side by side: `max_concurrent_clips` 1 vs N, sync and async applicators.

Against a local fake service of fixed latency (what a RunPod endpoint with several workers looks
like to the client: each request takes the same time, and N of them can run at once), and against
the real tiny service on loopback (one pipeline: generations queue behind its lock, so only the
fetch, encode and HTTP overlap).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from sdxl_lora_tools.bench.common import Samples, emit_json, machine, print_table, synthetic_model


class FixedLatencyService:
    """A FastAPI stand-in for the service: every POST /v1/generate answers after `latency_s` with a
    valid response whose 8x8 image is coloured by the request's seed (so a test can tell whose image
    a clip got). `peak` is the most requests it ever had in flight at once."""

    def __init__(self, latency_s: float):
        from fastapi import FastAPI

        self.latency_s = latency_s
        self.in_flight = 0
        self.peak = 0
        self.requests: list[dict] = []
        self.app = FastAPI()

        @self.app.post("/v1/generate")
        async def generate(body: dict) -> dict:
            self.requests.append(body)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(self.latency_s)
            finally:
                self.in_flight -= 1
            seed = body.get("seed", 0)
            image = seed_png_base64(seed)
            lora = body["loras"][0]
            return {"images": [{"seed": seed, "width": 8, "height": 8, "mime": "image/png",
                                "sha256": hashlib.sha256(base64.b64decode(image)).hexdigest(), "base64": image}],
                    "loras": [{"id": lora["id"], "sha256": lora.get("sha256") or "1" * 64, "source": "resident"}],
                    "model": {"id": "fake", "dtype": "float16", "device": "cuda"},
                    "timings_ms": {"inference": self.latency_s * 1e3, "total": self.latency_s * 1e3}}

        @self.app.get("/readyz")
        async def readyz() -> dict:
            return {"status": "ready"}


def seed_colour(seed: int) -> tuple[int, int, int]:
    return seed % 256, seed // 256 % 256, seed // 65536 % 256


def seed_png_base64(seed: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), seed_colour(seed)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def job_clips(count: int, reference_url: str):
    from sdxl_lora_client import ClipPrompt

    return [ClipPrompt(f"c{i}", f"shot {i}", [reference_url], []) for i in range(count)]


def run_job(base: str, store, clips, concurrency: int, use_async: bool, options=None) -> float:
    """Seconds for one job's LoRA step through the sync or async applicator."""
    from sdxl_lora_client import AsyncLoraApplicator, LoraApplicator, ServiceBackend

    backend = ServiceBackend(base)
    job_id = f"job-{time.perf_counter_ns()}"
    kwargs = dict(store=store, preprocessing=backend, max_concurrent_clips=concurrency, options=options)
    started = time.perf_counter()
    if use_async:
        async def apply():
            async with AsyncLoraApplicator(**kwargs) as applicator:
                return await applicator.apply(job_id, clips, "kling_v21", "char")

        result = asyncio.run(apply())
    else:
        with LoraApplicator(**kwargs) as applicator:
            result = applicator.apply(job_id, clips, "kling_v21", "char")
    elapsed = time.perf_counter() - started
    if result.path != "preprocessed" or result.warnings:
        raise RuntimeError(f"the job did not preprocess cleanly: {result.path} {result.warnings}")
    return elapsed


def measure(base: str, store, clips, concurrencies: tuple[int, ...], repeats: int, options=None) -> Samples:
    """Every (applicator, concurrency) variant, interleaved, `repeats` times."""
    samples = Samples()
    for _ in range(repeats):
        for use_async in (False, True):
            for concurrency in concurrencies:
                name = f"{'async' if use_async else 'sync'}_c{concurrency}_s"
                samples.values.setdefault(name, []).append(run_job(base, store, clips, concurrency, use_async, options))
    return samples


def run(clips: int = 5, latency_s: float = 0.5, repeats: int = 3, real: bool = True, steps: int = 4,
        as_json: bool = False) -> dict:
    from api.app import create_app
    from sdxl_lora_tools.local_servers import LocalFileServer, LocalServer
    from inference.settings import Settings
    from inference.synthetic import write_lora
    from PIL import Image
    from sdxl_lora_client import EnhanceOptions, SqlStore

    work = Path(tempfile.mkdtemp(prefix="bench-clips-"))
    store = SqlStore(f"sqlite:///{work / 'ledger.db'}")
    result: dict = {"machine": machine(), "clips": clips, "latency_s": latency_s, "repeats": repeats}
    concurrencies = (1, clips)

    fake = FixedLatencyService(latency_s)
    store.put_lora("char", status="completed", url="https://loras.example/char.safetensors")
    with LocalServer(fake.app) as base:
        fake_samples = measure(base, store, job_clips(clips, "https://cdn.example/ref.png"), concurrencies, repeats)
    result["fake"] = {name: statistics.median(v) for name, v in fake_samples.values.items()}
    result["fake_peak_in_flight"] = fake.peak
    for kind in ("sync", "async"):
        result[f"fake_{kind}_ratio"] = result["fake"][f"{kind}_c{clips}_s"] / result["fake"][f"{kind}_c1_s"]
    rows = [(f"fake {latency_s * 1e3:.0f} ms: {name}", *fake_samples.row(name)[1:]) for name in fake_samples.values]

    if real:
        model = synthetic_model("tiny")
        files = work / "files"
        files.mkdir()
        write_lora(model, files / "char.safetensors", rank=4, seed=1)
        Image.new("RGB", (64, 64), (180, 120, 90)).save(files / "ref.png")
        settings = Settings(model=str(model), device="cpu", allow_private_urls=True, lora_cache_dir=work / "cache")
        options = EnhanceOptions(num_inference_steps=steps)
        with LocalFileServer(files) as files_url, LocalServer(create_app(settings), wait_ready=True) as base:
            store.put_lora("char", status="completed", url=f"{files_url}/char.safetensors")
            run_job(base, store, job_clips(1, f"{files_url}/ref.png"), 1, False, options)  # warm-up: download, inject
            real_samples = measure(base, store, job_clips(clips, f"{files_url}/ref.png"), concurrencies, repeats,
                                   options)
        result["real"] = {name: statistics.median(v) for name, v in real_samples.values.items()}
        for kind in ("sync", "async"):
            result[f"real_{kind}_ratio"] = result["real"][f"{kind}_c{clips}_s"] / result["real"][f"{kind}_c1_s"]
        rows += [(f"tiny service, {steps} steps: {name}", *real_samples.row(name)[1:]) for name in real_samples.values]

    if as_json:
        emit_json(result)
    else:
        print_table(f"clips: one job of {clips} clips, max_concurrent_clips 1 vs {clips}, {repeats} repeats; "
                    f"{result['machine']}", rows, ("variant", "median s", "min", "max", "n"))
        print(f"fake service: c{clips}/c1 sync {result['fake_sync_ratio']:.2f}, async {result['fake_async_ratio']:.2f} "
              f"(peak {fake.peak} requests in flight)"
              + (f"; tiny service: sync {result['real_sync_ratio']:.2f}, async {result['real_async_ratio']:.2f}"
                 if real else ""))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench clips")
    parser.add_argument("--clips", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.5, help="the fake service's seconds per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps on the real tiny service")
    parser.add_argument("--no-real", dest="real", action="store_false", help="only the fake service")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    run(a.clips, a.latency, a.repeats, a.real, a.steps, a.json)
