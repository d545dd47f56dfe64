"""Adapter switching vs. the per-request reload baseline, on one pipeline, variants interleaved.

naive_reload   unload_lora_weights() + load_lora_weights(file) per request (cog-sdxl-style workers)
cold_load      our path for a LoRA not yet resident while the cache has room, end to end, in a worker that
               has served a LoRA before (the service's state; the naive reload unwraps every layer, so the
               cache loads and drops one LoRA first, untimed): prepared (read, verified, parsed,
               preflighted) before the pipeline lock, then added to the wrapped layers and activated
cold_locked    the part of cold_load that holds the pipeline lock (adding the adapter + activation)
first_cold_load/_locked  the same for a worker's first LoRA: PEFT's injection wraps the layers (once per
               process, or once per module a new trainer targets)
hotswap        cold_load when the cache is full (the steady state): its weights are copied into the least
               recently used adapter's layers instead of injecting new ones; hotswap_locked its locked part
resident_switch our path when the LoRA is resident (activation only), adapters unfused
switch_ms_by_resident  resident_switch with 2, 8 and 16 adapters resident (flat: the same for each)
fused_switch   the same with fusing on (the CUDA default): copy the base weights back, merge the new LoRA
read_verified  reading the LoRA file as a cold load does: into one buffer, each chunk hashed (sha256) in a
               second thread while the next is read
read_plain     the same read without hashing: read_verified - read_plain is what verification adds
hash           sha256 of the same bytes already in memory, in one thread: verification's CPU cost
base/lora_generate  one generation without LoRA / with one resident LoRA active, unfused
fused_generate the same generation with the LoRA merged into the weights
"""

from __future__ import annotations

import argparse
import hashlib
import itertools

from sdxl_lora_tools.bench.common import (BENCH_CACHE, RESIDENT_COUNTS, Samples, cold_load, emit_json, lora_files,
                                          machine, print_table, switch_ms_by_resident, synthetic_model)


def run(size: str = "tiny", rank: int = 32, loras: int = 4, repeats: int = 5, steps: int = 2,
        resolution: int | None = None, device: str = "auto", as_json: bool = False) -> dict:
    from inference.integrity import read_verified
    from inference.lora_store import LoraStore
    from inference.pipeline import Engine, GenerationJob

    model = synthetic_model(size)
    engine = Engine(str(model), device=device, max_resident_adapters=loras - 1, fuse_adapters=False)
    pipe = engine.txt2img
    paths = lora_files(pipe, BENCH_CACHE / f"loras-{size}", max(loras, *RESIDENT_COUNTS), rank)
    store = LoraStore(BENCH_CACHE / f"store-{size}", max_cache_bytes=1 << 40, max_lora_bytes=1 << 33,
                      allow_local_paths=True)
    files = [store.fetch(p.stem, str(p)) for p in paths]
    resolution = resolution or (64 if size == "tiny" else 512)
    job = GenerationJob(prompt="a portrait photo of a character", num_inference_steps=steps,
                        width=resolution, height=resolution, seed=0)

    def cold(total_name: str, locked_name: str, lora) -> None:
        total_ms, locked_ms = cold_load(engine, lora)
        samples.add(total_name, total_ms)
        samples.add(locked_name, locked_ms)

    def naive(path):
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="naive", use_safetensors=True)

    samples = Samples()
    cycle = itertools.cycle(range(loras))
    warm = files[0]
    engine.adapters.activate([(warm, 1.0)])  # first-use costs (imports, allocator) out of the way
    engine.generate(job)
    for _ in range(repeats):
        i = next(cycle)
        # naive: the previous request's LoRA is loaded; this request unloads it and loads its own
        engine.adapters.clear()
        naive(paths[(i + 1) % loras])
        samples.time("naive_reload_ms", lambda: naive(paths[i]))
        pipe.unload_lora_weights()  # every LoRA layer unwrapped: the next load is a worker's first
        engine.adapters.clear()
        cold("first_cold_load_ms", "first_cold_locked_ms", files[i])
        # ours, LoRA not resident (file on disk), cache has room, layers wrapped by an earlier LoRA
        engine.adapters.clear()
        cold("cold_load_ms", "cold_locked_ms", files[i])
        lora_path = files[i].path
        samples.time("read_verified_ms", lambda: read_verified(lora_path, files[i].sha256))
        samples.time("read_plain_ms", lambda: read_plain(lora_path))
        data = lora_path.read_bytes()
        samples.time("hash_ms", lambda: hashlib.sha256(data).hexdigest())
        del data
        # ours, cache full of the others: the new one is hot-swapped into the LRU adapter
        engine.adapters.clear()
        others = [f for f in files[:loras] if f is not files[i]]
        for f in others:
            engine.adapters.activate([(f, 1.0)])
        cold("hotswap_ms", "hotswap_locked_ms", files[i])
        # ours, resident: switch from the one just made active to another resident one
        target = others[-1]
        samples.time("resident_switch_ms", lambda: engine.adapters.activate([(target, 1.0)]))
        # generation with and without the active LoRA
        samples.time("base_generate_ms", lambda: engine.generate(job))
        job.loras = [(target, 1.0)]
        samples.time("lora_generate_ms", lambda: engine.generate(job))
        engine.adapters.set_fuse(True)
        engine.adapters.activate([(others[0], 1.0)])
        samples.time("fused_switch_ms", lambda: engine.adapters.activate([(target, 1.0)]))
        samples.time("fused_generate_ms", lambda: engine.generate(job))
        engine.adapters.set_fuse(False)
        job.loras = []

    by_resident = switch_ms_by_resident(engine, files, repeats)
    result = {name: samples.median(name) for name in samples.values}
    result.update(
        switch_ms_by_resident=by_resident, switch_spread=max(by_resident.values()) / min(by_resident.values()),
        cold_locked_over_naive=result["cold_locked_ms"] / result["naive_reload_ms"],
        hotswap_over_naive=result["hotswap_ms"] / result["naive_reload_ms"],
        resident_over_naive=result["resident_switch_ms"] / result["naive_reload_ms"],
        cold_over_naive=result["cold_load_ms"] / result["naive_reload_ms"],
        verify_share_of_cold_load=(result["read_verified_ms"] - result["read_plain_ms"]) / result["cold_load_ms"],
        hash_share_of_cold_load=result["hash_ms"] / result["cold_load_ms"],
        first_cold_over_naive=result["first_cold_load_ms"] / result["naive_reload_ms"],
        first_cold_locked_over_naive=result["first_cold_locked_ms"] / result["naive_reload_ms"],
        lora_over_base=result["lora_generate_ms"] / result["base_generate_ms"],
        fused_over_base=result["fused_generate_ms"] / result["base_generate_ms"],
        machine=machine(), size=size, rank=rank, loras=loras, repeats=repeats, steps=steps,
        resolution=resolution, spread={n: [min(v), max(v)] for n, v in samples.values.items()},
    )
    if as_json:
        emit_json(result)
    else:
        print_table(f"adapters: {size} synthetic SDXL, rank {rank}, {loras} LoRAs, {repeats} interleaved repeats, "
                    f"{steps} steps at {resolution}px; {result['machine']}",
                    [samples.row(n) for n in samples.values], ("variant", "median ms", "min", "max", "n"))
        print("switch ms by adapters resident: " + ", ".join(f"{n}: {ms:.1f}" for n, ms in by_resident.items())
              + f" (max/min {result['switch_spread']:.2f})")
        print(f"resident/naive {result['resident_over_naive']:.4f}  cold/naive {result['cold_over_naive']:.3f}  "
              f"cold locked/naive {result['cold_locked_over_naive']:.3f}  "
              f"first cold/naive {result['first_cold_over_naive']:.3f} "
              f"(locked {result['first_cold_locked_over_naive']:.3f})  "
              f"hotswap/naive {result['hotswap_over_naive']:.3f}  "
              f"verification/cold load {result['verify_share_of_cold_load']:.3f} "
              f"(sha256 CPU {result['hash_share_of_cold_load']:.3f})  "
              f"lora/base generate {result['lora_over_base']:.3f}  fused/base {result['fused_over_base']:.3f}")
    return result


def read_plain(path) -> None:
    """A file read into one fresh buffer in the cold path's chunks, without hashing (the baseline of
    what verification adds)."""
    import os

    import torch

    from inference.integrity import CHUNK_BYTES

    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        view = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
        done = 0
        while done < size and (got := f.readinto(view[done:done + CHUNK_BYTES])):
            done += got


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdxl-lora bench adapters")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--loras", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args(argv)
    run(a.size, a.rank, a.loras, a.repeats, a.steps, a.resolution, a.device, a.json)
