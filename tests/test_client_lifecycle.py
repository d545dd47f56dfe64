"""The client as an SDK: one error hierarchy, configuration from the environment, context managers,
a whole-job deadline, a bug of ours kept inside its clip, one warning per clip outcome.

Against the shipped fakes (`sdxl_lora_client.testing`) and SQLite: no service, no torch.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

import sdxl_lora_client
from sdxl_lora_client import (
    AsyncLoraApplicator, BackendError, ClientCode, ClientError, ClipPrompt, ErrorCode, LedgerError, LoraApplicator,
    ReplicateClient, ReplicateError, RunPodBackend, ServiceBackend, SqlStore,
)
from sdxl_lora_client.testing import ScriptedBackend

REF = "https://cdn.example/ref-{}.png"


@pytest.fixture
def store(tmp_path) -> SqlStore:
    with SqlStore(f"sqlite:///{tmp_path / 'video.db'}") as store:
        store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors")
        yield store


def clips(count: int) -> list[ClipPrompt]:
    return [ClipPrompt(f"c{i}", f"shot {i}", [REF.format(i)], []) for i in range(count)]


async def no_wait(seconds: float) -> None:
    pass


def test_every_error_shares_one_base_and_is_exported():
    for error in (BackendError, ReplicateError, LedgerError):
        assert issubclass(error, ClientError) and error.__name__ in sdxl_lora_client.__all__
    assert BackendError("x").code == ClientCode.BACKEND_UNAVAILABLE == "backend_unavailable"
    assert {code.value for code in ClientCode}.isdisjoint({"unavailable"})


def test_the_store_raises_ledger_errors_only(tmp_path):
    away = SqlStore("postgresql+psycopg://postgres@127.0.0.1:9/none")  # nothing listens there: built lazily
    with pytest.raises(LedgerError) as down:
        away.get_lora("char")  # the outage is met at the first call
    assert down.value.retryable
    store = SqlStore(f"sqlite:///{tmp_path / 'v.db'}")
    with pytest.raises(LedgerError, match="no job") as missing:
        store.total_cost("missing")
    assert not missing.value.retryable


def test_configuration_from_the_environment(monkeypatch):
    monkeypatch.setenv("SDXL_LORA_SERVICE_URL", "http://gpu-box:8000/")
    monkeypatch.setenv("SDXL_LORA_API_KEY", "secret")
    seen = []
    backend = ServiceBackend.from_env(transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(500)))
    with pytest.raises(BackendError):
        backend.generate(sdxl_lora_client.GenerateRequest(prompt="p"))
    assert str(seen[0].url) == "http://gpu-box:8000/v1/generate"
    assert seen[0].headers["authorization"] == "Bearer secret"
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "ep-1")
    monkeypatch.setenv("RUNPOD_API_KEY", "rp-key")
    runpod = RunPodBackend.from_env(transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(500)))
    with pytest.raises(BackendError):
        runpod.generate(sdxl_lora_client.GenerateRequest(prompt="p"))
    assert str(seen[1].url) == "https://api.runpod.ai/v2/ep-1/runsync"
    assert seen[1].headers["authorization"] == "Bearer rp-key"
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_token")
    applicator = LoraApplicator(store=None)
    assert applicator.replicate is not None
    applicator.close()
    for name in ("SDXL_LORA_SERVICE_URL", "RUNPOD_API_KEY", "REPLICATE_API_TOKEN"):
        monkeypatch.delenv(name)
    with pytest.raises(BackendError, match="SDXL_LORA_SERVICE_URL"):
        ServiceBackend.from_env()
    with pytest.raises(BackendError, match="RUNPOD_API_KEY"):
        RunPodBackend.from_env()
    with pytest.raises(ReplicateError, match="REPLICATE_API_TOKEN"):
        ReplicateClient()


def test_context_managers_close_the_pools(store):
    backend = ServiceBackend("http://svc")
    with LoraApplicator(store=store, preprocessing=backend) as applicator:
        assert applicator.apply("job", clips(1), "kling_v21", None).path == "none"
    assert backend._http.sync.is_closed

    async def main():
        backend = ServiceBackend("http://svc", async_transport=httpx.MockTransport(lambda r: httpx.Response(503)))
        async with AsyncLoraApplicator(store=store, preprocessing=backend, sleep=no_wait) as applicator:
            result = await applicator.apply("job", clips(1), "kling_v21", "char")
            client = backend._http.current()
        assert client.is_closed and backend._http.sync.is_closed
        return result

    assert asyncio.run(main()).outcomes[0].reason == "internal", "a bare 503 is the service's internal error"


def test_a_bug_in_the_clip_path_keeps_that_clip_original_and_is_logged_with_its_traceback(store, caplog):
    class Buggy(ScriptedBackend):
        async def agenerate(self, request, idempotency_key=None):
            if request.image == REF.format(1):
                raise ZeroDivisionError("a bug")
            return await super().agenerate(request, idempotency_key)

    with LoraApplicator(store=store, preprocessing=Buggy()) as applicator:
        result = applicator.apply("job", clips(3), "kling_v21", "char")
    assert [(o.status, o.reason) for o in result.outcomes] == [
        ("enhanced", None), ("original", "internal"), ("enhanced", None)]
    assert result.clips[1].character_reference_urls == [REF.format(1)]
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.name == "sdxl_lora_client" and record.exc_info[0] is ZeroDivisionError
    assert sorted(r["clip_id"] for r in store.job_costs("job")) == ["c0", "c2"]


def test_the_job_deadline_bounds_apply(store):
    backend = ScriptedBackend(latency_s=30)
    started = time.monotonic()
    with LoraApplicator(store=store, preprocessing=backend, job_deadline_s=0.5) as applicator:
        result = applicator.apply("job", clips(3), "kling_v21", "char")
    assert time.monotonic() - started < 20
    assert [(o.status, o.reason) for o in result.outcomes] == [("original", "deadline_exceeded")] * 3
    assert backend.in_flight == 0 and store.job_costs("job") == []


def test_one_warning_per_reason_and_attempts_at_info(store, caplog):
    caplog.set_level(logging.INFO, logger="sdxl_lora_client")
    backend = ScriptedBackend({REF.format(i): ["internal"] * 4 for i in range(5)})
    with LoraApplicator(store=store, preprocessing=backend, max_concurrent_clips=1, sleep=no_wait) as applicator:
        result = applicator.apply("job", clips(5), "kling_v21", "char")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(result.warnings) == 2, "the service down: one for the clip that tried, one for the rest"
    assert result.warnings[1].startswith("clips c1, c2, c3, c4: original reference kept (internal: ")
    assert all(r.name == "sdxl_lora_client" for r in caplog.records)
    assert sum("attempt" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO) == 4
    assert [(o.reason, o.attempts) for o in result.outcomes] == [("internal", 4)] + [("internal", 0)] * 4


def test_the_service_codes_and_client_codes_are_outcome_reasons(store):
    backend = ScriptedBackend({REF.format(0): ["lora_invalid"]})
    with LoraApplicator(store=store, preprocessing=backend, max_concurrent_clips=1) as applicator:
        result = applicator.apply("job", clips(2), "kling_v21", "char")
    assert [o.reason for o in result.outcomes] == [ErrorCode.LORA_INVALID, ErrorCode.LORA_INVALID]
    assert backend.attempts == {REF.format(0): 1}, "not retried, and the job's other clip does not pay for it again"


def test_a_cancelled_runpod_request_cancels_its_runpod_job():
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.url.path.startswith("/cancel/"):
            return httpx.Response(200, json={"id": "j1", "status": "CANCELLED"})
        return httpx.Response(200, json={"id": "j1", "status": "IN_QUEUE"})

    backend = RunPodBackend(None, None, base_url="http://rp", poll_interval_s=0.01,
                            async_transport=httpx.MockTransport(answer))

    async def main():
        task = asyncio.create_task(backend.agenerate(sdxl_lora_client.GenerateRequest(prompt="p")))
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen[0] == "POST /runsync" and seen[-1] == "POST /cancel/j1"


def test_a_cancellation_from_inside_a_clip_is_that_clips_outcome_not_the_jobs(store):
    class CancelsItself(ScriptedBackend):
        async def agenerate(self, request, idempotency_key=None):
            if request.image == REF.format(0):
                raise asyncio.CancelledError  # e.g. a library cancelling its own call
            return await super().agenerate(request, idempotency_key)

    with LoraApplicator(store=store, preprocessing=CancelsItself()) as applicator:
        result = applicator.apply("job", clips(2), "kling_v21", "char")
    assert [(o.status, o.reason) for o in result.outcomes] == [("original", "cancelled"), ("enhanced", None)]


def test_a_store_that_fails_unexpectedly_does_not_fail_the_job(store, caplog):
    class Broken(SqlStore):
        def get_lora(self, lora_id):
            raise KeyError("a store of the caller's own, failing its own way")

    broken = Broken(str(store.engine.url))
    with LoraApplicator(store=broken, preprocessing=ScriptedBackend()) as applicator:
        result = applicator.apply("job", clips(2), "kling_v21", "char")
    assert result.path == "reference_fallback" and result.clips == clips(2)
    assert [(o.status, o.reason) for o in result.outcomes] == [("original", "internal")] * 2
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)
