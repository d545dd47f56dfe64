"""`sdxl-lora bench worker`: the real RunPod worker loop (`python -m handler` on the SDK's JobScaler,
fed by the loopback stand-in of RunPod's job API) at RUNPOD_CONCURRENCY 1 and 2.

Two streams of `--jobs` generations, all queued at once:
- cold: each job needs a LoRA new to the worker, served by a loopback server throttled to
  `--bandwidth` MB/s (default 300, the middle of a RunPod network volume's 200-400 MB/s), or to
  whatever makes a fetch take `--fetch-s` seconds (about a render, where overlap pays most);
- resident: every job uses one LoRA, resident after the first.
Per stream and concurrency: jobs per minute (first job taken to last answer), p50/p95 latency
(queued to answered, as a caller sees it) and each stage's share of a job (timings_ms: fetch,
adapter, inference, encode, and the rest: waiting, mostly for the other job's render), each worker
started afresh with an empty LoRA cache.

`python -m sdxl_lora_tools.bench.worker [--model tiny] [--jobs 8] [--steps 4] [--size 64]
    [--fetch-s 1.0 | --bandwidth 300] [--concurrency 1,2] [--json]`
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sdxl_lora_tools.bench.common import emit_json, machine, percentile, print_table, synthetic_model
from sdxl_lora_tools.bench.runpod_standin import RunPodStandIn, kill_worker, start_worker

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("fetch", "adapter", "inference", "encode")


class ThrottledFiles:
    """Serves the files of a folder at `bytes_per_s`, each download on its own (as a volume read)."""

    def __init__(self, root: Path, bytes_per_s: float):
        served = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                data = (root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                chunk = 256 * 1024
                started = time.monotonic()
                for offset in range(0, len(data), chunk):  # each chunk sent once the bandwidth allows it
                    ahead = started + min(offset + chunk, len(data)) / served.bytes_per_s - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                    self.wfile.write(data[offset:offset + chunk])

        self.bytes_per_s = bytes_per_s
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def lora_files(model: Path, directory: Path, count: int) -> list[Path]:
    from inference.synthetic import write_lora

    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"char-{seed}.safetensors" for seed in range(count)]
    for seed, path in enumerate(paths):
        if not path.exists():
            write_lora(model, path, seed=seed + 100)
    return paths


def run_stream(model: Path, concurrency: int, inputs: list[dict], work: Path) -> dict:
    """One fresh worker at `concurrency`, all `inputs` queued at once; its figures."""
    with RunPodStandIn() as standin:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "SDXL_LORA_"))}
        env.update(standin.worker_env("bench"), PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'client'}",
                   SDXL_LORA_MODEL=str(model), SDXL_LORA_DEVICE=os.environ.get("SDXL_LORA_DEVICE", "auto"),
                   SDXL_LORA_ALLOW_PRIVATE_URLS="true", SDXL_LORA_RUNPOD_CONCURRENCY=str(concurrency),
                   SDXL_LORA_IDEMPOTENCY_STORE="memory",
                   SDXL_LORA_LORA_CACHE_DIR=tempfile.mkdtemp(prefix="cache-", dir=work))
        with open(work / f"worker-c{concurrency}.log", "ab") as log:
            proc = start_worker(env, log)
        try:
            standin.wait_for_worker("bench", timeout=600, alive=lambda: proc.poll() is None)
            queued = time.monotonic()
            ids = [standin.submit(job_input) for job_input in inputs]
            results = [standin.result(job_id, timeout=1800) for job_id in ids]
        finally:
            kill_worker(proc)
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) failed, e.g. {failed[0]}")
    first_taken = min(standin.taken_at[job_id] for job_id in ids)
    last_done = max(standin.done_at[job_id] for job_id in ids)
    latencies = [standin.done_at[job_id] - queued for job_id in ids]
    timings = [r["output"]["timings_ms"] for r in results]
    total = sum(t["total"] for t in timings)
    return {
        "jobs_per_min": 60 * len(ids) / (last_done - first_taken),
        "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
        "share": {stage: sum(t[stage] for t in timings) / total for stage in STAGES}
        | {"waiting": 1 - sum(t[stage] for t in timings for stage in STAGES) / total},  # for the lock, mostly
        "render_s": sum(t["inference"] for t in timings) / len(timings) / 1e3,
        "fetch_s": sum(t["fetch"] for t in timings) / len(timings) / 1e3,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="synthetic model size (tiny, small, full) or a model directory")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bandwidth", type=float, default=300.0, help="MB/s of the LoRA server")
    parser.add_argument("--fetch-s", type=float, help="throttle so one LoRA's download takes this long instead")
    parser.add_argument("--concurrency", default="1,2")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    model = Path(args.model) if Path(args.model).is_dir() else synthetic_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    files = lora_files(model, Path(".cache/bench") / f"worker-loras-{model.name}", args.jobs)
    size = files[0].stat().st_size
    server = ThrottledFiles(files[0].parent, size / args.fetch_s if args.fetch_s else args.bandwidth * 1e6)

    def job(seed: int, lora: Path) -> dict:
        return {"prompt": "a character portrait", "seed": seed, "num_inference_steps": args.steps,
                "width": args.size, "height": args.size,
                "loras": [{"id": lora.stem, "url": f"{server.base}/{lora.name}", "scale": 0.8}]}

    streams = {"cold": [job(i, lora) for i, lora in enumerate(files)],
               "resident": [job(i, files[0]) for i in range(args.jobs)]}
    levels = [int(c) for c in args.concurrency.split(",")]
    figures = {name: {c: run_stream(model, c, inputs, work) for c in levels} for name, inputs in streams.items()}

    if args.json:
        emit_json({"machine": machine(), "lora_bytes": size, "bytes_per_s": server.bytes_per_s,
                   "figures": {name: {str(c): f for c, f in by_c.items()} for name, by_c in figures.items()}})
        return
    rows = []
    for name, by_c in figures.items():
        for c, f in by_c.items():
            rows.append((name, c, f"{f['jobs_per_min']:.1f}", f"{f['p50_s']:.1f}", f"{f['p95_s']:.1f}",
                         f"{f['fetch_s']:.2f}", f"{f['render_s']:.2f}",
                         " / ".join(f"{f['share'][s] * 100:.0f}" for s in (*STAGES, "waiting"))))
    print_table(f"RunPod worker loop, {args.jobs} jobs queued at once, LoRA {size / 1e6:.1f} MB at "
                f"{server.bytes_per_s / 1e6:.1f} MB/s, {args.size}² x {args.steps} steps ({machine()})", rows,
                ("stream", "concurrency", "jobs/min", "p50 s", "p95 s", "fetch s", "render s",
                 "% fetch / adapter / inference / encode / waiting"))
    for name, by_c in figures.items():
        if 1 in by_c and 2 in by_c:
            print(f"{name}: jobs/min at 2 vs 1 = {by_c[2]['jobs_per_min'] / by_c[1]['jobs_per_min']:.2f}x, "
                  f"p95 at 2 vs 1 = {by_c[2]['p95_s'] / by_c[1]['p95_s']:.2f}x")


if __name__ == "__main__":
    main()
