"""The disk cache serves only what its sha256 says, repairs itself, and keeps no leftovers.

Through the whole service on loopback: a damaged cache entry (a flipped byte, a garbled header, a
truncated file, a bundle whose files changed) is fetched again once and the request answered as a
fresh download, with the image of the intact file; a killed download's partial file is swept at the
next start unless a live download holds its lock; a LoRA the pipeline refuses leaves the cache.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from inference.cache_layout import id_slug
from inference.lora_store import LoraStore
from inference.service import InferenceService
from inference.settings import Settings
from tests.fakes import LiveServer, wait_ready
from tests.servers import FileServer, stall
from tests.test_generation import sd15_shaped_lora

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("served")
    (root / "a.safetensors").write_bytes(make_lora(seed=1, text_encoders=True).read_bytes())
    (root / "b.safetensors").write_bytes(make_lora(seed=2).read_bytes())
    (root / "bundle.tar").write_bytes(make_lora(seed=3, fmt="replicate").read_bytes())
    sd15_shaped_lora(root / "sd15.safetensors")
    with FileServer(root) as server:
        yield server


@contextmanager
def service(engine, cache_dir: Path):
    settings = Settings(model="unused", device="cpu", lora_cache_dir=cache_dir, allow_private_urls=True,
                        max_resident_adapters=engine.adapters.max_resident)
    svc = InferenceService(settings, engine=engine)
    with LiveServer(create_app(settings, service=svc)) as base:
        wait_ready(base)
        yield base, svc


def post(base: str, lora: dict, **extra) -> httpx.Response:
    body = {"prompt": "TOK, a character portrait", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 5,
            "loras": [lora], **extra}
    return httpx.post(f"{base}/v1/generate", json=body, timeout=120)


def image(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text[:500]
    return base64.b64decode(response.json()["images"][0]["base64"])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the tensor data: the file still parses
    path.write_bytes(bytes(data))


def garble_the_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garble\x00"
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"flipped_byte": flip_a_byte, "garbled_header": garble_the_header, "truncated": truncate}


@pytest.mark.parametrize("with_sha256", [False, True])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cache_entry_is_fetched_again_and_never_served(engine, files, tmp_path, damage, with_sha256):
    sha = hashlib.sha256((files.root / "a.safetensors").read_bytes()).hexdigest()
    lora = {"id": f"a-{damage}", "url": files.url("a.safetensors"), **({"sha256": sha} if with_sha256 else {})}
    with service(engine, tmp_path / "cache") as (base, svc):
        first = post(base, lora)
        expected = image(first)
        engine.adapters.clear()  # the next request reads the file from disk again
        cached = tmp_path / "cache" / f"{sha}.safetensors"
        DAMAGE[damage](cached)
        hits = files.hits["/a.safetensors"]

        again = post(base, lora)
        assert image(again) == expected, "the image of the intact file, never of the damaged one"
        assert again.json()["loras"] == [{"id": lora["id"], "sha256": sha, "source": "download"}]
        assert files.hits["/a.safetensors"] == hits + 1, "fetched again, once"
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha, "the cache holds the intact file again"
        engine.adapters.clear()
        assert post(base, lora).json()["loras"][0]["source"] == "disk"


def test_a_bundle_whose_files_changed_is_fetched_again(engine, files, tmp_path):
    lora = {"id": "bundle", "url": files.url("bundle.tar")}
    with service(engine, tmp_path / "cache") as (base, svc):
        expected = image(post(base, lora))
        for name in ("lora.safetensors", "embeddings.pti"):
            engine.adapters.clear()
            [entry] = (tmp_path / "cache").glob("*.bundle")
            flip_a_byte(entry / name)
            again = post(base, lora)
            assert image(again) == expected and again.json()["loras"][0]["source"] == "download", name


def test_error_messages_never_show_cache_paths(engine, files, tmp_path):
    cache = tmp_path / "cache"
    with service(engine, cache) as (base, svc):
        for lora in ({"id": "sd15", "url": files.url("sd15.safetensors")},
                     {"id": "sha", "url": files.url("a.safetensors"), "sha256": "0" * 64}):
            response = post(base, lora)
            assert response.status_code == 422
            message = response.json()["error"]["message"]
            assert str(cache) not in message and id_slug(lora["id"]) not in message, message


def test_a_refused_lora_does_not_stay_in_the_cache(engine, files, tmp_path):
    with service(engine, tmp_path / "cache") as (base, svc):
        response = post(base, {"id": "sd15", "url": files.url("sd15.safetensors")})
        assert response.json()["error"]["code"] == "lora_incompatible"
        assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [], "no entry, id record or lock"
        listed = httpx.get(f"{base}/v1/adapters").json()
        assert [entry["id"] for entry in listed["disk"]] == []
        hits = files.hits["/sd15.safetensors"]
        assert post(base, {"id": "sd15", "url": files.url("sd15.safetensors")}).status_code == 422
        assert files.hits["/sd15.safetensors"] == hits + 1, "refused again from a fresh download, not from disk"


# -- logs --------------------------------------------------------------------------------------------

FORGED = "\n2026-01-01 INFO inference.service: forged line\r\u2028\x85"  # line breaks of every kind


def test_user_values_cannot_start_a_log_line(engine, files, tmp_path, caplog):
    """Issue 22 item 3: a newline in a LoRA id forged a log line (seen with the refetch warning). The
    paths that log a user's value run here, with line breaks in the id, the prompt and a RunPod job
    id; every record of ours stays one line, and the values appear escaped."""
    import logging

    from handler.worker import make_handler

    sha = hashlib.sha256((files.root / "a.safetensors").read_bytes()).hexdigest()
    lora = {"id": f"char{FORGED}", "url": files.url("a.safetensors")}
    with caplog.at_level(logging.INFO), service(engine, tmp_path / "cache") as (base, svc):
        expected = image(post(base, lora, prompt=f"TOK{FORGED}"))  # fetched, injected
        engine.adapters.clear()  # evicted
        flip_a_byte(tmp_path / "cache" / f"{sha}.safetensors")
        assert image(post(base, lora, prompt=f"TOK{FORGED}")) == expected  # damaged: evicted and fetched again
        failed = asyncio.run(make_handler(svc)({"id": f"job{FORGED}", "input": {"prompt": FORGED, "image": "data:image/png;base64,"
                                                                                            "AAAA"}}))
        assert json.loads(failed["error"])["code"] == "image_invalid"
    ours = [r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("inference", "api", "handler", "sdxl_lora")]
    assert [m for m in ours if len(m.splitlines()) != 1] == []
    escaped_id = repr(lora["id"])
    for needle in ("fetched LoRA", "injected for", "evicted", "evicting it and fetching"):
        assert any(needle in m and escaped_id in m for m in ours), (needle, ours)
    assert any(repr(f"job{FORGED}") in m for m in ours), ours


# -- partial downloads ------------------------------------------------------------------------------


def store(cache: Path, **kwargs) -> LoraStore:
    return LoraStore(cache, max_cache_bytes=1 << 30, max_lora_bytes=1 << 30, allow_private_urls=True, **kwargs)


KILLED_DOWNLOAD = """
import sys
from inference.lora_store import LoraStore
LoraStore(sys.argv[1], max_cache_bytes=1 << 30, max_lora_bytes=1 << 30, allow_private_urls=True,
          timeout_s=60).fetch("victim", sys.argv[2])
"""


def test_a_killed_download_leaves_a_partial_that_the_next_start_sweeps(files, tmp_path):
    cache = tmp_path / "cache"
    files.behave["/slow.safetensors"] = stall(60)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_DOWNLOAD, str(cache), files.url("slow.safetensors")],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 60
        while not list((cache / ".tmp").glob("*.part")):
            assert proc.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        assert store(cache).partials()[0] == 1, "a live download's partial is left alone (its lock is held)"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert list((cache / ".tmp").glob("*.part")), "kill -9 left the partial file"
    assert store(cache).partials() == (0, 0)
    assert list((cache / ".tmp").iterdir()) == []


def test_partials_count_against_the_cache_cap(files, tmp_path):
    cache = tmp_path / "cache"
    size, other = ((files.root / name).stat().st_size for name in ("a.safetensors", "b.safetensors"))
    first = store(cache)
    first.max_cache_bytes = size + other + size // 2
    first.fetch("one", files.url("a.safetensors"))
    (cache / ".tmp" / f"{id_slug('other')}-x.part").write_bytes(b"\0" * size)  # another process's download
    assert first.partials() == (1, size)
    first.fetch("two", files.url("b.safetensors"))  # 2 files + the partial > the cap: "one" goes
    assert [entry.lora_id for entry in first.entries()] == ["two"]


def test_reading_a_lora_leaves_no_python_allocations_behind(engine, make_lora):
    """Issue 13 item 7: RSS grew ~14 KiB per activation while safetensors' `safe_open().get_tensor`
    (0.7.0 and 0.8.0) kept ~2 pymalloc blocks per tensor read (608 per file of 304 tensors).
    `read_lora` reads the bytes once and uses `safetensors.torch.load`, which keeps none."""
    import gc

    from inference.lora_compat import read_lora

    path = make_lora(seed=5, text_encoders=True)
    for _ in range(3):
        read_lora(engine.txt2img, path)
    gc.collect()
    before = sys.getallocatedblocks()
    for _ in range(50):
        read_lora(engine.txt2img, path)
    gc.collect()
    per_read = (sys.getallocatedblocks() - before) / 50
    assert per_read < 5, f"{per_read:.1f} Python blocks kept per read (a file here has hundreds of tensors)"
