"""Prefetch: LoRAs put into the disk cache when their training completes, so a job's first request
never waits for a download. Over real HTTP on loopback and as a RunPod job, with a local file server."""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import pytest

from api.app import create_app
from handler.worker import make_handler
from inference.deadline import Deadline
from inference.service import InferenceService
from inference.settings import Settings
from sdxl_lora_client.contract import GenerateRequest, PrefetchRequest
from tests.fakes import LiveServer, wait_ready
from tests.servers import FileServer, stall
from tests.test_api import API_KEY, post

STALL_S = 30.0


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("served")
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("stalled", 4)):
        (root / f"{name}.safetensors").write_bytes(make_lora(seed=seed).read_bytes())
    (root / "garbage.safetensors").write_bytes(b"\x00garbage" * 100)
    with FileServer(root) as server:
        server.behave["/stalled.safetensors"] = stall(STALL_S)
        yield server


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_model):
    settings = Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path_factory.mktemp("cache"),
                        allow_private_urls=True, api_key=API_KEY, max_resident_adapters=2)
    with LiveServer(create_app(settings)) as base:
        wait_ready(base)
        yield base


def prefetch(base: str, loras: list[dict], key: str | None = API_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/v1/loras/prefetch", json={"loras": loras}, headers=headers, timeout=120)


def sha256_of(server: FileServer, name: str) -> str:
    return hashlib.sha256((server.root / name).read_bytes()).hexdigest()


def test_a_failed_lora_is_failed_with_its_code_while_the_others_cache(app_url, lora_server):
    response = prefetch(app_url, [
        {"id": "pre-a", "url": lora_server.url("a.safetensors")},
        {"id": "missing", "url": lora_server.url("missing.safetensors")},
        {"id": "garbage", "url": lora_server.url("garbage.safetensors")},
        {"id": "pre-b", "url": lora_server.url("b.safetensors"), "sha256": sha256_of(lora_server, "b.safetensors")},
        {"id": "wrong-sha", "url": lora_server.url("c.safetensors"), "sha256": "0" * 64},
    ])
    assert response.status_code == 200, response.text
    outcomes = response.json()["loras"]
    assert [(o["id"], o["status"], o.get("code")) for o in outcomes] == [
        ("pre-a", "cached", None), ("missing", "failed", "lora_download_failed"), ("garbage", "failed", "lora_invalid"),
        ("pre-b", "cached", None), ("wrong-sha", "failed", "lora_invalid")]
    assert outcomes[0]["sha256"] == sha256_of(lora_server, "a.safetensors")
    assert all(o["message"] for o in outcomes if o["status"] == "failed")
    disk = httpx.get(f"{app_url}/v1/adapters", headers={"authorization": f"Bearer {API_KEY}"}).json()["disk"]
    assert sorted(entry["id"] for entry in disk) == ["pre-a", "pre-b"]


def test_the_first_generate_after_a_prefetch_reads_the_file_from_disk(app_url, lora_server):
    lora = {"id": "first-gen", "url": lora_server.url("c.safetensors")}
    assert prefetch(app_url, [lora]).json()["loras"][0]["status"] == "cached"
    hits = lora_server.hits["/c.safetensors"]
    body = {"prompt": "a character portrait", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 3,
            "loras": [lora]}
    response = post(app_url, body)
    assert response.status_code == 200, response.text
    assert response.json()["loras"][0]["source"] == "disk"
    assert lora_server.hits["/c.safetensors"] == hits, "not downloaded again"
    again = prefetch(app_url, [lora]).json()["loras"][0]
    assert again["status"] == "cached" and lora_server.hits["/c.safetensors"] == hits, "a cached LoRA is a hit"


def test_prefetch_takes_the_same_auth_and_validation_as_generate(app_url, lora_server):
    lora = {"id": "x", "url": lora_server.url("a.safetensors")}
    for key in (None, "wrong"):
        response = prefetch(app_url, [lora], key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    for loras in ([], [lora] * 2, [{**lora, "id": f"x{i}"} for i in range(17)], [{**lora, "url": "file:///etc/passwd"}],
                  [{**lora, "scale": 1.0}]):
        response = prefetch(app_url, loras)
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", loras


@pytest.fixture
def bare_service(tmp_path, tiny_model):
    """A service whose pipeline is not loaded: prefetch needs only the disk cache."""
    def make(**settings) -> InferenceService:
        return InferenceService(Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path / "cache",
                                         **settings))
    return make


def request(*loras: dict) -> PrefetchRequest:
    return PrefetchRequest.model_validate({"loras": list(loras)})


def test_a_loopback_url_is_refused_when_private_urls_are_off(bare_service, lora_server):
    service = bare_service(allow_private_urls=False)
    hits = lora_server.hits["/a.safetensors"]
    [outcome] = service.prefetch(request({"id": "a", "url": lora_server.url("a.safetensors")})).loras
    assert (outcome.status, outcome.code.value) == ("failed", "lora_download_failed")
    assert "private" in outcome.message or "not allowed" in outcome.message, outcome.message
    assert lora_server.hits["/a.safetensors"] == hits, "never dialled"
    assert service.store.entries() == []


def test_a_download_past_the_deadline_is_timeout_and_the_others_still_cache(bare_service, lora_server):
    service = bare_service(allow_private_urls=True, download_timeout_s=6.0)  # the stalled download ends soon after
    response = service.prefetch(request({"id": "slow", "url": lora_server.url("stalled.safetensors")},
                                        {"id": "a", "url": lora_server.url("a.safetensors")}), Deadline(2.0))
    assert [(o.id, o.status, o.code and o.code.value) for o in response.loras] == [
        ("slow", "failed", "timeout"), ("a", "cached", None)]
    assert [entry.lora_id for entry in service.store.entries()] == ["a"]


def test_the_runpod_prefetch_job_answers_the_same_object(bare_service, lora_server):
    runpod_handler = make_handler(bare_service(allow_private_urls=True))
    handler = lambda job: asyncio.run(runpod_handler(job))  # noqa: E731  (the handler is async)
    output = handler({"id": "job", "input": {"prefetch": {"loras": [
        {"id": "a", "url": lora_server.url("a.safetensors")},
        {"id": "missing", "url": lora_server.url("missing.safetensors")}]}}})
    assert output == {"loras": [
        {"id": "a", "sha256": sha256_of(lora_server, "a.safetensors"), "status": "cached"},
        {"id": "missing", "status": "failed", "code": "lora_download_failed",
         "message": output["loras"][1]["message"]}]}
    for bad in ({"prefetch": {"loras": []}}, {"prefetch": None}, {"prefetch": {"loras": []}, "prompt": "x"}):
        result = handler({"id": "job", "input": bad})
        assert json.loads(result["error"])["code"] == "invalid_request", bad


# -- memory and the truth of the answer (issue 32) -------------------------------------------------


def test_a_prefetch_prepares_nothing_for_the_pipeline(tiny_model, engine, lora_server, tmp_path, monkeypatch):
    """A prefetch only puts files on disk: with the pipeline loaded it never reads a LoRA into memory
    to prepare it (16 files of 62 MB once held 941 MB at once), while a generate still does."""
    service = InferenceService(Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path / "cache",
                                        allow_private_urls=True), engine=engine)
    prepared = []
    real_prepare = engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda lora: prepared.append(lora.lora_id) or real_prepare(lora))
    loras = [{"id": name, "url": lora_server.url(f"{name}.safetensors")} for name in ("a", "b", "c")]
    for _ in range(2):  # cold, then all hits
        assert [o.status for o in service.prefetch(request(*loras)).loras] == ["cached"] * 3
    assert prepared == []
    engine.adapters.clear()
    service.generate(GenerateRequest.model_validate({"prompt": "x", "num_inference_steps": 1, "width": 64,
                                                     "height": 64, "seed": 1, "loras": [loras[0]]}))
    assert prepared == ["a"], "the spy sees a generate's preparation"


def test_a_damaged_cached_file_is_fetched_again_by_a_prefetch(bare_service, lora_server):
    """A hit is hashed again from disk (a chunk at a time): a damaged entry is not answered `cached`."""
    service = bare_service(allow_private_urls=True)
    lora = {"id": "a", "url": lora_server.url("a.safetensors")}
    [first] = service.prefetch(request(lora)).loras
    [entry] = service.store.entries()
    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0xFF
    entry.path.write_bytes(data)
    hits = lora_server.hits["/a.safetensors"]
    [again] = service.prefetch(request(lora)).loras
    assert (again.status, again.sha256) == ("cached", first.sha256)
    assert lora_server.hits["/a.safetensors"] == hits + 1, "downloaded again"
    assert hashlib.sha256(entry.path.read_bytes()).hexdigest() == first.sha256


def test_a_lora_larger_than_the_cache_is_failed_not_cached(bare_service, lora_server):
    size = (lora_server.root / "a.safetensors").stat().st_size
    service = bare_service(allow_private_urls=True, lora_cache_max_bytes=size - 1)
    [outcome] = service.prefetch(request({"id": "a", "url": lora_server.url("a.safetensors")})).loras
    assert (outcome.status, outcome.code.value) == ("failed", "lora_download_failed")
    assert "too large for the cache" in outcome.message and "SDXL_LORA_LORA_CACHE_MAX_BYTES" in outcome.message
    assert outcome.sha256 == sha256_of(lora_server, "a.safetensors")


def test_the_answer_says_what_the_cache_holds_when_it_answers(bare_service, lora_server):
    """Three LoRAs into a cache with room for one: each download evicts the others, and only what is
    still on disk when the prefetch answers is `cached` (it once said `cached` for evicted files)."""
    size = max((lora_server.root / f"{name}.safetensors").stat().st_size for name in "abc")
    service = bare_service(allow_private_urls=True, lora_cache_max_bytes=size * 3 // 2)
    outcomes = service.prefetch(request(*({"id": name, "url": lora_server.url(f"{name}.safetensors")}
                                          for name in "abc"))).loras
    cached = {o.id for o in outcomes if o.status == "cached"}
    assert cached == {entry.lora_id for entry in service.store.entries()}
    assert len(cached) <= 1
    for outcome in outcomes:
        if outcome.status == "failed":
            assert outcome.code.value == "lora_download_failed" and "evicted" in outcome.message, outcome
            assert "SDXL_LORA_LORA_CACHE_MAX_BYTES" in outcome.message
