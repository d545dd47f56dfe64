"""QUEUE_MAX under a burst of clients that honour Retry-After: throughput, latency, busy answers.

`clients` callers each send `requests` generations one after another to the service on loopback
(the real app: admission, queue, Retry-After; one pipeline, as on a GPU worker). A `busy` answer is
retried after a uniformly random part of its Retry-After (full jitter), as the client does. Per
QUEUE_MAX: images per second against one caller alone on the same service (its sequential
throughput, the baseline), the p50/p95 time from a request's first try to its image, and the busy
answers on the way.

The pipeline is by default one whose every generation takes `--service-s` seconds (a sleep): the
queue's behaviour at a GPU-like ratio of generation to HTTP time, and steady on a shared machine,
where the tiny model's CPU time varies several-fold from one request to the next. `--service-s 0`
runs the tiny synthetic model instead (`--steps` denoising steps at 64x64).

`python -m sdxl_lora_tools.bench.queue [--queue-max 1,4,16,64] [--clients 24] [--service-s 1] [--json]`
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx

from sdxl_lora_tools.bench.common import emit_json, machine, percentile, print_table, synthetic_model


WARM_UP = 10  # requests: the moving average keeps 0.8**10 = 11 % of its 5 s prior


class FixedTimeEngine:
    """Stands in for inference.pipeline.Engine: each generation takes `seconds`, one at a time."""

    device = "cpu"
    dtype = "float32"

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.lock = threading.Lock()

    def generate(self, job, deadline, cancel):
        from PIL import Image

        from inference.pipeline import GenerationResult

        with self.lock:
            time.sleep(self.seconds)
        return GenerationResult(images=[Image.new("RGB", (job.width, job.height))] * job.num_images,
                                seeds=[job.seed + i for i in range(job.num_images)], lora_sources=[],
                                adapter_ms=0.0, inference_ms=self.seconds * 1e3)


def body(steps: int, seed: int) -> dict:
    return {"prompt": "a character portrait", "num_inference_steps": steps, "width": 64, "height": 64, "seed": seed}


def one_request(client: httpx.Client, base: str, steps: int, seed: int) -> tuple[float, int, bool]:
    """Seconds from the first try to the answer, the busy answers waited out on the way (full
    jitter), and whether it ended with the image."""
    started = time.perf_counter()
    busy = 0
    while True:
        response = client.post(f"{base}/v1/generate", json=body(steps, seed), timeout=300)
        if response.status_code != 429:
            return time.perf_counter() - started, busy, response.status_code == 200
        busy += 1
        time.sleep(random.uniform(0, float(response.headers["retry-after"])))


def load(base: str, clients: int, requests: int, steps: int) -> dict:
    """`clients` callers at once; images per second, latencies and what came back."""
    tally = {"ok": 0, "failed": 0, "busy": 0}
    latencies: list[float] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        with httpx.Client() as client:
            for i in range(requests):
                seconds, busy, ok = one_request(client, base, steps, index * requests + i)
                with lock:
                    latencies.append(seconds)
                    tally["busy"] += busy
                    tally["ok" if ok else "failed"] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"images_per_s": tally["ok"] / elapsed, "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95), **tally}


def run(queue_maxes: tuple[int, ...] = (1, 4, 16, 64), clients: int = 24, requests: int = 2, service_s: float = 1.0,
        steps: int = 20, as_json: bool = False) -> dict:
    from api.app import create_app
    from inference.service import InferenceService
    from inference.settings import Settings
    from sdxl_lora_tools.local_servers import LocalServer, wait_until_ready

    for name in ("httpx", "sdxl_lora"):  # a log line per request would bury the table
        logging.getLogger(name).setLevel(logging.WARNING)
    model = synthetic_model("tiny")
    pipeline = f"fixed {service_s:g} s per generation" if service_s else f"tiny model, {steps} steps"
    results: dict = {"machine": machine(), "clients": clients, "requests": requests, "pipeline": pipeline,
                     "by_queue_max": {}}
    with tempfile.TemporaryDirectory() as cache:
        for queue_max in queue_maxes:
            settings = Settings(model=str(model), device="cpu", lora_cache_dir=Path(cache), queue_max=queue_max)
            service = InferenceService(settings, engine=FixedTimeEngine(service_s) if service_s else None)
            with LocalServer(create_app(settings, service=service)) as base:
                wait_until_ready(base)
                load(base, 1, WARM_UP, steps)  # the pipeline warm, Retry-After's estimate past its prior
                sequential = load(base, 1, requests * 2, steps)
                burst = load(base, clients, requests, steps)
            burst["throughput_ratio"] = burst["images_per_s"] / sequential["images_per_s"]
            results["by_queue_max"][queue_max] = burst
    if as_json:
        emit_json(results)
    else:
        rows = [(q, r["throughput_ratio"], r["p50_s"], r["p95_s"], r["busy"], r["failed"])
                for q, r in results["by_queue_max"].items()]
        print_table(f"{clients} callers x {requests} requests, {pipeline} ({results['machine']})", rows,
                    ("QUEUE_MAX", "images/s vs sequential", "p50 s", "p95 s", "busy answers", "failed"))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench queue")
    parser.add_argument("--queue-max", default="1,4,16,64", help="comma list of QUEUE_MAX values")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--requests", type=int, default=2, help="per client")
    parser.add_argument("--service-s", type=float, default=1.0, help="seconds per generation; 0: the tiny model")
    parser.add_argument("--steps", type=int, default=20, help="the tiny model's steps")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    run(tuple(int(q) for q in a.queue_max.split(",")), a.clients, a.requests, a.service_s, a.steps, a.json)


if __name__ == "__main__":
    main()
