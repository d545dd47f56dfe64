"""Idempotent requests and the busy answer's Retry-After: the store on its own (an injected clock,
no sleeping), then the real app on loopback with the tiny synthetic model."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from api.app import create_app
from inference.backpressure import RETRY_AFTER_MESSAGE, ServiceTimes
from inference.deadline import Deadline
from inference.errors import ErrorCode, ServiceError
from inference.idempotency import MemoryStore as IdempotencyStore, check_key, request_hash
from inference.service import InferenceService
from inference.settings import Settings
from sdxl_lora_client.contract import GenerateRequest, GenerateResponse, ImageOut, ModelOut, Timings
from tests.fakes import LiveServer, wait_ready
from tests.servers import FileServer

# -- the store ---------------------------------------------------------------------------------


def answer(tag: str) -> GenerateResponse:
    """A response of a fixed size (the tag's length fixed by the callers)."""
    return GenerateResponse(images=[ImageOut(seed=1, width=64, height=64, mime="image/png", sha256=tag * 8,
                                             base64=tag * 100)],
                            loras=[], model=ModelOut(id="m", dtype="float32", device="cpu"), timings_ms=Timings())


REQUEST = GenerateRequest(prompt="a character portrait")
OTHER = GenerateRequest(prompt="another portrait")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def kept(store: IdempotencyStore, key: str, request: GenerateRequest = REQUEST) -> GenerateResponse | None:
    """What a repeat of `key` gets from the store now: the kept answer, or None when it would render."""
    claim = store.claim(key, request)
    if claim.first:
        store.drop(claim)
        return None
    return claim.outcome.result(timeout=0)


def test_a_kept_answer_lasts_the_ttl_and_no_longer():
    clock = Clock()
    store = IdempotencyStore(ttl_s=60, max_bytes=10**6, clock=clock)
    first = store.claim("job-1/clip-1", REQUEST)
    assert first.first
    store.keep(first, answer("aaaa"))
    clock.now += 59.9
    assert kept(store, "job-1/clip-1") == answer("aaaa")
    clock.now += 0.1
    assert kept(store, "job-1/clip-1") is None
    assert len(store) == 0 and store.bytes == 0


def test_past_the_byte_cap_the_least_recently_used_answers_go_first():
    size = len(answer("aaaa").model_dump_json(exclude_none=True))
    store = IdempotencyStore(ttl_s=3600, max_bytes=2 * size, clock=Clock())
    for key in ("a", "b"):
        store.keep(store.claim(key, REQUEST), answer(key * 4))
    assert kept(store, "a") == answer("aaaa")  # now b is the least recently used
    store.keep(store.claim("c", REQUEST), answer("cccc"))
    assert store.bytes == 2 * size
    assert kept(store, "b") is None
    assert kept(store, "a") == answer("aaaa") and kept(store, "c") == answer("cccc")

    too_big = IdempotencyStore(ttl_s=3600, max_bytes=size - 1, clock=Clock())
    too_big.keep(too_big.claim("a", REQUEST), answer("aaaa"))
    assert kept(too_big, "a") is None and too_big.bytes == 0


def test_another_body_under_a_key_is_invalid_request_and_spelling_does_not_count():
    store = IdempotencyStore(ttl_s=3600, max_bytes=10**6)
    running = store.claim("k", REQUEST)  # the first request is still running
    with pytest.raises(ServiceError) as refused:
        store.claim("k", OTHER)
    assert refused.value.code == ErrorCode.INVALID_REQUEST and "idempotency key" in refused.value.message
    spelled_out = GenerateRequest.model_validate({"output": {"format": "png"}, "guidance_scale": 7.0,
                                                  "prompt": "a character portrait", "loras": []})
    assert request_hash(spelled_out) == request_hash(REQUEST) != request_hash(OTHER)
    assert not store.claim("k", spelled_out).first
    store.keep(running, answer("aaaa"))
    with pytest.raises(ServiceError):
        store.claim("k", OTHER)


def test_a_duplicate_waits_for_the_first_answer_and_renders_when_the_first_fails():
    store = IdempotencyStore(ttl_s=3600, max_bytes=10**6)
    renders: list[str] = []

    def render(tag: str):
        def run() -> GenerateResponse:
            renders.append(tag)
            return answer(tag)
        return run

    def in_thread(call) -> list:
        out: list = []
        thread = threading.Thread(target=lambda: out.append(call()))
        thread.start()
        return [thread, out]

    first = store.claim("k", REQUEST)
    thread, out = in_thread(lambda: store.answer("k", REQUEST, render("xxxx"), Deadline(60)))
    store.keep(first, answer("aaaa"))
    thread.join(30)
    assert out == [answer("aaaa")] and renders == []

    failing = store.claim("f", REQUEST)
    thread, out = in_thread(lambda: store.answer("f", REQUEST, render("bbbb"), Deadline(60)))
    store.drop(failing)  # the first failed: nothing kept, the duplicate renders itself
    thread.join(30)
    assert out == [answer("bbbb")] and renders == ["bbbb"]
    assert store.answer("f", REQUEST, render("cccc"), Deadline(60)) == answer("bbbb") and renders == ["bbbb"]


def test_a_duplicate_waits_no_longer_than_its_own_deadline_then_is_busy_and_never_renders():
    """Issue 27: a repeat meets a key claimed elsewhere; past its deadline it answers `busy` (the
    caller retries after Retry-After and gets the kept answer), never renders the key itself."""
    store = IdempotencyStore(ttl_s=3600, max_bytes=10**6)
    store.claim("k", REQUEST)
    renders: list[int] = []
    with pytest.raises(ServiceError) as late:
        store.answer("k", REQUEST, lambda: renders.append(1) or answer("xxxx"), Deadline(0))
    assert late.value.code == ErrorCode.BUSY and "idempotency key" in late.value.message and renders == []


@pytest.mark.parametrize("key", ["job-1/clip-3/9f2c", "a", "x" * 200, "~!{}"])
def test_keys_that_are_accepted(key):
    assert check_key(key) == key


@pytest.mark.parametrize("key", ["", "x" * 201, "with space", "tab\there", "é", 5, None])
def test_keys_that_are_refused(key):
    with pytest.raises(ServiceError) as refused:
        check_key(key)
    assert refused.value.code == ErrorCode.INVALID_REQUEST


def test_retry_after_is_recent_service_time_times_the_requests_in_flight():
    times = ServiceTimes(initial_s=2.0)
    assert times.retry_after_s(3) == 6
    times.observe(7.0)  # the average moves a fifth of the way: 3 s
    assert times.retry_after_s(3) == 9 and times.retry_after_s(3, workers=2) == 5
    fast = ServiceTimes(initial_s=0.01)
    assert fast.retry_after_s(0) == 1  # never below a second


# -- over HTTP ---------------------------------------------------------------------------------


class GatedService(InferenceService):
    """Each request waits at `gate` (open unless a test closes it) before it starts; `entered` tells
    that one got there."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def generate(self, *args, **kwargs):
        self.entered.set()
        if not self.gate.wait(60):
            raise ServiceError(ErrorCode.INTERNAL, "the test never opened the gate")
        return super().generate(*args, **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("served")
    (root / "a.safetensors").write_bytes(make_lora(seed=1).read_bytes())
    with FileServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    """The app with QUEUE_MAX=0: one request runs, none waits, so a duplicate that took a place would be busy."""
    settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path_factory.mktemp("cache"),
                        allow_private_urls=True, queue_max=0)
    app = create_app(settings, service=GatedService(settings))
    with LiveServer(app) as base:
        wait_ready(base)
        yield base, app.state.admission


def body(files, prompt: str = "a character portrait", **extra) -> dict:
    return {"prompt": prompt, "num_inference_steps": 2, "width": 64, "height": 64,
            "loras": [{"id": "char-a", "url": files.url("a.safetensors")}], **extra}


def post(base: str, payload: dict, key: str | None = None) -> httpx.Response:
    return httpx.post(f"{base}/v1/generate", json=payload, headers={"idempotency-key": key} if key else {}, timeout=120)


def rendered(base: str) -> float:
    metrics = httpx.get(f"{base}/metrics").text
    return float(re.search(r"^sdxl_lora_images_generated_total (\S+)$", metrics, re.M).group(1))


class Gate:
    """Holds the app's first request at the service's gate until every expected request has claimed
    its idempotency key (counted in the store), so the duplicates surely overlap the first."""

    def __init__(self, state, monkeypatch):
        self.service = state.service
        self.claims: list[str] = []
        claim = state.idempotency.claim
        monkeypatch.setattr(state.idempotency, "claim", lambda key, request: self.claims.append(key) or claim(key, request))

    def __enter__(self) -> Gate:
        self.service.entered.clear()
        self.service.gate.clear()
        return self

    def wait_for(self, claims: int) -> None:
        deadline = time.monotonic() + 60
        while not (self.service.entered.is_set() and len(self.claims) >= claims):
            assert time.monotonic() < deadline, f"{len(self.claims)} claims, entered={self.service.entered.is_set()}"
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.service.gate.set()


def in_threads(calls) -> tuple[list[threading.Thread], list]:
    results = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    return threads, results


def test_a_repeated_key_is_answered_without_rendering(server, files):
    base, _ = server
    before = rendered(base)
    payload = body(files, num_images=2)  # no seed: a second render would pick another one
    first = post(base, payload, key="job-1/clip-1")
    assert first.status_code == 200, first.text
    assert rendered(base) == before + 2
    spelled_out = {**payload, "guidance_scale": 7.0, "output": {"format": "png", "delivery": "base64"}}
    repeat = post(base, spelled_out, key="job-1/clip-1")
    assert repeat.status_code == 200 and repeat.content == first.content
    assert repeat.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert rendered(base) == before + 2
    assert post(base, payload).status_code == 200 and rendered(base) == before + 4  # no key: renders


def test_a_key_reused_for_another_body_is_invalid_request(server, files):
    base, _ = server
    assert post(base, body(files), key="job-2/clip-1").status_code == 200
    before = rendered(base)
    reused = post(base, body(files, prompt="someone else"), key="job-2/clip-1")
    assert reused.status_code == 422, reused.text
    assert reused.json()["error"]["code"] == "invalid_request" and "idempotency key" in reused.json()["error"]["message"]
    malformed = post(base, body(files), key="x" * 201)
    assert malformed.status_code == 422 and malformed.json()["error"]["code"] == "invalid_request"
    assert rendered(base) == before


def test_a_failed_first_request_is_not_kept(server, files):
    base, _ = server
    payload = body(files, loras=[{"id": "char-late", "url": files.url("late.safetensors")}])
    before = rendered(base)
    failed = post(base, payload, key="job-3/clip-1")
    assert failed.status_code == 424 and failed.json()["error"]["code"] == "lora_download_failed"
    (files.root / "late.safetensors").write_bytes((files.root / "a.safetensors").read_bytes())
    retried = post(base, payload, key="job-3/clip-1")
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
    assert rendered(base) == before + 1
    assert post(base, payload, key="job-3/clip-1").content == retried.content and rendered(base) == before + 1


def test_concurrent_requests_with_one_key_render_once_and_take_no_queue_place(server, files, monkeypatch):
    base, state = server
    before = rendered(base)
    with Gate(state, monkeypatch) as gate:
        threads, answers = in_threads([lambda: post(base, body(files), key="job-4/clip-1")] * 5)
        gate.wait_for(claims=5)
    for thread in threads:
        thread.join(120)
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
    assert len({a.content for a in answers}) == 1
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == [""] + ["true"] * 4
    assert rendered(base) == before + 1


def test_busy_carries_retry_after_in_its_header_and_its_message(server, files, monkeypatch):
    base, state = server
    with Gate(state, monkeypatch) as gate:
        threads, answers = in_threads([lambda: post(base, body(files), key="job-5/clip-1")])
        gate.wait_for(claims=1)
        for key in (None, "job-5/clip-2"):  # the one place is taken: a new request is busy
            busy = post(base, body(files, prompt="another clip"), key=key)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "busy"
            retry_after = int(busy.headers["retry-after"])
            assert retry_after == state.service_times.retry_after_s(in_flight=1) >= 1
            assert RETRY_AFTER_MESSAGE.search(busy.json()["error"]["message"]).group(1) == str(retry_after)
    for thread in threads:
        thread.join(120)
    assert answers[0].status_code == 200
    # the refused key was never kept: its request renders now that the place is free
    assert post(base, body(files, prompt="another clip"), key="job-5/clip-2").status_code == 200
