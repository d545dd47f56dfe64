"""Fault injection at the service level: HTTP request -> the contract's error code -> nothing partial
in the LoRA cache -> no stray adapter in the pipeline -> the next good request gives the same bytes.

tests/test_lora_store.py covers each fetch fault against the store alone; here the same faults go
through the whole service (FastAPI over loopback, the real tiny pipeline), plus the faults only the
service sees: S3 going down and coming back, a disk filling up mid-write, and out-of-memory raised
inside generation and inside adapter injection. One pipeline is shared by every app in this module
(`InferenceService(engine=...)`), so each test builds the app its settings need without a reload.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import subprocess
from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx
import pytest
import torch

from runpod.serverless.utils import rp_ssrf  # slow first import: paid here, not inside a request

from api.app import create_app
from inference.service import InferenceService
from inference.settings import Settings
from tests import servers
from tests.fakes import LiveServer, wait_ready
from tests.servers import FileServer, S3Server, TcpGate

SEED = 3


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, make_lora):
    """a: UNet + text encoders (rank 4, ~220 KB); b: UNet only, rank 16 (~670 KB)."""
    root = tmp_path_factory.mktemp("served")
    (root / "a.safetensors").write_bytes(make_lora(seed=1, text_encoders=True).read_bytes())
    (root / "b.safetensors").write_bytes(make_lora(seed=2, rank=16).read_bytes())
    with FileServer(root) as server:
        yield server


class Service:
    """One app on loopback over the shared engine, and what a fault must leave untouched."""

    def __init__(self, base: str, service: InferenceService, lora_server: FileServer):
        self.base = base
        self.service = service
        self.files = lora_server

    def post(self, body: dict) -> httpx.Response:
        return httpx.post(f"{self.base}/v1/generate", json=body, timeout=120)

    def body(self, *loras: dict, **extra) -> dict:
        body = {"prompt": "a character portrait", "num_inference_steps": 2, "width": 64, "height": 64,
                "seed": SEED, "loras": list(loras)}
        body.update(extra)
        return body

    def lora(self, name: str, lora_id: str | None = None, url: str | None = None) -> dict:
        return {"id": lora_id or f"id-{name}", "url": url or self.files.url(f"{name}.safetensors")}

    def good_image(self) -> bytes:
        response = self.post(self.body(self.lora("a")))
        assert response.status_code == 200, response.text[:500]
        return base64.b64decode(response.json()["images"][0]["base64"])

    def cache_files(self) -> set[str]:
        """Every file under the cache dir: entries, id records, lock files (which leave with their fetch)."""
        root = self.service.store.cache_dir
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    def assert_cache_verified(self) -> None:
        """Every LoRA file in the cache holds exactly the bytes its name's sha256 says."""
        for path in self.service.store.cache_dir.glob("*.safetensors"):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem, path.name

    def assert_adapters_consistent(self) -> None:
        """Every adapter present in any LoRA layer is one the cache tracks as resident: nothing half-loaded."""
        adapters = self.service.engine.adapters
        assert adapters.injected_names() == {a.name for a in adapters.resident()}
        assert len(adapters.resident()) <= adapters.max_resident

    def fault(self, body: dict, status: int, code: str, needle: str = "", during=nullcontext,
              may_evict: bool = False) -> dict:
        """Send one faulty request between two good ones and check everything the contract promises.

        `during` is a context manager factory entered only around the faulty request (an injected fault).
        `may_evict`: the failure may have made room by evicting cached files (a full disk), never added one.
        """
        before_image = self.good_image()
        before_files = self.cache_files()
        before_adapters = self.service.engine.adapters.injected_names()
        with during():
            response = self.post(body)
        assert response.status_code == status, response.text[:500]
        error = response.json()["error"]
        assert error["code"] == code, error
        assert needle.lower() in error["message"].lower(), error
        assert list((self.service.store.cache_dir / ".tmp").iterdir()) == []
        self.assert_cache_verified()
        self.assert_adapters_consistent()
        if code != "out_of_memory":  # an OOM after the fetch leaves whole, verified files and adapters in place
            if may_evict:
                assert self.cache_files() <= before_files, "a failed request must not leave a file in the cache"
            else:
                assert self.cache_files() == before_files, "a failed request must not leave a file in the cache"
            assert self.service.engine.adapters.injected_names() == before_adapters
        assert self.good_image() == before_image, "the next good request must be served unchanged"
        return error


@contextmanager
def running(engine, lora_server, cache_dir: Path, **overrides):
    options = dict(model="unused", device="cpu", lora_cache_dir=cache_dir, allow_private_urls=True,
                   download_timeout_s=1.0, max_resident_adapters=engine.adapters.max_resident, queue_max=2)
    options.update(overrides)
    settings = Settings(**options)
    service = InferenceService(settings, engine=engine)
    with LiveServer(create_app(settings, service=service)) as base:
        wait_ready(base)
        yield Service(base, service, lora_server)


@pytest.fixture
def svc(engine, lora_server, tmp_path):
    with running(engine, lora_server, tmp_path / "cache") as service:
        yield service


# -- the LoRA's HTTP server misbehaves ---------------------------------------------------------------


def test_a_stalled_lora_server_is_download_failed(svc, lora_server):
    lora_server.behave["/stalled.safetensors"] = servers.stall(10)
    lora_server.add("stalled.safetensors", (lora_server.root / "b.safetensors").read_bytes())
    svc.fault(svc.body(svc.lora("stalled")), 424, "lora_download_failed", "timed out")


def test_a_connection_closed_half_way_is_download_failed(svc, lora_server):
    lora_server.behave["/half.safetensors"] = servers.close_half_way
    lora_server.add("half.safetensors", (lora_server.root / "b.safetensors").read_bytes())
    svc.fault(svc.body(svc.lora("half")), 424, "lora_download_failed", "closed")


def test_more_bytes_than_content_length_is_never_cached(svc, lora_server):
    """The declared length is read and the rest ignored: a truncated file, refused as unreadable."""
    lora_server.behave["/liar.safetensors"] = servers.more_than_declared
    lora_server.add("liar.safetensors", (lora_server.root / "b.safetensors").read_bytes())
    svc.fault(svc.body(svc.lora("liar")), 422, "lora_invalid", "not a readable safetensors file")


def test_a_redirect_to_a_private_address_is_refused_before_it_is_dialled(engine, lora_server, tmp_path, monkeypatch):
    """127.0.0.1 is made to count as public (so the LoRA server is reachable with private URLs off);
    the redirect points at 127.0.0.2, which stays private. The refusal happens before connecting."""
    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip == "127.0.0.1")
    lora_server.behave["/to-private.safetensors"] = servers.redirect_to(
        f"http://127.0.0.2:{lora_server.port}/b.safetensors", code=307)
    with running(engine, lora_server, tmp_path / "cache", allow_private_urls=False) as svc:
        lora_server.reset_counts()
        svc.fault(svc.body(svc.lora("b", url=lora_server.url("to-private.safetensors"))), 424,
                  "lora_download_failed", "non-public address 127.0.0.2")
        assert lora_server.hits["/to-private.safetensors"] == 1
        assert lora_server.hits["/b.safetensors"] == 0


def test_500_then_200_fails_once_and_is_not_remembered(svc, lora_server):
    lora_server.behave["/flaky.safetensors"] = servers.fail_first(1, status=500)
    lora_server.add("flaky.safetensors", (lora_server.root / "b.safetensors").read_bytes())
    body = svc.body(svc.lora("flaky"))
    svc.fault(body, 424, "lora_download_failed", "HTTP 500")
    response = svc.post(body)
    assert response.status_code == 200, response.text[:500]
    assert response.json()["loras"][0]["source"] == "download"
    assert lora_server.hits["/flaky.safetensors"] == 2
    svc.assert_adapters_consistent()


# -- S3 refuses, stalls, then recovers ----------------------------------------------------------------


def test_s3_refuses_then_times_out_then_recovers(engine, lora_server, tmp_path, monkeypatch):
    """One endpoint URL throughout (a TcpGate in front of moto): connection refused, then a server
    that accepts and never answers, then the real S3 again. The first two are lora_download_failed
    with nothing cached; the third request downloads the file."""
    with S3Server(monkeypatch) as s3, TcpGate(("127.0.0.1", s3.port)) as gate:
        url = s3.put("loras", "chars/b.safetensors", (lora_server.root / "b.safetensors").read_bytes())
        with running(engine, lora_server, tmp_path / "cache", s3_endpoint_url=gate.endpoint) as svc:
            body = svc.body({"id": "s3-b", "url": url})
            gate.set_mode("refuse")
            svc.fault(body, 424, "lora_download_failed", "s3://loras/chars/b.safetensors")
            gate.set_mode("stall")
            svc.fault(body, 424, "lora_download_failed", "s3://loras/chars/b.safetensors")
            assert gate.accepted >= 1, "the stall must have been reached"
            gate.set_mode("forward")
            response = svc.post(body)
            assert response.status_code == 200, response.text[:500]
            sha = hashlib.sha256((lora_server.root / "b.safetensors").read_bytes()).hexdigest()
            assert f"{sha}.safetensors" in svc.cache_files(), "fetched from S3 this time"
            svc.assert_adapters_consistent()


# -- the disk fills up during a cache write ---------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs (room for LoRA a, not for b), or a skip where mounting is not allowed."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); "
                    "test_disk_full_while_writing covers ENOSPC by injection")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# The contract has no "disk full" code: it is the service's own trouble, not the LoRA's, so the
# answer should be `internal` (500, which the client retries) with a message that says why, never
# lora_invalid or lora_download_failed (which the client never retries).


def test_a_real_full_disk_mid_write(engine, lora_server, small_tmpfs):
    with running(engine, lora_server, small_tmpfs / "cache") as svc:
        svc.fault(svc.body(svc.lora("b")), 500, "internal", "space", may_evict=True)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_while_writing(svc, where):
    """ENOSPC injected (works without a tmpfs): after the first 100 kB of the download's writes, or
    from the final fsync (network volumes often report a full disk only there)."""
    import inference.lora_store as lora_store

    real_write = lora_store._HashingWriter.write

    def write(self, data):
        room = 100_000 - self.size
        if len(data) > room:
            real_write(self, data[:max(room, 0)])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    @contextmanager
    def disk_full():
        with pytest.MonkeyPatch.context() as patch:
            if where == "write":
                patch.setattr(lora_store._HashingWriter, "write", write)
            else:
                patch.setattr(lora_store.os, "fsync", fsync)
            yield

    svc.fault(svc.body(svc.lora("b")), 500, "internal", "space", during=disk_full, may_evict=True)


# -- the cache directory disappears ----------------------------------------------------------------


def test_the_cache_directory_removed_under_a_running_service(engine, lora_server, tmp_path):
    """Issue 22 item 1 (a network volume remounted, an operator's rm -rf while the service runs):
    every LoRA request answered 500 until a restart, resident ones too, while /readyz said ready.
    Now the directory comes back: a resident LoRA is still served (the same image), one that was only
    on disk is fetched again, no 500, and /readyz is ready because the service really is."""
    import shutil

    cache = tmp_path / "cache"
    with running(engine, lora_server, cache) as svc:
        engine.adapters.clear()
        first = {name: svc.post(svc.body(svc.lora(name))) for name in ("a", "b")}
        assert [r.status_code for r in first.values()] == [200, 200]
        engine.adapters.clear()
        assert svc.post(svc.body(svc.lora("b"))).json()["loras"][0]["source"] == "disk"  # b resident, a on disk only
        hits = dict(lora_server.hits)

        shutil.rmtree(cache)
        resident, disk_only = svc.post(svc.body(svc.lora("b"))), svc.post(svc.body(svc.lora("a")))
        assert (resident.status_code, disk_only.status_code) == (200, 200), (resident.text[:300], disk_only.text[:300])
        assert resident.json()["loras"][0]["source"] == "resident"
        assert disk_only.json()["loras"][0]["source"] == "download"
        for name, response in (("b", resident), ("a", disk_only)):
            assert response.json()["images"][0]["sha256"] == first[name].json()["images"][0]["sha256"], name
            assert lora_server.hits[f"/{name}.safetensors"] == hits[f"/{name}.safetensors"] + 1, name
        assert httpx.get(f"{svc.base}/readyz").status_code == 200
        assert {p.name for p in cache.iterdir() if p.is_dir()} == {".tmp", ".locks", ".ids"}
        svc.assert_cache_verified()
        svc.assert_adapters_consistent()


# -- out of memory ---------------------------------------------------------------------------------


def test_out_of_memory_inside_generation_is_503_and_the_worker_recovers(svc, monkeypatch):
    """torch.OutOfMemoryError (what torch.cuda raises) from the UNet's second step, with LoRA b active."""
    unet = svc.service.engine.txt2img.unet
    real_forward = unet.forward
    steps = {"n": 0, "armed": False}

    def forward(*args, **kwargs):
        steps["n"] += 1
        if steps["armed"] and steps["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    @contextmanager
    def oom_on_second_step():
        steps.update(n=0, armed=True)
        try:
            yield
        finally:
            steps["armed"] = False

    monkeypatch.setattr(unet, "forward", forward)
    body = svc.body(svc.lora("b"))
    svc.fault(body, 503, "out_of_memory", "out of memory", during=oom_on_second_step)
    retry = svc.post(body)
    assert retry.status_code == 200, retry.text[:500]
    assert retry.json()["loras"][0]["source"] == "resident", "b was whole when the OOM hit, so it stays"


def test_out_of_memory_while_injecting_an_adapter_is_503_not_lora_invalid(svc, lora_server, make_lora):
    """The injection of a LoRA no earlier test made resident (a file of its own)."""
    pipe = svc.service.engine.adapters.pipe
    lora_server.add("c.safetensors", make_lora(seed=5).read_bytes())

    @contextmanager
    def oom_while_injecting():
        def oom(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

        with pytest.MonkeyPatch.context() as patch:
            for name in ("load_lora_into_unet", "load_lora_weights"):
                patch.setattr(pipe, name, oom)
            yield

    svc.fault(svc.body(svc.lora("c")), 503, "out_of_memory", "out of memory", during=oom_while_injecting)
