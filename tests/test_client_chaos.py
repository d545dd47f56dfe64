"""The client when things break, against the real PostgreSQL the suite starts (tests/postgres.py).

Each test breaks one thing during a job (the database restarts or is down, the service or Replicate
answers garbage, the backend moves between event loops, the caller cancels) and asserts both what
`apply()` returned and what the ledger holds: one row per enhanced clip, `total_cost` the exact sum,
and nothing written after `apply()` came back.

The database faults are triggered from inside the fake backend (the moment a render comes back), so
the ledger call they hit is known, not guessed from timing.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import replace
from decimal import Decimal

import httpx
import pytest

from sdxl_lora_client import AsyncLoraApplicator, ClipPrompt, LoraApplicator, ReplicateClient, ServiceBackend, SqlStore
from sdxl_lora_client.compat import load_matrix
from sdxl_lora_client.testing import TINY_PNG_BASE64, FakeReplicate, ScriptedBackend, answer_for
from tests.postgres import postgres_server, postgres_url  # noqa: F401 - fixtures

REF = "https://cdn.example/ref-{}.png"
LATE_S = 1.0  # how long we watch the ledger after apply() for a late write


@pytest.fixture
def ledger(postgres_server, postgres_url):
    store = SqlStore(postgres_url)
    store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors", trigger="<s0>")
    yield store
    if postgres_server.process is None or postgres_server.process.poll() is not None:
        postgres_server.start_again()  # a test that failed half-way: the next test needs the server
    store.close()


def clips(count: int) -> list[ClipPrompt]:
    return [ClipPrompt(f"c{i}", f"shot {i}", [REF.format(i)], ["https://cdn.example/scene.png"]) for i in range(count)]


class Sleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def applicator(store, backend, **kwargs) -> AsyncLoraApplicator:
    kwargs.setdefault("sleep", Sleeps())
    return AsyncLoraApplicator(store=store, preprocessing=backend, **kwargs)


def apply(applicator_, job_id: str, clip_list, video_model: str = "kling_v21"):
    async def run():
        return await applicator_.apply(job_id, clip_list, video_model, "char")

    return asyncio.run(run())


def assert_ledger_matches(store: SqlStore, job_id: str, result) -> list[dict]:
    """Rows == the clips charged (enhanced ones, here), total == their sum == the outcomes' costs,
    and nothing lands afterwards."""
    rows = store.job_costs(job_id)
    charged = sorted(o.clip_id for o in result.outcomes if o.cost)
    assert sorted(r["clip_id"] for r in rows) == charged
    assert store.total_cost(job_id) == sum(r["cost"] for r in rows) == sum(o.cost for o in result.outcomes)
    time.sleep(LATE_S)
    assert store.job_costs(job_id) == rows, "a charge landed after apply() returned"
    return rows


class FaultOnAnswer(ScriptedBackend):
    """Renders like ScriptedBackend; the first answer first runs `fault` (in a thread), and no
    answer comes back before the fault is done: every render is done, no charge for it written yet."""

    def __init__(self, fault, **kwargs):
        super().__init__(**kwargs)
        self.fault = fault
        self.faulted = False
        self._once = asyncio.Lock()

    async def agenerate(self, request, idempotency_key=None):
        response = await super().agenerate(request, idempotency_key)
        async with self._once:
            if not self.faulted:
                await asyncio.to_thread(self.fault)
                self.faulted = True
        return response


def direct_kling(ledger: SqlStore) -> dict:
    """A matrix where kling_v21 takes LoRAs directly, and a LoRA record with weights for it."""
    ledger.put_lora("char", status="completed", url="https://bucket.example/char.safetensors",
                    direct_weights={"kling": "https://weights.example/kling-char.safetensors"})
    matrix = load_matrix()
    matrix["kling_v21"] = replace(matrix["kling_v21"], direct_lora_supported=True, lora_field="lora_weights")
    return matrix


def in_background(seconds: float, fn) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), fn()), daemon=True)
    thread.start()
    return thread


# -- the database --------------------------------------------------------------------------------


@pytest.mark.parametrize("down_s", [0.0, 3.0])
def test_a_database_restart_mid_job_loses_no_charge(postgres_server, ledger, down_s, caplog):
    caplog.set_level("INFO", logger="sdxl_lora_client")
    started = []

    def restart():  # pg_ctl stop -m fast now; back `down_s` later
        postgres_server.shut_down()
        started.append(in_background(down_s, postgres_server.start_again))

    backend = FaultOnAnswer(restart, latency_s=0.3)
    result = apply(applicator(ledger, backend, max_concurrent_clips=2), "job", clips(5))
    started[0].join()
    assert [(o.status, o.reason, o.attempts) for o in result.outcomes] == [("enhanced", None, 1)] * 5
    assert result.unrecorded_charges == [] and result.warnings == []
    rows = assert_ledger_matches(ledger, "job", result)
    assert len(rows) == 5 and ledger.total_cost("job") == Decimal("0.025")
    assert any("ledger charge attempt" in r.getMessage() for r in caplog.records), "the fault was met and retried"


def test_a_database_down_at_job_start_is_waited_for(postgres_server, ledger):
    postgres_server.shut_down()
    back = in_background(1.5, postgres_server.start_again)
    backend = ScriptedBackend()
    result = apply(applicator(ledger, backend), "job", clips(3))
    back.join()
    assert [o.status for o in result.outcomes] == ["enhanced"] * 3
    assert len(assert_ledger_matches(ledger, "job", result)) == 3


def test_a_database_down_longer_than_ledger_wait_keeps_originals_and_renders_nothing(postgres_server, ledger):
    postgres_server.shut_down()
    backend = ScriptedBackend()
    started = time.monotonic()
    try:
        result = apply(applicator(ledger, backend, ledger_wait_s=1.0), "job", clips(3))
    finally:
        postgres_server.start_again()
    assert time.monotonic() - started < 10, "bounded by ledger_wait_s"
    assert result.path == "reference_fallback" and result.clips == clips(3)
    assert [(o.status, o.reason) for o in result.outcomes] == [("original", "ledger_unavailable")] * 3
    assert len(result.warnings) == 1 and backend.requests == [], "no render the ledger could not charge"
    assert ledger.job_costs("job") == []


def test_charges_the_database_cannot_take_come_back_and_replay_once(postgres_server, ledger):
    backend = FaultOnAnswer(postgres_server.shut_down, latency_s=0.2)  # and it stays down past ledger_wait_s
    try:
        result = apply(applicator(ledger, backend, ledger_wait_s=1.0, max_concurrent_clips=4), "job", clips(4))
    finally:
        postgres_server.start_again()
    assert [o.status for o in result.outcomes] == ["enhanced"] * 4, "the references are good: the ledger lagged"
    assert sorted(c.clip_id for c in result.unrecorded_charges) == ["c0", "c1", "c2", "c3"]
    assert sum(c.cost for c in result.unrecorded_charges) == sum(o.cost for o in result.outcomes) == Decimal("0.02")
    assert ledger.job_costs("job") == []
    assert ledger.record_charges(result.unrecorded_charges) == 4
    assert ledger.record_charges(result.unrecorded_charges) == 0, "a second replay writes nothing"
    rows = ledger.job_costs("job")
    assert len(rows) == 4 and ledger.total_cost("job") == Decimal("0.02") == sum(r["cost"] for r in rows)


# -- malformed answers -----------------------------------------------------------------------------


def good_answer(body: dict) -> dict:
    return answer_for(body)


BAD_ANSWERS = {
    "html": lambda: httpx.Response(200, text="<html><body>upstream connect error</body></html>",
                                   headers={"content-type": "text/html"}),
    "ok_true": lambda: httpx.Response(200, json={"ok": True}),
    "no_images": lambda: httpx.Response(200, json={**good_answer({"seed": 1}), "images": []}),
}


def service_answering(bad_first: int, bad) -> ServiceBackend:
    """A ServiceBackend whose service answers `bad()` to the first `bad_first` requests, then properly."""
    seen = []

    async def reply(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return bad() if len(seen) <= bad_first else httpx.Response(200, json=good_answer(json.loads(request.content)))

    return ServiceBackend("http://svc", async_transport=httpx.MockTransport(reply))


@pytest.mark.parametrize("answer", sorted(BAD_ANSWERS))
def test_malformed_service_answers_are_retried_never_raised(ledger, answer):
    sleeps = Sleeps()
    backend = service_answering(2, BAD_ANSWERS[answer])
    result = apply(applicator(ledger, backend, sleep=sleeps, max_concurrent_clips=1), "job", clips(3))
    assert [(o.status, o.attempts) for o in result.outcomes] == [("enhanced", 3), ("enhanced", 1), ("enhanced", 1)]
    assert sleeps == [2.0, 4.0]
    assert len(assert_ledger_matches(ledger, "job", result)) == 3


@pytest.mark.parametrize("answer", sorted(BAD_ANSWERS))
def test_a_service_that_only_answers_garbage_leaves_the_originals(ledger, answer):
    sleeps = Sleeps()
    backend = service_answering(100, BAD_ANSWERS[answer])
    result = apply(applicator(ledger, backend, sleep=sleeps, max_concurrent_clips=1), "job", clips(2))
    assert result.path == "reference_fallback" and result.clips == clips(2)
    assert [(o.reason, o.attempts) for o in result.outcomes] == [("invalid_answer", 4), ("invalid_answer", 0)]
    assert sleeps == [2.0, 4.0, 8.0] and len(result.warnings) == 2
    assert assert_ledger_matches(ledger, "job", result) == []


def test_html_from_replicate_on_the_direct_path_falls_back_to_preprocessing(ledger):
    matrix = direct_kling(ledger)
    with FakeReplicate() as fake:
        fake.script = ["html", "html"]  # the direct attempt and its one retry
        client = ReplicateClient("token", base_url=fake.url, poll_interval_s=0.01)
        result = apply(applicator(ledger, ScriptedBackend(), replicate=client, matrix=matrix), "job", clips(1))
    assert [c["action"] for c in fake.calls] == ["html", "html", "ok"]
    assert [(o.status, o.attempts) for o in result.outcomes] == [("enhanced", 3)]
    assert result.path == "preprocessed" and result.clips[0].video_url.endswith(".mp4")
    rows = assert_ledger_matches(ledger, "job", result)
    assert [r["api_name"] for r in rows] == ["sdxl_lora_preprocessing"]


# -- event loops and threads -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed_latency_service():
    from sdxl_lora_tools.bench.clips import FixedLatencyService
    from sdxl_lora_tools.local_servers import LocalServer

    fake = FixedLatencyService(latency_s=0.1)
    with LocalServer(fake.app) as base:
        yield fake, base


def test_one_backend_serves_two_event_loops_and_threads(ledger, fixed_latency_service):
    _, base = fixed_latency_service
    backend = ServiceBackend(base)
    shared = applicator(ledger, backend)
    results = {job: apply(shared, job, clips(2)) for job in ("job-1", "job-2")}  # two asyncio.run() in a row
    errors = []

    def in_thread(job: str) -> None:
        try:
            results[job] = apply(shared, job, clips(2))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=in_thread, args=(f"job-t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with LoraApplicator(store=ledger, preprocessing=backend) as sync:  # and the sync applicator's own loop
        results["job-s"] = sync.apply("job-s", clips(2), "kling_v21", "char")
    assert not errors
    for job, result in results.items():
        assert [o.status for o in result.outcomes] == ["enhanced"] * 2, (job, result.warnings)
        assert len(ledger.job_costs(job)) == 2
    backend.close()


# -- cancellation ------------------------------------------------------------------------------------


async def cancel_when(task: asyncio.Task, ready, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, "the job never got there"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_cancelling_a_job_stops_its_clips_and_writes_nothing_after(ledger):
    backend = ScriptedBackend(latency_s=0.5)

    async def main():
        task = asyncio.create_task(applicator(ledger, backend, max_concurrent_clips=2).apply(
            "job", clips(6), "kling_v21", "char"))
        await cancel_when(task, lambda: len(backend.requests) >= 2)  # two answered, two more in flight
        assert backend.in_flight == 0, "no request of the job is left running"

    asyncio.run(main())
    rows = ledger.job_costs("job")
    assert len(rows) <= 4 and len(backend.requests) <= 4
    assert ledger.total_cost("job") == sum(r["cost"] for r in rows)
    time.sleep(LATE_S)
    assert ledger.job_costs("job") == rows, "a charge landed after the cancellation"


def test_cancelling_while_charges_wait_for_the_database_writes_nothing(postgres_server, ledger):
    backend = FaultOnAnswer(postgres_server.shut_down, latency_s=0.1)

    async def main():
        task = asyncio.create_task(applicator(ledger, backend, max_concurrent_clips=1).apply(
            "job", clips(2), "kling_v21", "char"))
        await cancel_when(task, lambda: backend.faulted and backend.in_flight == 0)
        await asyncio.sleep(0.3)  # the charges' retries were waiting: they must be gone

    try:
        asyncio.run(main())
    finally:
        postgres_server.start_again()
    time.sleep(LATE_S)
    assert ledger.job_costs("job") == [] and ledger.total_cost("job") == 0


def test_cancelling_a_direct_job_cancels_its_replicate_prediction(ledger):
    matrix = direct_kling(ledger)
    with FakeReplicate() as fake:
        fake.script = ["hang"]
        client = ReplicateClient("token", base_url=fake.url, poll_interval_s=0.01)

        async def main():
            task = asyncio.create_task(applicator(ledger, ScriptedBackend(), replicate=client, matrix=matrix).apply(
                "job", clips(1), "kling_v21", "char"))
            await cancel_when(task, lambda: len(fake.polls) >= 1)  # the client holds the prediction's id

        asyncio.run(main())
        assert fake.cancelled == ["p1"] and fake.predictions["p1"]["status"] == "canceled"
    assert ledger.job_costs("job") == []
