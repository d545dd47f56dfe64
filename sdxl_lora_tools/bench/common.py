"""Shared pieces of the benchmarks: synthetic models on disk, LoRA files, timing, tables."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH_CACHE = Path(".cache/bench")


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    import os

    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}, torch {torch.__version__}"


def quiet_adapter_loads() -> None:
    """Thousands of adapter loads: transformers' per-load report (30 lines for every text-encoder
    LoRA injected next to another) and PEFT's multiple-adapters warning would bury the table."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")


def synthetic_model(size: str) -> Path:
    from inference.synthetic import write_model

    path = BENCH_CACHE / f"{size}-sdxl"
    if not (path / "model_index.json").exists():
        started = time.perf_counter()
        write_model(path, size=size, seed=0)
        print(f"built {size} synthetic SDXL in {time.perf_counter() - started:.0f} s -> {path}")
    return path


def lora_files(pipe, directory: Path, count: int, rank: int, text_encoders: bool = False) -> list[Path]:
    """`count` random LoRAs of `rank` for `pipe` (built from the in-memory pipeline: no reload)."""
    from safetensors.torch import save_file

    from inference.synthetic import lora_state_dict, random_lora

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = directory / f"lora-r{rank}-s{seed}{'-te' if text_encoders else ''}.safetensors"
        if not path.exists():
            tensors, metadata = lora_state_dict(random_lora(pipe, rank=rank, seed=100 + seed,
                                                            text_encoders=text_encoders), "diffusers")
            save_file(tensors, str(path), metadata=metadata)
        paths.append(path)
    return paths


@dataclass
class Samples:
    """Milliseconds per variant; variants are run interleaved (A B A B ...) by the caller."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, ms: float) -> None:
        self.values.setdefault(name, []).append(ms)

    def time(self, name: str, fn: Callable[[], object]) -> object:
        started = time.perf_counter()
        result = fn()
        self.values.setdefault(name, []).append((time.perf_counter() - started) * 1e3)
        return result

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])

    def row(self, name: str) -> tuple[str, float, float, float, int]:
        v = self.values[name]
        return name, statistics.median(v), min(v), max(v), len(v)


RESIDENT_COUNTS = (2, 8, 16)  # switch_ms_by_resident: adapters resident while switching
SWITCH_SAMPLES = 100  # switches timed per resident count: a switch is ~2 ms, its median needs many


def no_sync() -> None:
    """What a timing waits for before reading the clock on the CPU: nothing (CUDA: synchronize)."""


def cold_load(engine, lora, sync: Callable[[], None] = no_sync) -> tuple[float, float]:
    """(end-to-end ms, pipeline-lock ms) of making a LoRA that is on disk but not resident active, as
    a request does: prepared (read, verified, parsed, preflighted) before the lock, in the fetch
    threads; injected or copied in place and activated under it."""
    sync()
    started = time.perf_counter()
    prepared = engine.prepare(lora)
    locked = time.perf_counter()
    engine.adapters.activate([(lora, 1.0)], {lora.sha256: prepared})
    sync()
    done = time.perf_counter()
    return (done - started) * 1e3, (done - locked) * 1e3


def switch_ms_by_resident(engine, files: list, repeats: int, sync: Callable[[], None] = no_sync) -> dict[int, float]:
    """Median ms of a switch between two resident adapters while 2, 8, 16 adapters are resident
    (`files` holds at least 16 LoRAs); the cache is emptied first and left with its cap as it was."""
    adapters, cap = engine.adapters, engine.adapters.max_resident
    adapters.clear()
    adapters.max_resident = max(RESIDENT_COUNTS)
    medians = {}
    try:
        for count in RESIDENT_COUNTS:
            for lora in files[len(adapters.resident()):count]:
                adapters.activate([(lora, 1.0)])
            times = []
            for i in range(max(SWITCH_SAMPLES, 2 * repeats)):
                sync()
                started = time.perf_counter()
                adapters.activate([(files[i % 2], 1.0)])
                sync()
                times.append((time.perf_counter() - started) * 1e3)
            medians[count] = statistics.median(times)
    finally:
        adapters.clear()
        adapters.max_resident = cap
    return medians


def print_table(title: str, rows: list[tuple], headers: tuple[str, ...]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(h)), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in rows:
        print("| " + " | ".join(_fmt(c).ljust(w) for c, w in zip(r, widths)) + " |")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def emit_json(payload: dict) -> None:
    print(json.dumps(payload, sort_keys=True))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
