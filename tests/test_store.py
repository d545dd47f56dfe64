"""The LoRA store and the SSRF-safe fetch, against loopback HTTP and moto's S3 server."""

from __future__ import annotations

import multiprocessing
import pickle
import threading

import pytest
import torch
from safetensors.torch import save_file

from inference.errors import ErrorCode, ServiceError
from inference.lora_store import LoraStore
from tests import servers
from tests.servers import FileServer, S3Server


def lora_bytes(tmp_path, seed: int = 0, width: int = 64) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    path = tmp_path / f"src-{seed}-{width}.safetensors"
    save_file({"unet.a.lora_A.weight": torch.randn(4, width, generator=gen),
               "unet.a.lora_B.weight": torch.randn(width, 4, generator=gen)}, str(path))
    return path.read_bytes()


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    good = lora_bytes(tmp_path)
    for name, data in {
        "good.safetensors": good,
        "garbage.safetensors": b"\x13\x37" * 500,
        "pickle.safetensors": pickle.dumps({"weights": list(range(100))}),
        "torch.safetensors": b"",  # replaced below by a real torch.save zip checkpoint
        "truncated.safetensors": good[: len(good) - 100],
        "big.safetensors": lora_bytes(tmp_path, seed=1, width=40_000),
    }.items():
        (root / name).write_bytes(data)
    torch.save({"w": torch.zeros(3)}, root / "torch.safetensors")
    with FileServer(root) as server:
        yield server


@pytest.fixture
def store(tmp_path):
    return LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 20, allow_private_urls=True,
                     timeout_s=5)


def cached_files(store: LoraStore) -> list[str]:
    return sorted(p.name for p in store.cache_dir.iterdir() if p.is_file())


def tmp_files(store: LoraStore) -> list[str]:
    return sorted(p.name for p in (store.cache_dir / ".tmp").iterdir())


def test_download_then_disk_hit(store, served):
    first = store.fetch("char-1", served.url("good.safetensors"))
    second = store.fetch("char-1", served.url("good.safetensors"))
    assert (first.source, second.source) == ("download", "disk")
    assert first.path == second.path and first.path.read_bytes() == (served.root / "good.safetensors").read_bytes()
    assert served.hits["/good.safetensors"] == 1
    assert store.entries()[0].lora_id == "char-1"


def test_expected_sha256_is_checked(store, served):
    import hashlib

    digest = hashlib.sha256((served.root / "good.safetensors").read_bytes()).hexdigest()
    assert store.fetch("a", served.url("good.safetensors"), digest.upper()).sha256 == digest
    with pytest.raises(ServiceError) as err:
        store.fetch("b", served.url("good.safetensors"), "0" * 64)
    assert err.value.code == ErrorCode.LORA_INVALID and "sha256 mismatch" in err.value.message


def test_ids_never_collide_on_disk(store, served):
    a = store.fetch("team/char", served.url("good.safetensors"))
    b = store.fetch("team_char", served.url("good.safetensors"))
    assert a.path != b.path


@pytest.mark.parametrize("name, needle", [
    ("garbage.safetensors", "not a readable safetensors"),
    ("pickle.safetensors", "pickle"),
    ("torch.safetensors", "pickle"),
    ("truncated.safetensors", "not a readable safetensors"),
])
def test_unreadable_files_are_invalid_and_never_cached(store, served, name, needle):
    with pytest.raises(ServiceError) as err:
        store.fetch("x", served.url(name))
    assert err.value.code == ErrorCode.LORA_INVALID
    assert needle in err.value.message
    assert cached_files(store) == [] and tmp_files(store) == []


@pytest.mark.parametrize("case", ["404", "stall", "close_half_way", "more_than_declared", "too_big",
                                  "too_big_no_length", "bad_scheme"])
def test_fetch_failures_are_download_failed_and_never_cached(store, served, case):
    name = "good.safetensors"
    if case == "404":
        name = "missing.safetensors"
    elif case == "stall":
        served.behave["/good.safetensors"] = servers.stall(8)
    elif case == "close_half_way":
        served.behave["/good.safetensors"] = servers.close_half_way
    elif case == "more_than_declared":
        served.behave["/good.safetensors"] = servers.more_than_declared
    elif case == "too_big":
        name = "big.safetensors"
    elif case == "too_big_no_length":
        name = "big.safetensors"
        served.behave["/big.safetensors"] = servers.no_content_length
    url = "ftp://example.com/x.safetensors" if case == "bad_scheme" else served.url(name)
    with pytest.raises(ServiceError) as err:
        store.fetch("x", url)
    assert err.value.code in (ErrorCode.LORA_DOWNLOAD_FAILED, ErrorCode.LORA_INVALID), err.value
    if case != "more_than_declared":  # a body longer than declared is cut at the declared length
        assert err.value.code == ErrorCode.LORA_DOWNLOAD_FAILED
    assert cached_files(store) == [] and tmp_files(store) == []


def test_loopback_is_refused_unless_private_urls_are_allowed(tmp_path, served):
    guarded = LoraStore(tmp_path / "guarded", max_cache_bytes=1 << 30, max_lora_bytes=1 << 20)
    with pytest.raises(ServiceError) as err:
        guarded.fetch("x", served.url("good.safetensors"))
    assert err.value.code == ErrorCode.LORA_DOWNLOAD_FAILED and "non-public" in err.value.message
    assert served.hits["/good.safetensors"] == 0, "a refused URL must not be contacted at all"


def test_every_redirect_hop_is_checked(tmp_path, served, monkeypatch):
    """127.0.0.1 is treated as public here, 127.0.0.2 (also loopback) is not: the redirect must be refused."""
    from runpod.serverless.utils import rp_ssrf

    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip == "127.0.0.1")
    guarded = LoraStore(tmp_path / "guarded", max_cache_bytes=1 << 30, max_lora_bytes=1 << 20)
    served.behave["/hop.safetensors"] = servers.redirect_to(f"http://127.0.0.2:{served.port}/good.safetensors")
    served.behave["/ok-hop.safetensors"] = servers.redirect_to("/good.safetensors")
    assert guarded.fetch("ok", served.url("ok-hop.safetensors")).source == "download"
    with pytest.raises(ServiceError) as err:
        guarded.fetch("x", served.url("hop.safetensors"))
    assert "127.0.0.2" in err.value.message


def test_s3_source_through_moto(tmp_path, monkeypatch):
    with S3Server(monkeypatch) as s3:
        s3.client().create_bucket(Bucket="loras")
        s3.client().put_object(Bucket="loras", Key="chars/a.safetensors", Body=lora_bytes(tmp_path))
        store = LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 20,
                          s3_endpoint_url=s3.endpoint)
        lora = store.fetch("a", "s3://loras/chars/a.safetensors")
        assert lora.source == "download" and lora.path.read_bytes() == lora_bytes(tmp_path)
        with pytest.raises(ServiceError) as err:
            store.fetch("b", "s3://loras/chars/missing.safetensors")
        assert err.value.code == ErrorCode.LORA_DOWNLOAD_FAILED


def test_local_paths_only_when_allowed(tmp_path):
    source = tmp_path / "local.safetensors"
    source.write_bytes(lora_bytes(tmp_path))
    service_store = LoraStore(tmp_path / "c1", max_cache_bytes=1 << 30, max_lora_bytes=1 << 20)
    with pytest.raises(ServiceError) as err:
        service_store.fetch("x", str(source))
    assert err.value.code == ErrorCode.LORA_DOWNLOAD_FAILED
    cli_store = LoraStore(tmp_path / "c2", max_cache_bytes=1 << 30, max_lora_bytes=1 << 20, allow_local_paths=True)
    assert cli_store.fetch("x", str(source)).source == "download"
    assert cli_store.fetch("y", source.as_uri()).source == "download"


def test_disk_cache_evicts_least_recently_used_within_its_cap(tmp_path, served):
    for seed in range(4):
        (served.root / f"l{seed}.safetensors").write_bytes(lora_bytes(tmp_path, seed=seed))
    size = len(lora_bytes(tmp_path, seed=0))
    store = LoraStore(tmp_path / "cache", max_cache_bytes=int(size * 2.5), max_lora_bytes=1 << 20,
                      allow_private_urls=True)
    store.fetch("l0", served.url("l0.safetensors"))
    store.fetch("l1", served.url("l1.safetensors"))
    store.fetch("l0", served.url("l0.safetensors"))  # l0 is now the most recently used
    store.fetch("l2", served.url("l2.safetensors"))
    assert sum(f.size for f in store.entries()) <= store.max_cache_bytes
    assert {f.lora_id for f in store.entries()} == {"l0", "l2"}
    assert store.fetch("l1", served.url("l1.safetensors")).source == "download"


def test_two_threads_fetch_a_new_lora_once(store, served):
    served.behave["/good.safetensors"] = servers.slow_ok(0.5)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.fetch("t", served.url("good.safetensors"))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert served.hits["/good.safetensors"] == 1
    assert len({r.path for r in results}) == 1 and sorted(r.source for r in results) == ["disk", "download"]


def _fetch_in_process(cache_dir, url, queue):
    store = LoraStore(cache_dir, max_cache_bytes=1 << 30, max_lora_bytes=1 << 20, allow_private_urls=True)
    lora = store.fetch("shared", url)
    queue.put((str(lora.path), lora.source))


def test_two_processes_sharing_the_cache_fetch_a_new_lora_once(tmp_path, served):
    served.behave["/good.safetensors"] = servers.slow_ok(1.0)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_process, args=(tmp_path / "shared", served.url("good.safetensors"), queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert served.hits["/good.safetensors"] == 1
    assert len({path for path, _ in results}) == 1
    assert sorted(source for _, source in results) == ["disk", "download"]
