"""Many jobs through one applicator: requests in flight bounded across jobs, `busy` waited out (not
failed), idempotency keys, one request per clip however many apply() calls share a job, the LoRA's
sha256 sent, prefetch. Against the shipped fakes and httpx's MockTransport: no service needed.
"""

from __future__ import annotations

import asyncio
import json
import threading
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from sdxl_lora_client import (
    AsyncLoraApplicator, BackendError, ClipPrompt, EnhanceOptions, GenerateRequest, LoraApplicator, RunPodBackend,
    ServiceBackend, SqlStore,
)
from sdxl_lora_client.clip_requests import idempotency_key
from sdxl_lora_client.retry import retry_after_s
from sdxl_lora_client.testing import TINY_PNG_BASE64, ScriptedBackend, answer_for

REF = "https://cdn.example/ref-{}.png"
SHA = "ab" * 32


@pytest.fixture
def store(tmp_path) -> SqlStore:
    with SqlStore(f"sqlite:///{tmp_path / 'video.db'}") as store:
        store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors", sha256=SHA)
        yield store


def clips(count: int) -> list[ClipPrompt]:
    return [ClipPrompt(f"c{i}", f"shot {i}", [REF.format(i)], []) for i in range(count)]


class Sleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def run_jobs(store, backend, jobs: list[str], count: int = 4, **kwargs):
    """`jobs` applied concurrently through one AsyncLoraApplicator."""
    async def main():
        async with AsyncLoraApplicator(store=store, preprocessing=backend, **kwargs) as applicator:
            return await asyncio.gather(*(applicator.apply(job, clips(count), "kling_v21", "char") for job in jobs))

    return asyncio.run(main())


# -- backpressure ----------------------------------------------------------------------------------


def test_max_in_flight_bounds_requests_across_jobs(store):
    backend = ScriptedBackend(latency_s=0.2)
    results = run_jobs(store, backend, [f"job-{i}" for i in range(5)], max_concurrent_clips=4, max_in_flight=3)
    assert backend.peak == 3, "5 jobs x 4 clips, never more than max_in_flight requests at once"
    assert all(o.status == "enhanced" for r in results for o in r.outcomes)
    assert len(backend.requests) == 20


def test_max_concurrent_clips_still_bounds_one_job(store):
    backend = ScriptedBackend(latency_s=0.2)
    run_jobs(store, backend, ["job"], count=5, max_concurrent_clips=2, max_in_flight=8)
    assert backend.peak == 2


# -- busy ----------------------------------------------------------------------------------------


def apply_one(store, backend, count: int = 1, **kwargs):
    kwargs.setdefault("sleep", Sleeps())
    with LoraApplicator(store=store, preprocessing=backend, **kwargs) as applicator:
        return applicator.apply("job", clips(count), "kling_v21", "char")


def test_busy_waits_retry_after_with_jitter_outside_the_failure_schedule(store):
    sleeps = Sleeps()
    backend = ScriptedBackend({REF.format(0): ["busy:3", "busy", "internal", "busy:0.5", "internal", "internal"]})
    result = apply_one(store, backend, sleep=sleeps, jitter=lambda: 0.25)
    assert sleeps == [3.75, 1.25, 2.0, 0.625, 4.0, 8.0], "Retry-After (1 s when absent) x 1.25; failures 2/4/8 s"
    assert [(o.status, o.attempts) for o in result.outcomes] == [("enhanced", 7)]


def test_busy_gives_up_at_the_job_deadline_and_never_makes_siblings_skip(store):
    sleeps = Sleeps()
    backend = ScriptedBackend({REF.format(0): ["busy:5"] * 3})
    result = apply_one(store, backend, count=3, sleep=sleeps, jitter=lambda: 0.0, job_deadline_s=12,
                       max_concurrent_clips=1)
    assert sleeps == [5.0, 5.0], "a third wait of 5 s would pass the 12 s deadline"
    assert [(o.status, o.reason, o.attempts) for o in result.outcomes] == [
        ("original", "busy", 3), ("enhanced", None, 1), ("enhanced", None, 1)]
    assert len(result.warnings) == 1 and "deadline" in result.warnings[0]


def test_the_jitter_spreads_waits_over_retry_after_to_twice_it(store):
    sleeps = Sleeps()
    backend = ScriptedBackend({REF.format(i): ["busy:2"] for i in range(8)})
    apply_one(store, backend, count=8, sleep=sleeps, max_concurrent_clips=8)
    assert len(sleeps) == 8 and all(2.0 <= s < 4.0 for s in sleeps) and len(set(sleeps)) == 8


@pytest.mark.parametrize(("header", "message", "expected"), [
    ("7", "", 7.0), ("0.5", "", 0.5), (None, "queue full (16 waiting); retry after 3 s", 3.0),
    (None, "busy, Retry-After: 2.5", 2.5), (None, "retry_after=4", 4.0), (None, "queue full", None),
    ("soon", "", None), ("-3", "", 0.0),
])
def test_retry_after_is_read_leniently(header, message, expected):
    assert retry_after_s(header, message) == expected


def test_retry_after_as_an_http_date():
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after_s(when) <= 30


def test_backends_read_busy_answers():
    service = ServiceBackend("http://svc", transport=httpx.MockTransport(lambda r: httpx.Response(
        429, json={"error": {"code": "busy", "message": "queue full"}}, headers={"Retry-After": "4"})))
    with pytest.raises(BackendError) as busy:
        service.generate(GenerateRequest(prompt="p"))
    assert (busy.value.code, busy.value.retryable, busy.value.retry_after_s) == ("busy", True, 4.0)
    error = json.dumps({"code": "busy", "message": "queue full (16 waiting); retry after 6 s"})
    runpod = RunPodBackend(None, None, base_url="http://rp", transport=httpx.MockTransport(lambda r: httpx.Response(
        200, json={"id": "j1", "status": "FAILED", "error": error})))
    with pytest.raises(BackendError) as busy:
        runpod.generate(GenerateRequest(prompt="p"))
    assert (busy.value.code, busy.value.retry_after_s) == ("busy", 6.0)


# -- idempotency -----------------------------------------------------------------------------------


def test_the_idempotency_key_is_stable_and_derived_from_job_clip_and_content():
    request = GenerateRequest(prompt="p", image=REF.format(0), seed=1)
    key = idempotency_key("job", "c0", request)
    assert key == idempotency_key("job", "c0", GenerateRequest(prompt="p", image=REF.format(0), seed=1))
    assert len({key, idempotency_key("job-2", "c0", request), idempotency_key("job", "c1", request),
                idempotency_key("job", "c0", request.model_copy(update={"strength": 0.7}))}) == 4


def test_requests_carry_the_key_the_header_and_the_runpod_field(store):
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = json.loads(request.content)
        generate = body.get("input", body)
        response = answer_for(generate)
        return httpx.Response(200, json={"id": "j", "status": "COMPLETED", "output": response} if "input" in body
                              else response)

    transport = httpx.MockTransport(answer)
    for backend in (ServiceBackend("http://svc", async_transport=transport),
                    RunPodBackend(None, None, base_url="http://rp", async_transport=transport)):
        assert apply_one(store, backend).outcomes[0].status == "enhanced"
    service_request, runpod_request = seen
    sent = GenerateRequest.model_validate(json.loads(service_request.content))
    assert service_request.headers["idempotency-key"] == idempotency_key("job", "c0", sent)
    runpod_input = json.loads(runpod_request.content)["input"]
    assert runpod_input.pop("idempotency_key") == service_request.headers["idempotency-key"]
    assert GenerateRequest.model_validate(runpod_input) == sent


def test_ten_concurrent_applies_of_one_job_send_one_request_per_clip(store):
    backend = ScriptedBackend(latency_s=0.3)
    results = run_jobs(store, backend, ["job"] * 10, count=3)
    assert sorted(r.image for r in backend.requests) == [REF.format(i) for i in range(3)]
    assert len(set(backend.keys)) == 3
    assert all([o.status for o in r.outcomes] == ["enhanced"] * 3 for r in results)
    assert len({tuple(c.character_reference_urls[0] for c in r.clips) for r in results}) == 1
    assert sorted(row["clip_id"] for row in store.job_costs("job")) == ["c0", "c1", "c2"]


def test_threads_applying_one_job_through_the_sync_applicator_share_requests_too(store):
    backend = ScriptedBackend(latency_s=0.3)
    with LoraApplicator(store=store, preprocessing=backend) as applicator:
        threads = [threading.Thread(target=applicator.apply, args=("job", clips(2), "kling_v21", "char"))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(backend.requests) == 2


def test_a_shared_request_that_fails_fails_every_sharer_alike(store):
    backend = ScriptedBackend({REF.format(0): ["lora_invalid"]}, latency_s=0.2)
    results = run_jobs(store, backend, ["job"] * 4, count=1)
    assert [r.outcomes[0].reason for r in results] == ["lora_invalid"] * 4 and len(backend.requests) == 1


# -- LoRA identity and prefetch ---------------------------------------------------------------------


def test_the_records_sha256_is_sent_when_it_has_one(store):
    backend = ScriptedBackend()
    apply_one(store, backend)
    store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors")
    apply_one(store, backend)
    assert [r.loras[0].sha256 for r in backend.requests] == [SHA, None]


def test_prefetch_reads_the_record_and_says_how_it_went(store):
    backend = ScriptedBackend()
    with LoraApplicator(store=store, preprocessing=backend) as applicator:
        done = applicator.prefetch("char")
        assert (done.ok, done.reason) == (True, None)
        assert backend.prefetched[0].loras[0].model_dump() == {
            "id": "char", "url": "https://bucket.example/char.safetensors", "sha256": SHA}
        backend.prefetch_failures["char"] = "lora_download_failed"
        failed = applicator.prefetch("char")
        assert (failed.ok, failed.reason, failed.message) == (False, "lora_download_failed", "scripted")
        assert applicator.prefetch("nobody").reason == "lora_not_ready"
    class GenerateOnly:  # a blocking backend of the caller's that cannot prefetch
        def generate(self, request, idempotency_key=None):
            return backend.generate(request, idempotency_key)

    with LoraApplicator(store=store, preprocessing=GenerateOnly()) as applicator:
        assert applicator.prefetch("char").reason == "backend_unavailable"


def test_prefetch_through_the_service_and_runpod_never_raises(store):
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content)))
        if request.url.host == "svc":
            return httpx.Response(200, text="<html>proxy error</html>")
        return httpx.Response(200, json={"id": "j", "status": "COMPLETED", "output": {
            "loras": [{"id": "char", "sha256": SHA, "status": "cached"}]}})

    transport = httpx.MockTransport(answer)

    async def main():
        service = ServiceBackend("http://svc", async_transport=transport)
        runpod = RunPodBackend(None, None, base_url="http://rp", async_transport=transport)
        results = []
        for backend in (service, runpod):
            async with AsyncLoraApplicator(store=store, preprocessing=backend) as applicator:
                results.append(await applicator.prefetch("char"))
        return results

    via_service, via_runpod = asyncio.run(main())
    assert (via_service.ok, via_service.reason) == (False, "invalid_answer")
    assert (via_runpod.ok, via_runpod.loras[0].sha256) == (True, SHA)
    assert seen[0] == ("/v1/loras/prefetch", {"loras": [{"id": "char", "url": "https://bucket.example/char.safetensors",
                                                         "sha256": SHA}]})
    assert seen[1] == ("/runsync", {"input": {"prefetch": seen[0][1]}})


def test_the_options_reach_the_request(store):
    backend = ScriptedBackend()
    apply_one(store, backend, options=EnhanceOptions(strength=0.8, num_inference_steps=5))
    assert (backend.requests[0].strength, backend.requests[0].num_inference_steps) == (0.8, 5)
