"""Two `sdxl-lora serve` processes sharing one LORA_CACHE_DIR, as RunPod workers share a network volume.

* A stream of requests for the same new LoRAs to both: each file is downloaded once in all, and
  the same LoRA gives the same image in both processes.
* A watcher reads the cache directory the whole time: every LoRA file it can see holds exactly the
  bytes its name's sha256 says (never half-written, never a partial rename).
* Eviction by one process never breaks a load in the other: a deterministic run of the race (A
  fetched the file from disk and waits for its pipeline while B's downloads evict it), and a
  stream of requests over more LoRAs than the disk cap holds.
"""

from __future__ import annotations

import base64
import hashlib
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests import servers
from tests.fakes import start_serve, stop
from tests.servers import FileServer

LORAS = 8
CAP_FILES = 3.5  # the disk cache holds three of the (equal-sized) LoRA files


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, make_lora) -> FileServer:
    """LORAS UNet-only LoRAs of one size, each download held 0.3 s so that fetches overlap."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("served")
    base = load_file(str(make_lora(seed=1)))
    for n in range(LORAS):  # the same keys and shapes, new weights: no pipeline load per LoRA
        gen = torch.Generator().manual_seed(100 + n)
        save_file({k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * v.std() for k, v in base.items()},
                  str(root / f"l{n}.safetensors"))
    sizes = {p.stat().st_size for p in root.iterdir()}
    assert len(sizes) == 1
    with FileServer(root) as server:
        for n in range(LORAS):
            server.behave[f"/l{n}.safetensors"] = servers.slow_ok(0.3)
        server.size = sizes.pop()
        yield server


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture(scope="module")
def pair(tiny_model, lora_files, cache_dir, tmp_path_factory):
    """Processes A and B on one cache directory (started together: each loads the model)."""
    env = {"SDXL_LORA_LORA_CACHE_DIR": str(cache_dir), "SDXL_LORA_ALLOW_PRIVATE_URLS": "true",
           "SDXL_LORA_LORA_CACHE_MAX_BYTES": str(int(lora_files.size * CAP_FILES)),
           "SDXL_LORA_MAX_RESIDENT_ADAPTERS": "4", "SDXL_LORA_QUEUE_MAX": "8"}
    logs = tmp_path_factory.mktemp("logs")
    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(start_serve, tiny_model, logs, env) for _ in range(2)]
        procs = [future.result() for future in starts]
    try:
        yield [base for _, base, _ in procs]
    finally:
        for proc, _, _ in procs:
            stop(proc)


class Watcher:
    """Reads every LoRA file in the cache, over and over, while the test runs."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self.checked = 0
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self.cache_dir.glob("*.safetensors"):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:  # evicted between listing and reading: fine
                    continue
                self.checked += 1
                if hashlib.sha256(data).hexdigest() != path.stem:  # a file is named by its content
                    self.bad.append(path.name)
            time.sleep(0.005)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def generate(base: str, lora_files: FileServer, *numbers: int, steps: int = 2, size: int = 64) -> httpx.Response:
    body = {"prompt": "a character portrait", "num_inference_steps": steps, "width": size, "height": size, "seed": 7,
            "loras": [{"id": f"shared-{n}", "url": lora_files.url(f"l{n}.safetensors")} for n in numbers]}
    return httpx.post(f"{base}/v1/generate", json=body, timeout=300)


def image(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text[:500]
    return base64.b64decode(response.json()["images"][0]["base64"])


def cached(cache_dir: Path, lora_files: FileServer, n: int) -> bool:
    sha = hashlib.sha256((lora_files.root / f"l{n}.safetensors").read_bytes()).hexdigest()
    return (cache_dir / f"{sha}.safetensors").exists()


def test_both_processes_download_each_new_lora_once(pair, lora_files, cache_dir):
    """Three clients (A, B, A) ask for the same three new LoRAs, in different orders, at once."""
    new = [0, 1, 2]  # three files: within the disk cap, so nothing is evicted here
    lora_files.reset_counts()
    orders = [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    jobs = [(pair[client % 2], orders[client][i]) for i in range(3) for client in range(3)]  # one round at a time
    with Watcher(cache_dir) as watcher, ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda job: (job, generate(job[0], lora_files, job[1])), jobs))
    images: dict[int, set[bytes]] = {}
    for (base, n), response in results:
        images.setdefault(n, set()).add(image(response))
    assert all(lora_files.hits[f"/l{n}.safetensors"] == 1 for n in new), dict(lora_files.hits)
    assert all(len(found) == 1 for found in images.values()), "one LoRA, one image, in both processes"
    assert len({next(iter(found)) for found in images.values()}) == len(new)
    assert watcher.checked > 0 and watcher.bad == []


def test_an_eviction_by_one_process_never_breaks_a_load_in_the_other(pair, lora_files, cache_dir):
    """The race, run on purpose: A fetches X from disk (a hit) and waits behind a slow generation;
    meanwhile B downloads three other LoRAs, and the disk cap evicts X. A must still load X."""
    a, b = pair
    x, others = 3, [4, 5, 6]
    reference = image(generate(b, lora_files, x))  # X now on disk (downloaded by B); never resident in A
    assert cached(cache_dir, lora_files, x)
    answers: dict[str, httpx.Response] = {}
    slow = threading.Thread(target=lambda: answers.update(slow=generate(a, lora_files, steps=100, size=256)))
    slow.start()
    time.sleep(0.5)  # A is generating
    load = threading.Thread(target=lambda: answers.update(x=generate(a, lora_files, x)))
    load.start()
    time.sleep(1.0)  # A has fetched X from disk (a hit: milliseconds) and waits for its pipeline
    assert slow.is_alive(), "A's slow request ended too early to hold the race open"
    assert image(generate(b, lora_files, *others))
    assert not cached(cache_dir, lora_files, x), "B's downloads should have evicted X"
    assert slow.is_alive(), "A's slow request ended before the eviction: the race was not run"
    slow.join(timeout=300)
    load.join(timeout=300)
    assert image(answers["slow"])
    assert image(answers["x"]) == reference, "A loaded X after all: fetched again, same bytes, same image"


def test_a_stream_over_more_loras_than_the_disk_holds(pair, lora_files, cache_dir):
    """Both processes, three clients each, LoRAs drawn at random from twice what the disk holds: evictions all the time, every request
    answered 200, every file either whole or absent, the cache within its cap when things settle."""
    rng = random.Random(5)
    jobs = [(pair[i % 2], rng.randrange(LORAS)) for i in range(18)]
    with Watcher(cache_dir) as watcher, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda job: generate(job[0], lora_files, job[1]), jobs))
    statuses = [r.status_code for r in results]
    assert statuses == [200] * len(jobs), [r.text[:200] for r in results if r.status_code != 200]
    assert watcher.checked > 0 and watcher.bad == []
    files = list(cache_dir.glob("*.safetensors"))
    assert sum(p.stat().st_size for p in files) <= lora_files.size * CAP_FILES
    assert list((cache_dir / ".tmp").iterdir()) == []
