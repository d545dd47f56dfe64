"""The LoRA store (inference.lora_store) and the SSRF-safe fetch under it (inference.fetch).

Everything runs against loopback servers (tests/servers.py) and moto's S3 server; no other
network. Addresses: 127.0.0.1 is loopback, so "private" for the SSRF guard; tests that need a
"public" host patch `rp_ssrf.is_safe_address` (or the resolver) and say so.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import multiprocessing
import os
import pickle
import socket
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runpod.serverless.utils import rp_ssrf  # imported here: its first import takes ~2 s, not inside timed tests

from inference import fetch as fetch_module
from inference.errors import ErrorCode, ServiceError
from inference.cache_layout import id_slug
from inference.fetch import FetchError
from inference.lora_store import LoraStore
from inference.sources import fetch_to_file
from tests import servers
from tests.servers import FileServer, S3Server

KEYS = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]


def lora_bytes(seed: int = 0, width: int = 64, rank: int = 4) -> bytes:
    """A small real safetensors file with LoRA-style keys; different seeds give different bytes."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in KEYS:
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, width, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.randn(width, rank, generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(tensors, str(path))
        return path.read_bytes()


GOOD = lora_bytes(0)
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


def torch_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer)
    return buffer.getvalue()


def tar_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def empty_safetensors(tmp_path: Path) -> bytes:
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    return path.read_bytes()


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def www(tmp_path):
    """A loopback file server with one good LoRA at /good.safetensors."""
    root = tmp_path / "www"
    root.mkdir()
    with FileServer(root) as server:
        server.add("good.safetensors", GOOD)
        yield server


@pytest.fixture
def make_store(tmp_path):
    def make(cache: str = "cache", **kwargs) -> LoraStore:
        options = dict(max_cache_bytes=1 << 30, max_lora_bytes=1 << 20, allow_private_urls=True, timeout_s=5.0)
        options.update(kwargs)
        return LoraStore(tmp_path / cache, **options)

    return make


@pytest.fixture
def store(make_store):
    return make_store()


def snapshot(store: LoraStore) -> set[str]:
    """Every file under the cache dir: entries, id records, lock files (which leave with their fetch)."""
    return {str(p.relative_to(store.cache_dir)) for p in store.cache_dir.rglob("*") if p.is_file()}


def tmp_files(store: LoraStore) -> list[str]:
    return sorted(p.name for p in (store.cache_dir / ".tmp").iterdir())


def fails(store: LoraStore, code: ErrorCode, *args, **kwargs) -> ServiceError:
    """Call store.fetch, expect ServiceError(code), and check the cache is exactly as before."""
    before = snapshot(store)
    with pytest.raises(ServiceError) as err:
        store.fetch(*args, **kwargs)
    assert err.value.code == code, err.value
    assert snapshot(store) == before, "a failed fetch must not leave anything in the cache"
    assert tmp_files(store) == []
    return err.value


def loopback_alias_available(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


# -- download, cache hits, sha256 ------------------------------------------------------------------


def test_download_then_disk_hit(store, www):
    first = store.fetch("char-1", www.url("good.safetensors"))
    second = store.fetch("char-1", www.url("good.safetensors"))
    assert (first.source, second.source) == ("download", "disk")
    assert first.path == second.path and first.path.parent == store.cache_dir
    assert first.path.read_bytes() == GOOD and first.size == len(GOOD) and first.sha256 == GOOD_SHA
    assert first.path.name == f"{GOOD_SHA}.safetensors", "named by its content"
    assert www.hits["/good.safetensors"] == 1
    assert snapshot(store) == {f"{GOOD_SHA}.safetensors", f".ids/{id_slug('char-1')}.json"}, "no lock file left"
    assert [(e.lora_id, e.sha256, e.source) for e in store.entries()] == [("char-1", GOOD_SHA, "disk")]


def test_expected_sha256_matches_case_insensitively_and_keys_the_cache(store, www):
    lora = store.fetch("a", www.url("good.safetensors"), GOOD_SHA.upper())
    assert lora.sha256 == GOOD_SHA and lora.source == "download"
    assert store.fetch("a", www.url("good.safetensors"), GOOD_SHA).source == "disk"
    assert store.fetch("a", www.url("good.safetensors")).source == "disk"  # no sha: any file for the id
    assert www.hits["/good.safetensors"] == 1


def test_sha256_mismatch_is_invalid_and_not_cached(store, www):
    error = fails(store, ErrorCode.LORA_INVALID, "b", www.url("good.safetensors"), "ab" * 32)
    assert error.message == f"sha256 mismatch: expected {'ab' * 32}, got {GOOD_SHA}"


def test_a_cached_id_with_another_expected_sha256_is_fetched_again(store, www):
    store.fetch("a", www.url("good.safetensors"))
    fails(store, ErrorCode.LORA_INVALID, "a", www.url("good.safetensors"), "cd" * 32)
    assert www.hits["/good.safetensors"] == 2, "an expected sha256 that is not cached must not be a hit"


@pytest.mark.parametrize("bad", ["abc", "../../etc/passwd" + "0" * 48, "g" * 64])
def test_malformed_sha256_is_refused_before_any_request(store, www, bad):
    fails(store, ErrorCode.INVALID_REQUEST, "a", www.url("good.safetensors"), bad)
    assert www.hits["/good.safetensors"] == 0


def test_ids_never_collide_on_disk(store, www):
    ids = ["team/char", "team_char", "team:char", "../x", "", "a\nb"]
    ids += [f"{id_slug('plain')}-{GOOD_SHA}", GOOD_SHA, f"{GOOD_SHA}.safetensors"]  # crafted like file names
    for n, lora_id in enumerate(ids):
        www.add(f"{n}.safetensors", lora_bytes(seed=n + 1))
    paths = {store.fetch(lora_id, www.url(f"{n}.safetensors")).path for n, lora_id in enumerate(ids)}
    assert len(paths) == len(ids) and all(p.parent == store.cache_dir for p in paths)
    # Each id hits its own file, and an id that looks like a file name names nothing but itself.
    for n, lora_id in enumerate(ids):
        again = store.fetch(lora_id, www.url(f"{n}.safetensors"))
        assert again.source == "disk" and again.path.read_bytes() == lora_bytes(seed=n + 1)
    assert store.fetch("plain", www.url("good.safetensors")).source == "download"
    assert {e.lora_id for e in store.entries()} == set(ids) | {"plain"}


# -- not a safetensors LoRA -> lora_invalid --------------------------------------------------------


@pytest.mark.parametrize("name, make, needle", [
    ("garbage", lambda tmp: b"\x13\x37" * 500, "not a readable safetensors file"),
    ("pickle", lambda tmp: pickle.dumps({"weights": list(range(100))}), "pickle checkpoint"),
    ("torch-save", lambda tmp: torch_checkpoint(), "pickle checkpoint"),
    ("truncated", lambda tmp: GOOD[: len(GOOD) - 100], "truncated or corrupt"),
    ("truncated-header", lambda tmp: GOOD[:20], "truncated or corrupt"),
    ("empty-file", lambda tmp: b"", "the file is empty"),
    ("no-tensors", empty_safetensors, "holds no tensors"),
    ("html", lambda tmp: b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML page"),
    ("tar-without-lora", lambda tmp: tar_of("weights.safetensors", GOOD), "no lora.safetensors"),
    ("gzip-garbage", lambda tmp: gzip.compress(b"not a tar" * 100), "not a readable tar archive"),
])
def test_unreadable_files_are_invalid_and_never_cached(store, www, tmp_path, name, make, needle):
    url = www.add(f"{name}.safetensors", make(tmp_path))
    error = fails(store, ErrorCode.LORA_INVALID, "x", url)
    assert needle in error.message
    assert "Traceback" not in error.message


def test_pickle_is_never_unpickled(store, www, monkeypatch):
    """A pickle whose loading would run code: the store must reject it without calling pickle or torch.load."""
    marker = Path(store.cache_dir) / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the store tried to unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    url = www.add("exploit.safetensors", pickle.dumps(Exploit()))
    fails(store, ErrorCode.LORA_INVALID, "x", url)
    assert not marker.exists()


# -- cannot fetch -> lora_download_failed ----------------------------------------------------------


def test_404_is_download_failed_with_the_status(store, www):
    error = fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "x", www.url("missing.safetensors"))
    assert "HTTP 404" in error.message


def test_connection_closed_before_content_length_is_complete(store, www):
    www.behave["/good.safetensors"] = servers.close_half_way
    error = fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "x", www.url("good.safetensors"))
    assert "closed" in error.message


def test_a_stalled_server_times_out(make_store, www):
    store = make_store(timeout_s=0.5)
    www.behave["/good.safetensors"] = servers.stall(5)
    started = time.monotonic()
    error = fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "x", www.url("good.safetensors"))
    assert time.monotonic() - started < 3
    assert "timed out" in error.message


def test_a_slow_drip_is_cut_off_by_the_overall_deadline(make_store, www):
    """A byte every 50 ms never trips the 2 s read timeout; only the 0.6 s deadline can stop it."""
    store = make_store(timeout_s=2.0, deadline_s=0.6)
    www.behave["/good.safetensors"] = servers.drip(0.05, chunk=1, total_s=8)
    started = time.monotonic()
    error = fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "x", www.url("good.safetensors"))
    elapsed = time.monotonic() - started
    assert 0.5 < elapsed < 2.0, elapsed
    assert "took longer than 0.6 s" in error.message


@pytest.mark.parametrize("with_length", [True, False])
def test_more_than_max_lora_bytes_is_refused(make_store, www, with_length):
    store = make_store(max_lora_bytes=len(GOOD) - 1)
    if not with_length:
        www.behave["/good.safetensors"] = servers.no_content_length
    error = fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "x", www.url("good.safetensors"))
    assert ("more than" if with_length else "larger than") in error.message


def test_exactly_max_lora_bytes_is_accepted(make_store, www):
    www.behave["/good.safetensors"] = servers.no_content_length
    assert make_store(max_lora_bytes=len(GOOD)).fetch("x", www.url("good.safetensors")).size == len(GOOD)


@pytest.mark.parametrize("url, needle", [
    ("ftp://example.com/x.safetensors", "unsupported LoRA URL"),
    ("hf://org/repo/x.safetensors", "unsupported LoRA URL"),
    ("/etc/passwd", "local files are not accepted"),
    ("file:///etc/passwd", "local files are not accepted"),
])
def test_unsupported_sources_are_download_failed(store, url, needle):
    assert needle in fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "x", url).message


def test_too_many_redirects(store, www):
    www.behave["/loop"] = servers.redirect_to("/loop")
    error = fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "x", www.url("loop"))
    assert "more than 5 redirects" in error.message
    assert www.hits["/loop"] == 6  # the first request and five redirects followed


# -- SSRF guard ------------------------------------------------------------------------------------


def test_loopback_is_refused_unless_private_urls_are_allowed(make_store, www):
    guarded = make_store("guarded", allow_private_urls=False)
    error = fails(guarded, ErrorCode.LORA_DOWNLOAD_FAILED, "x", www.url("good.safetensors"))
    assert "non-public address 127.0.0.1" in error.message
    assert www.hits["/good.safetensors"] == 0, "a refused URL must not be contacted at all"
    assert make_store("open", allow_private_urls=True).fetch("x", www.url("good.safetensors")).source == "download"


def test_every_redirect_hop_is_checked(make_store, www, tmp_path, monkeypatch):
    """With is_safe_address patched so that 127.0.0.1 counts as public and nothing else does, a
    redirect to a server on 127.0.0.2 (another loopback address, reachable) must be refused
    before it is contacted, while a redirect that stays on 127.0.0.1 is followed."""
    if not loopback_alias_available("127.0.0.2"):
        pytest.skip("127.0.0.2 is not bindable here")
    (tmp_path / "inner").mkdir()
    with FileServer(tmp_path / "inner", host="127.0.0.2") as inner:
        inner.add("good.safetensors", GOOD)
        # The target is reachable: only the guard can stop the redirect.
        assert make_store("open").fetch("direct", inner.url("good.safetensors")).source == "download"
        inner.reset_counts()

        monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip == "127.0.0.1")
        guarded = make_store("guarded", allow_private_urls=False)
        www.behave["/same-host"] = servers.redirect_to("/good.safetensors", code=301)
        www.behave["/to-inner"] = servers.redirect_to(inner.url("good.safetensors"), code=307)
        assert guarded.fetch("ok", www.url("same-host")).source == "download"
        error = fails(guarded, ErrorCode.LORA_DOWNLOAD_FAILED, "x", www.url("to-inner"))
        assert "non-public address 127.0.0.2" in error.message
        assert www.hits["/to-inner"] == 1 and inner.hits["/good.safetensors"] == 0


def test_a_redirect_to_another_scheme_is_refused(make_store, www):
    www.behave["/to-file"] = servers.redirect_to("file:///etc/passwd")
    error = fails(make_store(), ErrorCode.LORA_DOWNLOAD_FAILED, "x", www.url("to-file"))
    assert "only http and https" in error.message


def test_the_connection_is_pinned_to_the_checked_address(make_store, www, monkeypatch):
    """`lora.invalid` cannot resolve in real DNS (.invalid is reserved): the fetch only works if the
    connection dials the address our (patched) resolver returned, while the Host header keeps the name."""
    calls = []

    def fake_resolve(host, port):
        calls.append(host)
        return ["127.0.0.1"] if host == "lora.invalid" else []

    monkeypatch.setattr(fetch_module, "resolve", fake_resolve)
    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip == "127.0.0.1")
    url = f"http://lora.invalid:{www.port}/good.safetensors"
    assert make_store(allow_private_urls=False).fetch("x", url).path.read_bytes() == GOOD
    assert calls == ["lora.invalid"]
    assert www.requests[-1].headers["Host"] == f"lora.invalid:{www.port}"


def test_https_keeps_sni_and_certificate_checks_while_pinned(make_store, tmp_path, monkeypatch):
    """TLS to a pinned address still verifies the certificate against the URL's host name: the
    test CA's certificate is for lora.invalid only; other.invalid resolves (patched) to the same address."""
    pytest.importorskip("cryptography")
    from tests.servers import make_tls_files

    tls = make_tls_files(tmp_path / "tls", hostnames=("lora.invalid",), ips=())
    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: ["127.0.0.1"])
    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip == "127.0.0.1")
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    store = make_store(allow_private_urls=False)
    with FileServer(tmp_path / "tls", tls=tls) as server:
        server.add("good.safetensors", GOOD)
        url = f"https://lora.invalid:{server.port}/good.safetensors"
        error = fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "x", url)  # the system trust store lacks our CA
        assert "TLS certificate verification failed" in error.message
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.ca))
        assert store.fetch("x", url).path.read_bytes() == GOOD
        assert server.requests[-1].headers["Host"] == f"lora.invalid:{server.port}"
        error = fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "y",
                      f"https://other.invalid:{server.port}/good.safetensors")
        assert "TLS certificate is not for this host" in error.message
        assert server.hits["/good.safetensors"] == 1


def test_a_host_with_any_private_address_is_refused(make_store, www, monkeypatch):
    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: ["127.0.0.1", "10.1.2.3"])
    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip == "127.0.0.1")
    error = fails(make_store(allow_private_urls=False), ErrorCode.LORA_DOWNLOAD_FAILED, "x",
                  f"http://mixed.invalid:{www.port}/good.safetensors")
    assert "10.1.2.3" in error.message and www.hits["/good.safetensors"] == 0


@pytest.mark.parametrize("address", ["169.254.169.254", "10.0.0.1", "::1", "::ffff:127.0.0.1", "fd00:ec2::254",
                                     "100.64.0.1", "2002:a9fe:a9fe::1"])
def test_non_public_addresses_are_refused_before_connecting(make_store, monkeypatch, address):
    """The resolver is patched to answer each address for a made-up host; nothing is dialled (the
    request would fail differently if it were). 2002:a9fe:a9fe:: is 6to4 for 169.254.169.254, which
    rp_ssrf.is_safe_address alone lets through."""
    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: [address])
    error = fails(make_store(allow_private_urls=False), ErrorCode.LORA_DOWNLOAD_FAILED, "x",
                  "http://metadata.invalid/latest/meta-data/")
    assert f"non-public address {address}" in error.message


def test_proxy_environment_variables_are_ignored(store, www, monkeypatch):
    """A proxy would dial the host by name and defeat the pin; port 9 on loopback refuses connections."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    assert store.fetch("x", www.url("good.safetensors")).source == "download"
    assert www.hits["/good.safetensors"] == 1


# -- fetch_to_file itself (LoRA-agnostic) ----------------------------------------------------------


def test_fetch_errors_say_refused_or_failed(www):
    sink = io.BytesIO()
    with pytest.raises(FetchError) as refused:
        fetch_to_file(www.url("good.safetensors"), sink, allow_private=False, max_bytes=1 << 20, timeout_s=5)
    assert refused.value.kind == "refused" and refused.value.refused
    with pytest.raises(FetchError) as failed:
        fetch_to_file(www.url("nope"), sink, allow_private=True, max_bytes=1 << 20, timeout_s=5)
    assert (failed.value.kind, failed.value.status) == ("failed", 404)
    with pytest.raises(FetchError) as too_big:
        fetch_to_file(www.url("good.safetensors"), sink, allow_private=True, max_bytes=10, timeout_s=5)
    assert too_big.value.kind == "refused"
    assert sink.getvalue() == b""
    assert fetch_to_file(www.url("good.safetensors"), sink, allow_private=True, max_bytes=1 << 20, timeout_s=5) \
        == len(GOOD)
    assert sink.getvalue() == GOOD


def test_query_strings_never_appear_in_messages(make_store, www):
    """Presigned URLs carry credentials in the query string."""
    error = fails(make_store(allow_private_urls=False), ErrorCode.LORA_DOWNLOAD_FAILED, "x",
                  www.url("good.safetensors?X-Amz-Signature=secret123"))
    assert "secret123" not in error.message
    error = fails(make_store(), ErrorCode.LORA_DOWNLOAD_FAILED, "x", www.url("missing?X-Amz-Signature=secret123"))
    assert "secret123" not in error.message


# -- s3 --------------------------------------------------------------------------------------------


def test_s3_source_through_moto(make_store, monkeypatch):
    import inference.sources as sources_module

    created = []
    real_make = sources_module.make_s3_client

    def counting_make(*args, **kwargs):
        created.append(args)
        return real_make(*args, **kwargs)

    monkeypatch.setattr(sources_module, "make_s3_client", counting_make)
    with S3Server(monkeypatch) as s3:
        url = s3.put("loras", "chars/a b?#.safetensors", GOOD)  # the key is taken literally
        s3.put("loras", "big.safetensors", b"\0" * ((1 << 20) + 1))
        s3.put("loras", "garbage.safetensors", b"\x00" * 100)
        store = make_store(allow_private_urls=False, s3_endpoint_url=s3.endpoint)
        lora = store.fetch("a", url)
        assert lora.source == "download" and lora.path.read_bytes() == GOOD
        assert store.fetch("a", url).source == "disk"
        assert "not found" in fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "b", "s3://loras/missing").message
        assert "not found" in fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "b", "s3://nobucket/k").message
        assert "more than" in fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "c", "s3://loras/big.safetensors").message
        fails(store, ErrorCode.LORA_INVALID, "d", "s3://loras/garbage.safetensors")
        fails(store, ErrorCode.LORA_DOWNLOAD_FAILED, "e", "s3://loras")
    assert created == [(s3.endpoint,)], "one boto3 client per store, created lazily"


# -- local paths -----------------------------------------------------------------------------------


def test_local_paths_only_when_allowed(make_store, tmp_path):
    source = tmp_path / "dir with space" / "local.safetensors"
    source.parent.mkdir()
    source.write_bytes(GOOD)
    service = make_store("service")
    fails(service, ErrorCode.LORA_DOWNLOAD_FAILED, "x", str(source))
    fails(service, ErrorCode.LORA_DOWNLOAD_FAILED, "x", source.as_uri())
    cli = make_store("cli", allow_local_paths=True)
    assert cli.fetch("x", str(source)).path.read_bytes() == GOOD
    assert cli.fetch("y", source.as_uri()).source == "download"
    assert "no such file" in fails(cli, ErrorCode.LORA_DOWNLOAD_FAILED, "z", str(tmp_path / "nope")).message
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"junk" * 10)
    fails(cli, ErrorCode.LORA_INVALID, "g", str(garbage))


# -- disk cache: LRU and stale temp files -----------------------------------------------------------


def test_disk_cache_evicts_least_recently_used_within_its_cap(make_store, www):
    for seed in range(4):
        www.add(f"l{seed}.safetensors", lora_bytes(seed=seed))
    size = len(lora_bytes(seed=0))
    store = make_store(max_cache_bytes=int(size * 2.5))
    store.fetch("l0", www.url("l0.safetensors"))
    store.fetch("l1", www.url("l1.safetensors"))
    assert store.fetch("l0", www.url("l0.safetensors")).source == "disk"  # l0 is now more recent than l1
    store.fetch("l2", www.url("l2.safetensors"))
    entries = store.entries()
    assert sum(e.size for e in entries) <= store.max_cache_bytes
    assert [e.lora_id for e in entries] == ["l2", "l0"]  # most recent first; l1 was evicted
    assert store.fetch("l1", www.url("l1.safetensors")).source == "download"
    assert {e.lora_id for e in store.entries()} == {"l1", "l2"}


def test_a_file_larger_than_the_cache_cap_is_served_and_kept_alone(make_store, www):
    www.add("small.safetensors", lora_bytes(seed=1, width=8))
    store = make_store(max_cache_bytes=len(GOOD) - 1)
    store.fetch("small", www.url("small.safetensors"))
    big = store.fetch("big", www.url("good.safetensors"))
    assert big.path.read_bytes() == GOOD
    assert [e.lora_id for e in store.entries()] == ["big"]


def test_partials_are_swept_at_init_unless_a_live_download_holds_their_lock(tmp_path):
    """Left by a killed process: removed at the next start. Still being written (its LoRA's file lock
    held, as by a download in another worker on a shared volume): kept, whatever its age."""
    from inference.file_lock import RemovableFileLock

    tmp_dir = tmp_path / "cache" / ".tmp"
    tmp_dir.mkdir(parents=True)
    (tmp_path / "cache" / ".locks").mkdir()
    orphan, live = tmp_dir / f"{id_slug('killed')}-abc.part", tmp_dir / f"{id_slug('live')}-def.part"
    orphan.write_bytes(b"x")
    live.write_bytes(b"y")
    two_hours_ago = time.time() - 7200
    os.utime(live, (two_hours_ago, two_hours_ago))
    live_lock = RemovableFileLock(tmp_path / "cache" / ".locks" / f"{id_slug('live')}.lock")
    assert live_lock.acquire(timeout=0)
    LoraStore(tmp_path / "cache", max_cache_bytes=1 << 20, max_lora_bytes=1 << 20)
    live_lock.release()
    assert not orphan.exists() and live.exists()
    LoraStore(tmp_path / "cache", max_cache_bytes=1 << 20, max_lora_bytes=1 << 20)
    assert not live.exists(), "its lock free: nobody is writing it any more"
    assert list((tmp_path / "cache" / ".locks").iterdir()) == [], "free lock files go too"


# -- content addressing and LoRA identity ---------------------------------------------------------


def test_two_ids_with_the_same_bytes_share_one_file(store, www):
    www.add("copy.safetensors", GOOD)
    first = store.fetch("char-a", www.url("good.safetensors"))
    second = store.fetch("char-b", www.url("copy.safetensors"))
    assert second.source == "download" and first.path == second.path
    assert [p.name for p in store.cache_dir.glob("*.safetensors")] == [f"{GOOD_SHA}.safetensors"]
    assert sorted((e.lora_id, e.sha256) for e in store.entries()) == [("char-a", GOOD_SHA), ("char-b", GOOD_SHA)]
    # With its sha256, a third id is a hit on that content without any download.
    assert store.fetch("char-c", www.url("elsewhere.safetensors"), GOOD_SHA).source == "disk"
    assert store.fetch("char-c", www.url("elsewhere.safetensors")).source == "disk", "its record now names it"
    assert www.hits["/elsewhere.safetensors"] == 0


def test_an_id_pointed_at_another_url_is_fetched_again(store, www):
    """Without sha256 the id's record remembers its URL: another URL is contacted and its weights
    served; the old content stays cached for whoever asks for it by sha256."""
    new_bytes = lora_bytes(seed=7)
    www.add("v2.safetensors", new_bytes)
    assert store.fetch("char", www.url("good.safetensors")).path.read_bytes() == GOOD
    moved = store.fetch("char", www.url("v2.safetensors"))
    assert moved.source == "download" and moved.path.read_bytes() == new_bytes
    assert www.hits["/v2.safetensors"] == 1
    assert store.fetch("char", www.url("v2.safetensors")).source == "disk"
    assert store.fetch("other", www.url("x"), GOOD_SHA).source == "disk", "v1 is still cached by content"
    back = store.fetch("char", www.url("good.safetensors"))
    assert back.source == "download" and back.path.read_bytes() == GOOD, "back to v1: asked again, not assumed"
    assert www.hits == {"/good.safetensors": 2, "/v2.safetensors": 1}


def test_a_refused_fetch_leaves_no_record_and_no_lock(store, www):
    www.add("garbage.safetensors", b"\x13\x37" * 500)
    for lora_id, url in (("bad", www.url("garbage.safetensors")), ("gone", www.url("missing.safetensors"))):
        with pytest.raises(ServiceError):
            store.fetch(lora_id, url)
    assert snapshot(store) == set()


def test_discard_and_eviction_take_the_ids_records_with_the_entry(make_store, www):
    www.add("copy.safetensors", GOOD)
    www.add("other.safetensors", lora_bytes(seed=3))
    store = make_store(max_cache_bytes=len(GOOD) + 10)
    lora = store.fetch("a", www.url("good.safetensors"))
    store.fetch("b", www.url("copy.safetensors"))
    store.discard(lora)
    assert snapshot(store) == set(), "the entry and both ids naming it"
    store.fetch("a", www.url("good.safetensors"))
    store.fetch("c", www.url("other.safetensors"))  # over the cap: a's entry goes, and a's record with it
    assert snapshot(store) == {f"{hashlib.sha256(lora_bytes(seed=3)).hexdigest()}.safetensors",
                               f".ids/{id_slug('c')}.json"}


@pytest.mark.parametrize("removed", ["cache_dir", ".tmp", ".locks", ".ids", "contents"])
def test_a_cache_directory_that_disappears_is_created_again(store, www, removed):
    """A network volume remounted or an operator's rm: the next fetch re-creates what it needs and
    downloads the file again; nothing answers FileNotFoundError."""
    import shutil

    store.fetch("a", www.url("good.safetensors"))
    if removed == "contents":
        for path in store.cache_dir.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        shutil.rmtree(store.cache_dir if removed == "cache_dir" else store.cache_dir / removed)
    assert store.partials() == (0, 0)
    lora = store.fetch("a", www.url("good.safetensors"))
    expected = "disk" if removed in (".tmp", ".locks") else "download"
    assert lora.source == expected and lora.path.read_bytes() == GOOD
    assert store.fetch("b", www.url("good.safetensors")).path == lora.path
    assert {p.name for p in store.cache_dir.iterdir() if p.is_dir()} == {".tmp", ".locks", ".ids"}
    assert sorted(e.lora_id for e in store.entries()) == ["a", "b"]


def test_a_cache_emptied_during_a_download_fetches_once_more(store, www):
    """The directory vanishes while the file is on the wire (before the rename into the cache)."""
    import shutil

    def empty_the_cache_then_answer(handler, body):
        if www.hits["/good.safetensors"] == 1:
            shutil.rmtree(store.cache_dir)
        servers.send(handler, 200, body)

    www.behave["/good.safetensors"] = empty_the_cache_then_answer
    lora = store.fetch("a", www.url("good.safetensors"))
    assert lora.path.read_bytes() == GOOD and www.hits["/good.safetensors"] == 2
    assert store.fetch("a", www.url("good.safetensors")).source == "disk"


def test_a_lock_file_removed_under_a_waiter_is_not_held_twice(tmp_path, monkeypatch):
    """The race a removable lock file opens, run on purpose: the waiter has opened the file when its
    holder removes it and a newcomer locks a new one; the waiter then gets the removed file's lock,
    and must see that it holds nothing."""
    import fcntl

    from inference.file_lock import RemovableFileLock

    path = tmp_path / "x.lock"
    newcomer = RemovableFileLock(path)
    real_flock, swapped = fcntl.flock, []

    def flock(fd, operation):
        if not swapped:
            swapped.append(fd)
            path.unlink()  # the holder let go, removing the file the waiter has open
            assert newcomer.acquire(timeout=0)  # and a newcomer created and locked a new one
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    waiter = RemovableFileLock(path)
    assert not waiter.acquire(timeout=0.2), "two holders of one lock"
    newcomer.release()
    assert not path.exists(), "released: the file is gone"
    assert waiter.acquire(timeout=0) and path.exists()
    assert not RemovableFileLock(path).acquire(timeout=0)
    waiter.release()


def test_from_settings_maps_the_environment(tmp_path, monkeypatch):
    from inference.settings import Settings

    monkeypatch.setenv("SDXL_LORA_LORA_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("SDXL_LORA_LORA_CACHE_MAX_BYTES", "12345")
    monkeypatch.setenv("SDXL_LORA_MAX_LORA_BYTES", "678")
    monkeypatch.setenv("SDXL_LORA_ALLOW_PRIVATE_URLS", "true")
    monkeypatch.setenv("SDXL_LORA_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    store = LoraStore.from_settings(Settings(), allow_local_paths=True)
    assert (store.cache_dir, store.max_cache_bytes, store.max_lora_bytes) == (tmp_path / "env-cache", 12345, 678)
    assert store.allow_private_urls and store.allow_local_paths and store.s3_endpoint_url == "http://127.0.0.1:1"
    assert (tmp_path / "env-cache" / ".tmp").is_dir()


# -- concurrency -----------------------------------------------------------------------------------


@pytest.mark.parametrize("file_lock", ["real", "disabled"])
def test_two_threads_fetch_a_new_lora_once(store, www, monkeypatch, file_lock):
    """Within one process the per-LoRA thread lock alone must suffice ("disabled" replaces the
    cross-process file lock by a no-op; flock would otherwise serialize the threads too)."""
    if file_lock == "disabled":
        import inference.lora_store as lora_store

        class NoLock:
            def __init__(self, *args, **kwargs):
                pass

            def acquire(self, *args, **kwargs):
                return True

            def release(self, *args, **kwargs):
                pass

        monkeypatch.setattr(lora_store, "RemovableFileLock", NoLock)
    www.behave["/good.safetensors"] = servers.slow_ok(0.5)
    barrier = threading.Barrier(2)
    results, errors = [], []

    def worker():
        barrier.wait()
        try:
            results.append(store.fetch("t", www.url("good.safetensors")))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert www.hits["/good.safetensors"] == 1
    assert len({r.path for r in results}) == 1 and sorted(r.source for r in results) == ["disk", "download"]


def test_different_loras_download_in_parallel(store, www):
    for name in ("p", "q"):
        www.add(f"{name}.safetensors", lora_bytes(seed=ord(name)))
        www.behave[f"/{name}.safetensors"] = servers.slow_ok(0.6)
    started = time.monotonic()
    threads = [threading.Thread(target=store.fetch, args=(name, www.url(f"{name}.safetensors"))) for name in "pq"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert time.monotonic() - started < 1.1, "two different LoRAs must not wait for each other"
    assert {e.lora_id for e in store.entries()} == {"p", "q"}


def _fetch_in_process(cache_dir, url, barrier, queue):
    store = LoraStore(cache_dir, max_cache_bytes=1 << 30, max_lora_bytes=1 << 20, allow_private_urls=True)
    barrier.wait(timeout=60)  # both processes are ready: the fetches really overlap
    lora = store.fetch("shared", url)
    queue.put((str(lora.path), lora.source))


def test_two_processes_sharing_the_cache_fetch_a_new_lora_once(tmp_path, www):
    www.behave["/good.safetensors"] = servers.slow_ok(1.0)
    ctx = multiprocessing.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_fetch_in_process,
                         args=(tmp_path / "shared", www.url("good.safetensors"), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert www.hits["/good.safetensors"] == 1
    assert len({path for path, _ in results}) == 1
    assert sorted(source for _, source in results) == ["disk", "download"]
