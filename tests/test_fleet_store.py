"""The fleet's idempotency store (inference/idempotency_stores.py) on its two backends
(idempotency_backends.py), the cache volume's folder and S3 (moto's server, real boto3), with two or
three store objects standing for workers; and the memory store's bounds (issue 32)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time

import pytest

from inference.errors import ErrorCode, ServiceError
from inference.idempotency import MemoryStore, answer_size
from inference.idempotency_backends import S3Backend, VolumeBackend
from inference.idempotency_stores import SharedStore, store_from_settings
from inference.settings import Settings
from tests.servers import S3Server
from tests.test_idempotency import OTHER, REQUEST, answer

HOSTILE_KEYS = ["../x", "%2e%2e/", "x" * 200, "~!{}*?<>|\\\"'", "..", "/etc/passwd", "a/../../b"]


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.client().create_bucket(Bucket="keys")
        yield server


@pytest.fixture(params=["volume", "s3"])
def backend(request, tmp_path):
    """A fresh backend per test; each store built on it is one worker."""
    if request.param == "volume":
        return VolumeBackend(tmp_path / "sdxl-lora" / "idempotency")
    server = request.getfixturevalue("s3")
    return S3Backend(server.client(), "keys", f"run-{time.monotonic_ns()}/idempotency/")


def backend_record(backend, response) -> bytes:
    """What a kept answer takes in the store: its header line and the answer."""
    store = worker(backend)
    claim = store.claim("measure", REQUEST)
    store.keep(claim, response)
    data = backend.read(hashlib.sha256(b"measure").hexdigest())
    backend.delete(hashlib.sha256(b"measure").hexdigest())
    return data


WORKERS: list[SharedStore] = []


@pytest.fixture(autouse=True)
def close_workers():
    """A store left with a claim (a "dead" worker) would poll its backend after the test's server stopped."""
    yield
    while WORKERS:
        WORKERS.pop().close()


def worker(backend, ttl_s: float = 3600, max_bytes: int = 10**6, lease_s: float = 5.0) -> SharedStore:
    WORKERS.append(SharedStore(backend, ttl_s, max_bytes, lease_s, poll_s=0.05))
    return WORKERS[-1]


def test_a_key_kept_by_one_worker_is_replayed_by_another_and_its_waiter_gets_it(backend):
    one, two = worker(backend), worker(backend)
    first = one.claim("clip-1", REQUEST)
    waiting = two.claim("clip-1", REQUEST)
    assert first.first and not waiting.first
    with pytest.raises(ServiceError) as refused:
        two.claim("clip-1", OTHER)
    assert refused.value.code == ErrorCode.INVALID_REQUEST
    one.keep(first, answer("aaaa"))
    assert waiting.outcome.result(timeout=10) == answer("aaaa")
    replay = two.claim("clip-1", REQUEST)
    assert not replay.first and replay.outcome.result(timeout=0) == answer("aaaa")
    with pytest.raises(ServiceError):
        two.claim("clip-1", OTHER)


def test_twins_claimed_at_once_on_three_workers_have_one_first(backend):
    stores = [worker(backend) for _ in range(3)]
    claims: list = []
    barrier = threading.Barrier(3)

    def claim(store):
        barrier.wait()
        claims.append(store.claim("twin", REQUEST))

    threads = [threading.Thread(target=claim, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(c.first for c in claims) == [False, False, True]
    first = next(c for c in claims if c.first)
    next(store for store in stores if first in store._mine.values()).drop(first)


def test_a_dropped_claim_lets_the_waiter_claim_and_render(backend):
    one, two = worker(backend), worker(backend)
    first = one.claim("k", REQUEST)
    waiting = two.claim("k", REQUEST)
    one.drop(first)
    assert waiting.outcome.result(timeout=10) is None
    assert two.claim("k", REQUEST).first


def test_a_dead_workers_claim_expires_after_its_lease_and_one_worker_takes_it(backend):
    dead = worker(backend, lease_s=0.5)
    dead.claim("k", REQUEST)
    dead._mine.clear()  # the process died: nothing renews its lease any more
    two, three = worker(backend), worker(backend)
    waits = [two.claim("k", REQUEST), three.claim("k", REQUEST)]
    assert all(w.outcome.result(timeout=10) is None for w in waits)
    again = [two.claim("k", REQUEST), three.claim("k", REQUEST)]
    assert sorted(c.first for c in again) == [False, True]
    (two if again[0].first else three).drop(next(c for c in again if c.first))


def test_a_rendering_workers_lease_is_renewed_past_its_length(backend):
    one, two = worker(backend, lease_s=0.3), worker(backend)
    first = one.claim("k", REQUEST)
    time.sleep(1.0)  # three leases: renewed meanwhile
    waiting = two.claim("k", REQUEST)
    assert not waiting.first
    one.keep(first, answer("aaaa"))
    assert waiting.outcome.result(timeout=10) == answer("aaaa")


class TakenOverAfterRead:
    """The backend as a stalled worker sees it: right after its read, another worker takes the key over."""

    def __init__(self, backend, take_over):
        self.backend, self.take_over = backend, take_over

    def read_versioned(self, name):
        found = self.backend.read_versioned(name)
        self.take_over()
        return found

    def __getattr__(self, attribute):
        return getattr(self.backend, attribute)


def stalled_past_its_lease(backend, lease_s: float = 0.3):
    """A worker holding "k" whose poller stopped (a stall), its lease run out."""
    stalled = worker(backend, lease_s=lease_s)
    claim = stalled.claim("k", REQUEST)
    stalled.close()
    time.sleep(lease_s + 0.1)
    return stalled, claim


def test_a_stalled_workers_renewal_never_overwrites_the_claim_taken_over_between_its_read_and_write(backend, caplog):
    stalled, _ = stalled_past_its_lease(backend)
    taker = worker(backend)
    taken: list = []
    stalled.backend = TakenOverAfterRead(backend, lambda: taken or taken.append(taker.claim("k", REQUEST)))
    stalled._renew()
    assert taken[0].first
    record = backend.read(hashlib.sha256(b"k").hexdigest())
    assert json.loads(record.partition(b"\n")[0])["owner"] == taker.owner
    assert "was taken over while this worker rendered it" in caplog.text
    stalled._renew()  # told once: the lost lease is not renewed again
    assert caplog.text.count("was taken over") == 1
    taker.keep(taken[0], answer("bbbb"))
    assert worker(backend).claim("k", REQUEST).outcome.result(timeout=0) == answer("bbbb")


def test_a_stalled_workers_drop_never_deletes_the_claim_taken_over_between_its_read_and_delete(backend):
    stalled, claim = stalled_past_its_lease(backend)
    taker = worker(backend)
    taken: list = []
    stalled.backend = TakenOverAfterRead(backend, lambda: taken or taken.append(taker.claim("k", REQUEST)))
    stalled.drop(claim)
    assert taken[0].first
    waiting = worker(backend).claim("k", REQUEST)
    assert not waiting.first  # the taker's claim is still there
    taker.keep(taken[0], answer("bbbb"))
    assert waiting.outcome.result(timeout=10) == answer("bbbb")


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_keys_are_stored_under_their_hash_never_as_written(tmp_path, key):
    folder = tmp_path / "volume" / "idempotency"
    store = worker(VolumeBackend(folder))
    store.keep(store.claim(key, REQUEST), answer("aaaa"))
    assert [p.name for p in (tmp_path / "volume").iterdir()] == ["idempotency"]
    names = [p.name for p in folder.iterdir()]
    assert len(names) == 1 and re.fullmatch(r"[0-9a-f]{64}", names[0])
    assert store.claim(key, REQUEST).outcome.result(timeout=0) == answer("aaaa")


def test_hostile_keys_stay_under_the_prefix_on_s3(s3):
    backend = S3Backend(s3.client(), "keys", "hostile/idempotency/")
    store = worker(backend)
    for key in HOSTILE_KEYS:
        store.keep(store.claim(key, REQUEST), answer("aaaa"))
    listed = s3.client().list_objects_v2(Bucket="keys")["Contents"]
    keys = [item["Key"] for item in listed if item["Key"].startswith("hostile/")]
    assert len(keys) == len(HOSTILE_KEYS)
    assert all(re.fullmatch(r"hostile/idempotency/[0-9a-f]{64}", k) for k in keys)


def test_the_byte_cap_holds_across_workers_oldest_first_and_zero_keeps_nothing(backend):
    size = len(backend_record(backend, answer("aaaa")))
    one, two = worker(backend, max_bytes=2 * size), worker(backend, max_bytes=2 * size)
    for store, key in ((one, "a"), (two, "b"), (one, "c")):
        store.keep(store.claim(key, REQUEST), answer(key * 4))
        time.sleep(1.05 if isinstance(backend, S3Backend) else 0.05)  # distinct modification times (S3: seconds)
    assert sum(size for _, size, _ in backend.listing()) <= 2 * size
    assert two.claim("a", REQUEST).first  # the oldest went
    assert two.claim("c", REQUEST).outcome.result(timeout=0) == answer("cccc")

    nothing = worker(backend, max_bytes=0)
    first = nothing.claim("z", REQUEST)
    here, elsewhere = nothing.claim("z", REQUEST), worker(backend).claim("z", REQUEST)
    nothing.keep(first, answer("zzzz"))
    assert here.outcome.result(timeout=10) == answer("zzzz")  # a twin on the same worker still gets it
    assert elsewhere.outcome.result(timeout=10) is None  # nothing stored: another worker renders
    assert nothing.claim("z", REQUEST).first


def test_a_kept_answer_expires_after_its_ttl_on_every_worker(backend):
    one, two = worker(backend, ttl_s=1.0), worker(backend, ttl_s=1.0)
    one.keep(one.claim("k", REQUEST), answer("aaaa"))
    assert not two.claim("k", REQUEST).first
    time.sleep(1.1)
    renewed = two.claim("k", OTHER)
    assert renewed.first  # expired: a new body is a new request
    two.drop(renewed)


def test_auto_picks_s3_with_a_bucket_and_memory_off_runpod(tmp_path, s3, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    plain = Settings(lora_cache_dir=tmp_path / "loras")
    assert isinstance(store_from_settings(plain), MemoryStore)
    with_bucket = Settings(lora_cache_dir=tmp_path / "loras", s3_bucket="keys", s3_endpoint_url=s3.endpoint)
    assert isinstance(store_from_settings(with_bucket).backend, S3Backend)
    volume = Settings(lora_cache_dir=tmp_path / "v" / "loras", idempotency_store="volume")
    assert store_from_settings(volume).backend.directory == tmp_path / "v" / "idempotency"


# -- the memory store's bounds (issue 32) ------------------------------------------------------


def test_memory_store_holds_no_answer_past_its_cap_expiry_queue_included():
    size = answer_size(answer("aaaa"))
    store = MemoryStore(ttl_s=3600, max_bytes=2 * size)
    for n in range(500):
        store.keep(store.claim(f"k{n}", REQUEST), answer("aaaa"))
    assert len(store) == 2 and store.bytes == 2 * size
    assert len(store._expiry) <= 2 * len(store) + 17
    assert all(isinstance(item[1], str) for item in store._expiry)  # keys only, never an answer

    nothing = MemoryStore(ttl_s=3600, max_bytes=0)
    first = nothing.claim("k", REQUEST)
    waiting = nothing.claim("k", REQUEST)
    nothing.keep(first, answer("aaaa"))
    assert waiting.outcome.result(timeout=0) == answer("aaaa")
    assert len(nothing) == 0 and nothing.bytes == 0 and not nothing._expiry
