"""A bounded soak on loopback: many clients, a mix of good and bad requests, many LoRAs through few
adapter slots, for a fixed time. Every request must be answered, no 5xx but the injected ones, and
memory after the soak within 10 % of memory after warm-up (adapters are loaded and deleted
thousands of times).

Memory is read (VmRSS, after garbage collection and glibc's malloc_trim) once the warm-up is over
(every LoRA once, every kind of request once, then the full load for a while, so that worker
threads and their allocator arenas exist) and again after the soak.

The service runs in this process (FastAPI under uvicorn on 127.0.0.1, the tiny synthetic SDXL) so
its memory can be read (VmRSS) and its adapter cache counted; the clients are threads with their
own HTTP connections. The LoRAs are served by a loopback file server that also misbehaves on
purpose (HTTP 500, a stall). Half the LoRAs also target the text encoders, so they are never
hot-swapped: each of their loads injects a new adapter and deletes the least recently used one.

Request kinds, and the answer each must get (anything else counts as unexpected):

    good (1 or 2 LoRAs) 200 | invalid body 422 invalid_request | LoRA 404, HTTP 500 or stalled
    424 lora_download_failed | garbage or pickle 422 lora_invalid | keys for no module 422
    lora_incompatible | injected CUDA OOM (torch.OutOfMemoryError inside the pipeline) 503 out_of_memory

Exits 1 when a request was lost, a 5xx was not injected, an answer was unexpected, the resident
adapters disagree with the pipeline's layers, or memory grew more than 10 %.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import pickle
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from sdxl_lora_tools.bench.common import (BENCH_CACHE, emit_json, lora_files, machine, percentile, print_table,
                                          quiet_adapter_loads, synthetic_model)

PROMPT = "a portrait photo of a character"
OOM_MARK = "[inject-oom]"
MEMORY_TOLERANCE = 0.10
KINDS = {  # kind -> (expected status, expected code, weight in the mix)
    "good": (200, "", 60),
    "good2": (200, "", 12),
    "invalid_body": (422, "invalid_request", 4),
    "lora_404": (424, "lora_download_failed", 4),
    "lora_500": (424, "lora_download_failed", 4),
    "lora_stall": (424, "lora_download_failed", 2),
    "lora_garbage": (422, "lora_invalid", 4),
    "lora_pickle": (422, "lora_invalid", 3),
    "lora_incompatible": (422, "lora_incompatible", 3),
    "oom": (503, "out_of_memory", 4),
}
INJECTED_5XX = {"oom"}


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def settle_memory() -> int:
    """Collect garbage and hand freed heap back to the OS (glibc), then read RSS: live memory, not
    what the allocator happens to keep cached."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


class OomOnMark:
    """Stands in for the txt2img pipeline: raises the CUDA OOM torch raises when the prompt carries
    OOM_MARK, otherwise calls the real pipeline. Everything else is the real pipeline's."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __call__(self, *args, **kwargs):
        import torch

        if OOM_MARK in (kwargs.get("prompt") or ""):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by bench soak)")
        return self._pipe(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def faulty_file_handler(stall_s: float):
    """Files at /NAME, plus /fault/500/NAME (HTTP 500) and /fault/stall/NAME (headers, then silence
    for `stall_s`): a handler for api.local_server.LocalFileServer."""
    from sdxl_lora_tools.local_servers import QuietFileHandler

    class Faulty(QuietFileHandler):
        protocol_version = "HTTP/1.1"

        def handle(self):
            try:
                super().handle()
            except ConnectionError:  # the service gave up on a stalled download: expected
                self.close_connection = True

        def do_GET(self):
            if self.path.startswith("/fault/500/"):
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path.startswith("/fault/stall/"):
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                self.wfile.flush()
                time.sleep(stall_s)
                self.close_connection = True
            else:
                super().do_GET()

    return Faulty


def write_bad_files(root: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (root / "garbage.safetensors").write_bytes(b"\x00garbage" * 500)
    (root / "pickle.safetensors").write_bytes(pickle.dumps({"unet.x.lora_A.weight": list(range(100))}))
    save_file({"unet.no_such_block.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "unet.no_such_block.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, str(root / "incompatible.safetensors"))


class Plan:
    """What each request is: its kind and body, drawn from a seeded generator per client."""

    def __init__(self, files: str, names: list[str], steps: int, resolution: int):
        self.files = files
        self.names = names
        self.steps = steps
        self.resolution = resolution
        self.weights = [KINDS[k][2] for k in KINDS]

    def draw(self, rng: random.Random) -> tuple[str, dict]:
        kind = rng.choices(list(KINDS), weights=self.weights)[0]
        return kind, self.body(kind, rng)

    def body(self, kind: str, rng: random.Random) -> dict:
        body = {"prompt": PROMPT, "num_inference_steps": self.steps, "width": self.resolution,
                "height": self.resolution, "seed": rng.randrange(1 << 30)}
        lora = lambda name, lora_id=None: {"id": lora_id or name, "url": f"{self.files}/{name}"}  # noqa: E731
        if kind == "good":
            body["loras"] = [lora(rng.choice(self.names))]
        elif kind == "good2":
            body["loras"] = [lora(n) for n in rng.sample(self.names, 2)]
        elif kind == "invalid_body":
            body["width"] = 63
        elif kind == "lora_404":
            body["loras"] = [lora("missing.safetensors")]
        elif kind == "lora_500":
            body["loras"] = [{"id": "flaky", "url": f"{self.files}/fault/500/x.safetensors"}]
        elif kind == "lora_stall":
            body["loras"] = [{"id": "stalled", "url": f"{self.files}/fault/stall/x.safetensors"}]
        elif kind == "lora_garbage":
            body["loras"] = [lora("garbage.safetensors")]
        elif kind == "lora_pickle":
            body["loras"] = [lora("pickle.safetensors")]
        elif kind == "lora_incompatible":
            body["loras"] = [lora("incompatible.safetensors")]
        elif kind == "oom":
            body["prompt"] = f"{PROMPT} {OOM_MARK}"
            body["loras"] = [lora(rng.choice(self.names))]
        return body


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tried = 0
        self.lost: list[str] = []
        self.by_answer: collections.Counter = collections.Counter()  # (status, code)
        self.by_kind: collections.Counter = collections.Counter()  # (kind, status, code)
        self.unexpected: collections.Counter = collections.Counter()
        self.five_xx_not_injected = 0
        self.sources: collections.Counter = collections.Counter()
        self.good_ms: list[float] = []

    def record(self, kind: str, response, elapsed_ms: float) -> None:
        with self.lock:
            self.tried += 1
            if isinstance(response, Exception):
                self.lost.append(f"{kind}: {type(response).__name__}: {response}")
                return
            status = response.status_code
            code = "" if status == 200 else _error_code(response)
            self.by_answer[(status, code)] += 1
            self.by_kind[(kind, status, code)] += 1
            if (status, code) != KINDS[kind][:2]:
                self.unexpected[(kind, status, code)] += 1
            if status >= 500 and kind not in INJECTED_5XX:
                self.five_xx_not_injected += 1
            if status == 200:
                self.good_ms.append(elapsed_ms)
                for lora in response.json()["loras"]:
                    self.sources[lora["source"]] += 1


def _error_code(response) -> str:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "(not the error envelope)"


def client_loop(base: str, plan: Plan, rng: random.Random, deadline: float, tally: Tally) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=120) as http:
        while time.monotonic() < deadline:
            kind, body = plan.draw(rng)
            started = time.perf_counter()
            try:
                response = http.post("/v1/generate", json=body)
            except Exception as exc:  # a lost request: the figure that must stay 0
                response = exc
            tally.record(kind, response, (time.perf_counter() - started) * 1e3)


def load(base: str, plan: Plan, clients: int, seed: int, duration: float, tally: Tally) -> list[int]:
    """`clients` threads sending requests for `duration` seconds; returns RSS samples taken meanwhile."""
    deadline = time.monotonic() + duration
    threads = [threading.Thread(target=client_loop, args=(base, plan, random.Random(seed * 1000 + i + 1),
                                                          deadline, tally), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    samples = []
    while any(t.is_alive() for t in threads):
        samples.append(rss_bytes())
        time.sleep(0.5)
    return samples


def run(duration: float = 120, clients: int = 8, loras: int = 20, max_resident: int = 4, steps: int = 2,
        size: str = "tiny", rank: int = 4, disk_loras: int = 10, seed: int = 0, warmup_s: float | None = None,
        as_json: bool = False) -> dict:
    import httpx

    from api.app import create_app
    from sdxl_lora_tools.local_servers import LocalFileServer, LocalServer
    from inference.service import InferenceService
    from inference.settings import Settings

    quiet_adapter_loads()
    warmup_s = min(30.0, max(2.0, duration / 4)) if warmup_s is None else warmup_s
    model = synthetic_model(size)
    resolution = 64 if size == "tiny" else 512
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=BENCH_CACHE))
    settings = Settings(model=str(model), allow_private_urls=True, lora_cache_dir=work / "cache",
                        max_resident_adapters=max_resident, download_timeout_s=1.0)
    service = InferenceService(settings)
    service.load()
    engine = service.engine
    unet_only = lora_files(engine.txt2img, BENCH_CACHE / f"soak-loras-{size}", loras - loras // 2, rank)
    with_te = lora_files(engine.txt2img, BENCH_CACHE / f"soak-loras-{size}", loras // 2, rank, text_encoders=True)
    files_dir = work / "files"
    files_dir.mkdir()
    for path in unet_only + with_te:
        (files_dir / path.name).write_bytes(path.read_bytes())
    write_bad_files(files_dir)
    if disk_loras:  # the disk cache holds only this many LoRAs: downloads and evictions go on too
        service.store.max_cache_bytes = disk_loras * max(p.stat().st_size for p in unet_only + with_te)
    names = [p.name for p in unet_only + with_te]
    engine.txt2img = OomOnMark(engine.txt2img)
    adapters = engine.adapters

    tally = Tally()
    with LocalFileServer(files_dir, handler=faulty_file_handler(stall_s=3.0)) as files, \
            LocalServer(create_app(settings, service=service), wait_ready=True) as base:
        plan = Plan(files, names, steps, resolution)
        # Warm-up: every LoRA once and every kind of request once, one at a time; then the full
        # load for a while, so that caches, worker threads and their allocator arenas are at their
        # working size before memory is first read.
        rng = random.Random(seed)
        with httpx.Client(base_url=base, timeout=120) as http:
            warm = [("good", {**plan.body("good", rng), "loras": [{"id": n, "url": f"{files}/{n}"}]})
                    for n in names] + [(k, plan.body(k, rng)) for k in KINDS]
            for kind, body in warm:
                http.post("/v1/generate", json=body)
        load(base, plan, clients, seed + 10_000, warmup_s, Tally())
        injections_before = adapters._injections
        resident_before = len(adapters.resident())
        rss_warm = settle_memory()

        started = time.perf_counter()
        samples = load(base, plan, clients, seed, duration, tally)
        elapsed = time.perf_counter() - started
        rss_end = settle_memory()
        peak = max([rss_warm, rss_end, *samples])
        half = len(samples) // 2
        resident = adapters.resident()
        consistent = adapters.injected_names() == {a.name for a in resident} and len(resident) <= max_resident

    loads = tally.sources["disk"] + tally.sources["download"]
    injected = adapters._injections - injections_before
    result = {
        "requests_tried": tally.tried,
        "requests_answered": tally.tried - len(tally.lost),
        "requests_lost": len(tally.lost),
        "lost_examples": tally.lost[:5],
        "by_status_code": {f"{s} {c}".strip(): n for (s, c), n in sorted(tally.by_answer.items())},
        "by_kind": {f"{k} -> {s} {c}".strip(): n for (k, s, c), n in sorted(tally.by_kind.items())},
        "unexpected": {f"{k} -> {s} {c}".strip(): n for (k, s, c), n in sorted(tally.unexpected.items())},
        "five_xx_not_injected": tally.five_xx_not_injected,
        "rss_after_warmup_mb": rss_warm / 2**20,
        "rss_after_soak_mb": rss_end / 2**20,
        "rss_peak_mb": peak / 2**20,
        "rss_ratio": rss_end / rss_warm if rss_warm else 0.0,
        # raw RSS (no trim) sampled every 0.5 s: mean of the soak's second half over its first half
        "rss_second_half_over_first": (sum(samples[half:]) / max(1, len(samples) - half)) / max(1, sum(samples[:half]) / max(1, half)),
        "adapter_loads": loads,
        "adapters_injected": injected,
        "adapters_hotswapped": loads - injected,
        "loras_evicted_from_pipeline": loads - (len(resident) - resident_before),  # deleted or overwritten by a hotswap
        "adapters_deleted": injected - (len(resident) - resident_before),
        "lora_sources": dict(tally.sources),
        "adapters_consistent": consistent,
        "requests_per_s": tally.tried / elapsed,
        "good_p50_ms": percentile(tally.good_ms, 50) if tally.good_ms else 0.0,
        "good_p95_ms": percentile(tally.good_ms, 95) if tally.good_ms else 0.0,
        "duration_s": elapsed, "warmup_s": warmup_s, "clients": clients, "loras": loras, "max_resident": max_resident,
        "disk_loras": disk_loras, "steps": steps, "size": size, "machine": machine(),
    }
    result["ok"] = (result["requests_lost"] == 0 and result["five_xx_not_injected"] == 0 and not result["unexpected"]
                    and consistent and result["rss_ratio"] <= 1 + MEMORY_TOLERANCE)
    if as_json:
        emit_json(result)
    else:
        report(result)
    return result


CHURN_TOLERANCE = 0.01


def churn(activations: int = 10_000, loras: int = 20, max_resident: int = 4, generate_every: int = 50,
          warmup: int = 1_000, size: str = "tiny", rank: int = 4, seed: int = 0, as_json: bool = False) -> dict:
    """Adapter churn without HTTP: `activations` activations drawn at random over `loras` LoRAs (half
    with text-encoder layers: evicted and injected; the others hot-swapped) through `max_resident`
    slots, a generation every `generate_every`. Memory (settled: after gc and malloc_trim) after the
    warm-up and at the end must stay within 1 %: a worker lives for millions of switches."""
    from inference.lora_store import LoraStore
    from inference.pipeline import Engine, GenerationJob

    quiet_adapter_loads()
    model = synthetic_model(size)
    engine = Engine(str(model), device="cpu", dtype="float32", max_resident_adapters=max_resident)
    paths = (lora_files(engine.txt2img, BENCH_CACHE / f"soak-loras-{size}", loras - loras // 2, rank)
             + lora_files(engine.txt2img, BENCH_CACHE / f"soak-loras-{size}", loras // 2, rank, text_encoders=True))
    store = LoraStore(Path(tempfile.mkdtemp(prefix="churn-", dir=BENCH_CACHE)), max_cache_bytes=1 << 40,
                      max_lora_bytes=1 << 33, allow_local_paths=True)
    files = [store.fetch(p.stem, str(p)) for p in paths]
    resolution = 64 if size == "tiny" else 512
    job = GenerationJob(prompt=PROMPT, num_inference_steps=2, width=resolution, height=resolution, seed=seed)
    rng = random.Random(seed)
    samples: list[tuple[int, int]] = []
    rss_warm = 0
    started = time.perf_counter()
    for i in range(1, warmup + activations + 1):
        lora = files[(i - 1) % len(files)] if i <= len(files) else rng.choice(files)  # each LoRA once first
        engine.adapters.activate([(lora, 1.0)])
        if i % generate_every == 0:
            job.loras = [(lora, 1.0)]
            engine.generate(job)
        if i == warmup:
            rss_warm = settle_memory()
        if i > warmup and (i - warmup) % max(1, activations // 20) == 0:
            samples.append((i - warmup, settle_memory()))
    elapsed = time.perf_counter() - started
    rss_end = samples[-1][1]
    half = samples[len(samples) // 2]
    slope_kib = (rss_end - half[1]) / max(1, samples[-1][0] - half[0]) / 1024  # second half: past any plateau
    result = {
        "activations": activations, "warmup_activations": warmup, "loras": loras, "max_resident": max_resident,
        "generate_every": generate_every, "size": size, "machine": machine(), "seconds": elapsed,
        "adapter_injections": engine.adapters._injections,
        "rss_after_warmup_mb": rss_warm / 2**20, "rss_end_mb": rss_end / 2**20,
        "rss_ratio": rss_end / rss_warm, "slope_kib_per_activation_2nd_half": slope_kib,
        "rss_samples_mb": [round(rss / 2**20, 1) for _, rss in samples],
    }
    result["ok"] = result["rss_ratio"] <= 1 + CHURN_TOLERANCE
    if as_json:
        emit_json(result)
    else:
        print_table(f"adapter churn: {activations} activations after {warmup} of warm-up, {loras} LoRAs (half with "
                    f"text encoders) through {max_resident} slots, a generation every {generate_every}, {size} SDXL; "
                    f"{result['machine']}",
                    [("seconds", elapsed), ("adapter injections (the rest hot-swapped or resident)",
                                            result["adapter_injections"]),
                     ("RSS after warm-up MB", result["rss_after_warmup_mb"]), ("RSS at the end MB", result["rss_end_mb"]),
                     ("RSS end / after warm-up", f"{result['rss_ratio']:.4f}"),
                     ("slope, 2nd half, KiB per activation", f"{slope_kib:.2f}"),
                     ("RSS samples MB", " ".join(f"{v:.0f}" for v in result["rss_samples_mb"]))],
                    ("figure", "value"))
        print("verdict:", "ok" if result["ok"] else f"FAILED (RSS grew more than {CHURN_TOLERANCE:.0%})")
    return result


def report(r: dict) -> None:
    print_table(f"soak: {r['duration_s']:.0f} s after {r['warmup_s']:.0f} s of warm-up, {r['clients']} clients, {r['loras']} LoRAs (half with text "
                f"encoders), MAX_RESIDENT_ADAPTERS {r['max_resident']}, disk cache {r['disk_loras'] or 'unlimited'} "
                f"LoRAs, {r['size']} SDXL, {r['steps']} steps; {r['machine']}",
                [("requests tried", r["requests_tried"]), ("answered", r["requests_answered"]),
                 ("lost", r["requests_lost"]), ("5xx not injected", r["five_xx_not_injected"]),
                 ("unexpected answers", sum(r["unexpected"].values())),
                 ("requests/s", r["requests_per_s"]), ("good p50 / p95 ms", f"{r['good_p50_ms']:.0f} / {r['good_p95_ms']:.0f}"),
                 ("RSS after warm-up MB", r["rss_after_warmup_mb"]), ("RSS after soak MB", r["rss_after_soak_mb"]),
                 ("RSS peak MB", r["rss_peak_mb"]), ("RSS after / warm-up", f"{r['rss_ratio']:.3f}"),
                 ("RSS during soak, 2nd half / 1st half", f"{r['rss_second_half_over_first']:.3f}"),
                 ("adapter loads (inject + hotswap)", f"{r['adapter_loads']} ({r['adapters_injected']} + {r['adapters_hotswapped']})"),
                 ("LoRAs evicted from the pipeline (adapters deleted)",
                  f"{r['loras_evicted_from_pipeline']} ({r['adapters_deleted']})"),
                 ("adapters = pipeline layers", "yes" if r["adapters_consistent"] else "NO")],
                ("figure", "value"))
    print_table("answers by request kind", [(k, n) for k, n in r["by_kind"].items()], ("kind -> status code", "count"))
    if r["unexpected"]:
        print("UNEXPECTED:", r["unexpected"])
    if r["lost_examples"]:
        print("LOST:", r["lost_examples"])
    print("verdict:", "ok" if r["ok"] else "FAILED")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120, help="seconds of load after warm-up")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--loras", type=int, default=20)
    parser.add_argument("--max-resident", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--disk-loras", type=int, default=10, help="LoRAs the disk cache holds (0: no cap)")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--warmup", type=float, help="seconds of full load before memory is first read "
                                                     "(default: a quarter of --duration, 2 to 30 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--churn", type=int, metavar="N",
                        help="instead: N adapter activations without HTTP, memory within 1 %% after warm-up")
    parser.add_argument("--churn-warmup", type=int, default=1_000)
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    if a.churn:
        result = churn(a.churn, a.loras, a.max_resident, warmup=a.churn_warmup, size=a.size, seed=a.seed,
                       as_json=a.json)
        sys.exit(0 if result["ok"] else 1)
    result = run(a.duration, a.clients, a.loras, a.max_resident, a.steps, a.size, disk_loras=a.disk_loras,
                 seed=a.seed, warmup_s=a.warmup, as_json=a.json)
    if not result["ok"]:
        sys.exit(1)
