"""The fleet's benchmarks run and report: the idempotency store's memory against its cap (the worker
loop's bench, `sdxl-lora bench worker`, starts four workers: run by hand, see its docstring)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_idempotency_bench_memory_stays_within_the_cap():
    out = subprocess.run([sys.executable, "-m", "sdxl_lora_tools.bench.idempotency", "--caps", "0,2",
                          "--answers", "100", "--answer-mb", "0.5", "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rows = {row["cap_mb"]: row for row in json.loads(out.strip().splitlines()[-1])["rows"]}
    assert rows[0.0]["kept"] == 0 and rows[0.0]["store_mb"] == 0
    assert rows[2.0]["kept"] == 3 and rows[2.0]["store_mb"] <= 2  # answers a little over 0.5 MB each
    # 100 answers of 0.5 MB went through: 50 MB if the store (or its expiry queue) held them all
    assert all(row["rss_growth_mb"] < 15 for row in rows.values()), rows
