"""`sdxl-lora bench idempotency`: the memory the idempotency store takes against IDEMPOTENCY_MAX_BYTES.

Per cap, in a fresh process: `--answers` answers of `--answer-mb` MB (their JSON) each kept under distinct keys
(as many repeats of a job's clips would), then the process's resident memory growth against the
cap. Before issue 32 the expiry queue held every answer until its TTL: 300 answers of 1 MB under a
5 MB cap grew RSS by ~290 MB.

`python -m sdxl_lora_tools.bench.idempotency [--caps 0,5,50] [--answers 300] [--answer-mb 1] [--json]`
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def one_cap(cap_mb: float, answers: int, answer_mb: float) -> dict:
    """In this process: keep `answers` answers under a cap of `cap_mb`; what it held, what it cost."""
    from inference.idempotency import MemoryStore
    from sdxl_lora_client import GenerateRequest, GenerateResponse

    request = GenerateRequest(prompt="a character portrait")
    store = MemoryStore(ttl_s=3600, max_bytes=int(cap_mb * 1024**2))
    gc.collect()
    before = rss_mb()
    for n in range(answers):
        payload = f"{n:08d}" * int(answer_mb * 1024**2 / 8)  # the image's base64: the bulk of an answer
        response = GenerateResponse.model_validate({
            "images": [{"seed": n, "width": 64, "height": 64, "mime": "image/png", "sha256": "0" * 64, "base64": payload}],
            "loras": [], "model": {"id": "m", "dtype": "float32", "device": "cpu"}, "timings_ms": {}})
        store.keep(store.claim(f"job/{n}", request), response)
        del response, payload
    gc.collect()
    return {"cap_mb": cap_mb, "kept": len(store), "store_mb": store.bytes / 1024**2, "rss_growth_mb": rss_mb() - before}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench idempotency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", default="0,5,50", help="IDEMPOTENCY_MAX_BYTES values, in MB")
    parser.add_argument("--answers", type=int, default=300)
    parser.add_argument("--answer-mb", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # internal: one cap in this process
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_cap(args.one, args.answers, args.answer_mb)))
        return
    rows = []
    for cap in (float(c) for c in args.caps.split(",")):
        out = subprocess.run([sys.executable, "-m", "sdxl_lora_tools.bench.idempotency", "--one", str(cap),
                              "--answers", str(args.answers), "--answer-mb", str(args.answer_mb)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps({"answers": args.answers, "answer_mb": args.answer_mb, "rows": rows}))
        return
    print(f"\nidempotency memory store: {args.answers} answers of {args.answer_mb:g} MB kept under each cap")
    print("| cap MB | answers kept | store MB | RSS growth MB |")
    print("|--------|--------------|----------|---------------|")
    for r in rows:
        print(f"| {r['cap_mb']:g} | {r['kept']} | {r['store_mb']:.1f} | {r['rss_growth_mb']:.1f} |")


if __name__ == "__main__":
    main()
