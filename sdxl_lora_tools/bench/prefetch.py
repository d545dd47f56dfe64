"""Prefetch memory: the peak RSS of one prefetch of N LoRAs of M MB each, against the settings.

A prefetch only puts files into the disk cache, so its memory must not grow with the files' size
or count (issue 32: 16 x 62 MB once peaked at +941 MB, the files read, hashed and parsed, all at
once). Each run is a fresh process with the tiny synthetic pipeline loaded (as a serving worker
has it), prefetching from a loopback file server: cold (an empty cache: downloads), then warm (the
same LoRAs again: all hits). The peak is the kernel's high-water mark (VmHWM, reset through
/proc/self/clear_refs before each prefetch), so nothing between two samples escapes it. With
``--cache-mb`` below the files' total, it also shows what the answer says against what the disk
holds when it answers.

    sdxl-lora bench prefetch --loras 16 --mb 62
    sdxl-lora bench prefetch --loras 16 --mb 62 --cache-mb 200

Runs on the CPU; Linux only (/proc). The script runs as a file too, against another checkout
(``PYTHONPATH=<checkout>:<checkout>/client python -P sdxl_lora_tools/bench/prefetch.py ...``): its
child processes import `inference` from whatever PYTHONPATH names, which gives a before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MB = 1_000_000
FILES_DIR = Path(".cache/bench/prefetch")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench prefetch", description=__doc__.splitlines()[0])
    parser.add_argument("--loras", type=int, default=16, help="LoRAs in the one prefetch (1..16)")
    parser.add_argument("--mb", type=float, default=62.0, help="size of each LoRA file, MB")
    parser.add_argument("--cache-mb", type=float, default=None, help="SDXL_LORA_LORA_CACHE_MAX_BYTES, MB "
                        "(default: the service's, 20 GiB)")
    parser.add_argument("--label", default="", help="a name for the code under test, in the table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    model = _tiny_model()
    files = _lora_files(model, args.loras, args.mb)
    with _FileServer(files[0].parent) as base, tempfile.TemporaryDirectory(prefix="prefetch-bench-") as cache:
        plan = {"model": str(model), "cache": cache, "urls": [f"{base}/{f.name}" for f in files],
                "cache_bytes": int(args.cache_mb * MB) if args.cache_mb is not None else None}
        # -P: not the script's own folder first on sys.path (this folder's queue.py would shadow the stdlib's)
        done = subprocess.run([sys.executable, "-P", __file__, "--child", json.dumps(plan)], check=True,
                              stdout=subprocess.PIPE, text=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    _print_table(rows, args)


def _print_table(rows: list[dict], args) -> None:
    cache = f"{args.cache_mb:g} MB" if args.cache_mb is not None else "20 GiB (default)"
    print(f"\nprefetch of {args.loras} x {args.mb:g} MB LoRAs, cache {cache}, {args.label or 'this checkout'} "
          f"({_machine()})\n")
    print("| run | RSS before (MB) | peak RSS (MB) | peak - before (MB) | time (s) | answered cached | on disk after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['run']} | {row['rss_mb']:.0f} | {row['peak_mb']:.0f} | {row['peak_mb'] - row['rss_mb']:+.0f} "
              f"| {row['seconds']:.1f} | {row['cached']} of {row['loras']} | {row['on_disk']} |")


# -- the measured process --------------------------------------------------------------------------


def _child(plan: dict) -> list[dict]:
    from handler.worker import make_handler
    from inference.service import InferenceService
    from inference.settings import Settings

    overrides = {"lora_cache_max_bytes": plan["cache_bytes"]} if plan["cache_bytes"] is not None else {}
    service = InferenceService(Settings(model=plan["model"], device="cpu", lora_cache_dir=plan["cache"],
                                        allow_private_urls=True, **overrides))
    service.load(identity_in_background=False)
    handler = make_handler(service)  # the RunPod prefetch job: the same service call, answered as JSON
    job = {"id": "bench", "input": {"prefetch": {"loras": [{"id": f"bench-{i}", "url": url}
                                                         for i, url in enumerate(plan["urls"])]}}}
    rows = []
    for run in ("cold", "warm"):
        before = _reset_peak()
        started = time.perf_counter()
        answer = asyncio.run(handler(job))["loras"]
        seconds = time.perf_counter() - started
        cached = {o["id"] for o in answer if o["status"] == "cached"}
        on_disk = {f.lora_id for f in service.store.entries()}
        rows.append({"run": run, "rss_mb": before / MB, "peak_mb": _status_kb("VmHWM") * 1024 / MB,
                     "seconds": seconds, "loras": len(answer), "cached": len(cached),
                     "on_disk": len(on_disk), "cached_not_on_disk": sorted(cached - on_disk)})
    return rows


def _reset_peak() -> int:
    """Reset the process's RSS high-water mark (Linux: clear_refs 5); the RSS now, in bytes."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


# -- inputs ----------------------------------------------------------------------------------------


def _tiny_model() -> Path:
    from inference.synthetic import write_model

    path = FILES_DIR / "tiny-sdxl"
    if not (path / "model_index.json").exists():
        write_model(path, size="tiny", seed=0)
    return path


def _lora_files(model: Path, count: int, mb: float) -> list[Path]:
    """`count` distinct LoRAs that the tiny pipeline accepts, each about `mb` MB (a high rank)."""
    from safetensors.torch import save_file

    from inference.synthetic import build_pipeline, lora_state_dict, lora_target_layers, random_lora

    directory = FILES_DIR / f"loras-{mb:g}mb"
    paths = [directory / f"lora-{i}.safetensors" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline("tiny")
    per_rank = 4 * sum(layer.in_features + layer.out_features for layer in lora_target_layers(pipe).values())
    rank = max(1, round(mb * MB / per_rank))
    for i, path in enumerate(paths):
        if not path.exists():
            tensors, metadata = lora_state_dict(random_lora(pipe, rank=rank, seed=1000 + i), "diffusers")
            save_file(tensors, str(path), metadata=metadata)
    return paths


class _FileServer:
    """A loopback HTTP server for `directory`, in a thread of the parent (not the measured process)."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _machine() -> str:
    return f"{os.cpu_count()}-core CPU"


if __name__ == "__main__":
    main()
