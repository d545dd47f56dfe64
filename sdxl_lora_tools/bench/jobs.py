"""Many video jobs at once through one `AsyncLoraApplicator`, against the real tiny service.

The baseline is the service's own sequential throughput: the same requests sent one after the
other, no queueing and no client in the way, measured before and after each run. N concurrent jobs of C clips each then go through one
applicator, for each `max_in_flight` asked; the figures are clips/s against that baseline (the
client should pass the service's capacity through: >= 0.9), p50/p95 job latency, when the first
job finished as a share of the run (jobs served oldest first: about 1/10 for 20 jobs), the `busy` answers
the service gave, every clip's outcome, and renders vs. charges (renders from the service's
`sdxl_lora_images_generated_total` when it exports it, else n/a). On a machine whose load drifts
the sequential baseline drifts with it; `pipeline_busy_share` (the pipeline's own reported render
time over the run's wall time) is the same question asked within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

from sdxl_lora_tools.bench.common import emit_json, machine, percentile, print_table, synthetic_model

RENDERED = re.compile(r"^sdxl_lora_images_generated_total(?:\{[^}]*\})?\s+([0-9.e+]+)$", re.MULTILINE)


def rendered_images(base: str) -> int | None:
    import httpx

    match = RENDERED.search(httpx.get(f"{base}/metrics", timeout=10).text)
    return int(float(match.group(1))) if match else None


def counting_backend(base: str):
    """A ServiceBackend that counts the `busy` answers it gets."""
    from sdxl_lora_client import BackendError, ServiceBackend

    class Counting(ServiceBackend):
        busy = 0

        async def agenerate(self, request, idempotency_key=None):
            try:
                return await super().agenerate(request, idempotency_key)
            except BackendError as exc:
                if exc.code == "busy":
                    Counting.busy += 1
                raise

    return Counting(base)


def pipeline_ms(timings: dict) -> float:
    """The pipeline's own time for one render, as the service reports it."""
    return sum(timings.get(k, 0.0) for k in ("adapter", "inference", "encode"))


def sequential(base: str, reference: str, lora: dict, options, requests: int) -> tuple[float, float]:
    """The service alone: `requests` img2img requests like the applicator's, one after the other;
    (clips/s, mean pipeline ms per render)."""
    from sdxl_lora_client import GenerateRequest, ServiceBackend

    with ServiceBackend(base) as backend:
        started = time.perf_counter()
        renders = [backend.generate(GenerateRequest(
            prompt=f"<s0> shot {i}", loras=[lora], image=reference, seed=10_000 + i, strength=options.strength,
            num_inference_steps=options.num_inference_steps)).timings_ms.model_dump() for i in range(requests)]
        return requests / (time.perf_counter() - started), sum(map(pipeline_ms, renders)) / requests


def concurrent_jobs(base: str, store, reference: str, options, jobs: int, clips: int, max_in_flight: int,
                    tag: str) -> dict:
    from sdxl_lora_client import AsyncLoraApplicator, ClipPrompt

    backend = counting_backend(base)
    backend_class = type(backend)
    backend_class.busy = 0
    job_clips = [ClipPrompt(f"c{i}", f"shot {i}", [reference], []) for i in range(clips)]
    renders_before = rendered_images(base)

    async def one(applicator, job_id: str):
        started = time.perf_counter()
        result = await applicator.apply(job_id, job_clips, "kling_v21", "char")
        return result, time.perf_counter() - started

    async def main():
        async with AsyncLoraApplicator(store=store, preprocessing=backend, options=options,
                                       max_in_flight=max_in_flight) as applicator:
            return await asyncio.gather(*(one(applicator, f"{tag}-{j}") for j in range(jobs)))

    started = time.perf_counter()
    done = asyncio.run(main())
    wall_s = time.perf_counter() - started
    renders_after = rendered_images(base)
    latencies = [seconds for _, seconds in done]
    outcomes = Counter(o.status if o.reason is None else f"{o.status}:{o.reason}" for r, _ in done for o in r.outcomes)
    rows = [row for j in range(jobs) for row in store.job_costs(f"{tag}-{j}")]
    # The pipeline's own time per render, as the service reported it: their sum over the wall time is
    # how much of the run the one pipeline spent rendering (the same machine load on both sides).
    pipeline_s = sum(pipeline_ms(row["details"]["timings_ms"]) for row in rows) / 1e3
    return {"max_in_flight": max_in_flight, "wall_s": wall_s, "clips_per_s": jobs * clips / wall_s,
            "pipeline_busy_share": pipeline_s / wall_s, "pipeline_ms_per_render": pipeline_s * 1e3 / len(rows),
            "p50_job_s": percentile(latencies, 50), "p95_job_s": percentile(latencies, 95),
            "first_job_s": min(latencies), "first_job_share": min(latencies) / wall_s,
            "busy_answers": backend_class.busy, "outcomes": dict(outcomes),
            "charges": len(rows),
            "renders": None if renders_before is None else renders_after - renders_before}


def run(jobs: int = 20, clips: int = 5, in_flight: tuple[int, ...] = (8,), steps: int = 4, queue_max: int | None = None,
        baseline_requests: int = 20, as_json: bool = False) -> dict:
    from api.app import create_app
    from inference.settings import Settings
    from inference.synthetic import write_lora
    from PIL import Image
    from sdxl_lora_client import EnhanceOptions, SqlStore
    from sdxl_lora_tools.local_servers import LocalFileServer, LocalServer

    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    model = synthetic_model("tiny")
    files = work / "files"
    files.mkdir()
    write_lora(model, files / "char.safetensors", rank=4, seed=1)
    Image.new("RGB", (64, 64), (180, 120, 90)).save(files / "ref.png")
    settings = Settings(model=str(model), device="cpu", allow_private_urls=True, lora_cache_dir=work / "cache",
                        **({"queue_max": queue_max} if queue_max is not None else {}))
    options = EnhanceOptions(num_inference_steps=steps, strength=0.5)
    store = SqlStore(f"sqlite:///{work / 'ledger.db'}")
    result: dict = {"machine": machine(), "jobs": jobs, "clips": clips, "steps": steps, "queue_max": settings.queue_max}
    with LocalFileServer(files) as files_url, LocalServer(create_app(settings), wait_ready=True) as base:
        reference = f"{files_url}/ref.png"
        store.put_lora("char", status="completed", url=f"{files_url}/char.safetensors", trigger="<s0>")
        lora = {"id": "char", "url": f"{files_url}/char.safetensors"}
        sequential(base, reference, lora, options, max(5, baseline_requests))  # warm-up: download, inject, first runs
        # The baseline before and after each run (the machine's load drifts): each run against their mean.
        measured = [sequential(base, reference, lora, options, baseline_requests)]
        result["runs"] = []
        for index, limit in enumerate(in_flight):  # job ids of their own: a run is never a replay of another
            result["runs"].append(concurrent_jobs(base, store, reference, options, jobs, clips, limit,
                                                  f"run{index}-mif{limit}"))
            measured.append(sequential(base, reference, lora, options, baseline_requests))
    baselines = [clips_per_s for clips_per_s, _ in measured]
    result["sequential_clips_per_s"] = baselines
    result["sequential_pipeline_ms_per_render"] = [ms for _, ms in measured]
    for entry, before, after in zip(result["runs"], baselines, baselines[1:]):
        entry["ratio_to_sequential"] = entry["clips_per_s"] / ((before + after) / 2)
    if as_json:
        emit_json(result)
    else:
        rows = [(f"max_in_flight {r['max_in_flight']}", f"{r['clips_per_s']:.2f}", f"{r['ratio_to_sequential']:.2f}",
                 f"{r['pipeline_busy_share']:.2f}", f"{r['pipeline_ms_per_render']:.0f}", f"{r['p50_job_s']:.2f}", f"{r['p95_job_s']:.2f}",
                 f"{r['first_job_s']:.2f} ({r['first_job_share']:.0%})", r["busy_answers"],
                 r["outcomes"].get("enhanced", 0), "n/a" if r["renders"] is None else r["renders"], r["charges"])
                for r in result["runs"]]
        print_table(f"jobs: {jobs} concurrent jobs x {clips} clips through one applicator, tiny service "
                    f"(QUEUE_MAX {settings.queue_max}, {steps} steps); service alone, sequential, before and after "
                    f"each run: {', '.join(f'{v:.2f}' for v in baselines)} clips/s, "
                    f"{', '.join(f'{ms:.0f}' for ms in result['sequential_pipeline_ms_per_render'])} ms/render; "
                    f"{result['machine']}", rows,
                    ("variant", "clips/s", "/ sequential", "pipeline busy", "ms/render", "p50 job s", "p95 job s",
                     "first job s (share)", "busy", "enhanced", "renders",
                     "charges"))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench jobs")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--clips", type=int, default=5)
    parser.add_argument("--max-in-flight", default="8", help="comma list: one run per value")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (img2img at strength 0.5)")
    parser.add_argument("--queue-max", type=int, help="the service's QUEUE_MAX (default: its own)")
    parser.add_argument("--baseline-requests", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    run(a.jobs, a.clips, tuple(int(v) for v in a.max_in_flight.split(",")), a.steps, a.queue_max,
        a.baseline_requests, a.json)
