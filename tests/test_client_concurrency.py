"""Clips side by side and the async applicator: the same behaviour as the sync one, one clip's
failure its own, results in the clips' order, every charge once.

Run against a fake service of fixed latency on loopback (bench/clips.py) and scripted backends;
the real tiny service is in tests/test_client.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
from decimal import Decimal

import pytest
from PIL import Image

from sdxl_lora_tools.bench.clips import FixedLatencyService, seed_colour
from sdxl_lora_client import AsyncLoraApplicator, ClipPrompt, LoraApplicator, ServiceBackend, SqlStore
from sdxl_lora_client.clip_requests import clip_seed
from sdxl_lora_client.testing import ScriptedBackend
from tests.fakes import LiveServer

REF = "https://cdn.example/ref-{}.png"


@pytest.fixture
def store(tmp_path) -> SqlStore:
    store = SqlStore(f"sqlite:///{tmp_path / 'video.db'}")
    store.put_lora("char", status="completed", url="https://bucket.example/char.safetensors", trigger="<s0>")
    return store


def clips(count: int) -> list[ClipPrompt]:
    return [ClipPrompt(f"c{i}", f"shot {i}", [REF.format(i)], ["https://cdn.example/scene.png"]) for i in range(count)]


def apply(kind: str, store, backend, job_id: str, clip_list, **kwargs):
    """One job through the sync or the async applicator."""
    if kind == "sync":
        return LoraApplicator(store=store, preprocessing=backend, **kwargs).apply(job_id, clip_list, "kling_v21", "char")

    async def run():
        return await AsyncLoraApplicator(store=store, preprocessing=backend, **kwargs).apply(
            job_id, clip_list, "kling_v21", "char")

    return asyncio.run(run())


def colour_of(data_uri: str) -> tuple[int, int, int]:
    return Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).convert("RGB").getpixel((0, 0))


def assert_costs_consistent(store, job_id):
    rows = store.job_costs(job_id)
    assert store.total_cost(job_id) == sum(r["cost"] for r in rows), "Decimal: exactly"
    return rows


@pytest.fixture(scope="module")
def fake_service():
    fake = FixedLatencyService(latency_s=0.3)
    with LiveServer(fake.app) as base:
        yield fake, base


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("limit", [1, 3, 5])
def test_clips_run_side_by_side_up_to_the_limit_and_come_back_in_order(store, fake_service, kind, limit):
    fake, base = fake_service
    fake.peak = 0
    result = apply(kind, store, ServiceBackend(base), f"job-{kind}-{limit}", clips(5), max_concurrent_clips=limit)
    assert fake.peak == limit, "exactly max_concurrent_clips requests in flight at the busiest moment"
    assert result.path == "preprocessed" and result.warnings == []
    for i, clip in enumerate(result.clips):
        assert clip.clip_id == f"c{i}"
        assert colour_of(clip.character_reference_urls[0]) == seed_colour(clip_seed(f"job-{kind}-{limit}", f"c{i}"))
        assert clip.scene_reference_urls == ["https://cdn.example/scene.png"]
    rows = assert_costs_consistent(store, f"job-{kind}-{limit}")
    assert sorted(r["clip_id"] for r in rows) == [f"c{i}" for i in range(5)]


class Sleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_each_clip_retries_and_falls_back_on_its_own(store, kind):
    backend = ScriptedBackend({REF.format(1): ["busy:2", "out_of_memory"], REF.format(2): ["image_invalid"]})
    sleeps = Sleeps()
    result = apply(kind, store, backend, "job", clips(4), sleep=sleeps, jitter=lambda: 0.5)
    assert sorted(sleeps) == [2.0, 3.0], "only c1 waited: Retry-After 2 s + half of it, then the schedule's first 2 s"
    assert backend.attempts == {REF.format(0): 1, REF.format(1): 3, REF.format(2): 1, REF.format(3): 1}
    assert result.path == "preprocessed"
    enhanced = [c.character_reference_urls[0].startswith("data:") for c in result.clips]
    assert enhanced == [True, True, False, True], "c2 keeps its original reference, the others are enhanced"
    assert result.clips[2].character_reference_urls == [REF.format(2)]
    assert [(o.status, o.reason, o.attempts) for o in result.outcomes] == [
        ("enhanced", None, 1), ("enhanced", None, 3), ("original", "image_invalid", 1), ("enhanced", None, 1)]
    assert [w.split(":")[0] for w in result.warnings] == ["clip c2"], "a bad reference is that clip's own"
    rows = assert_costs_consistent(store, "job")
    assert sorted(r["clip_id"] for r in rows) == ["c0", "c1", "c3"], "every rendered clip charged once"


def test_async_and_sync_applicators_give_the_same_result(store, fake_service):
    _, base = fake_service
    sync = apply("sync", store, ServiceBackend(base), "job-a", clips(3))
    again = apply("async", store, ServiceBackend(base), "job-a", clips(3))
    assert [o.cost for o in sync.outcomes] == [Decimal("0.005")] * 3
    assert [o.cost for o in again.outcomes] == [Decimal(0)] * 3, "the replay charged nothing: its cost is 0"
    for outcome in again.outcomes:
        outcome.cost = Decimal("0.005")
    assert again == sync, "same job, same clips, same enhanced references and warnings"
    assert len(assert_costs_consistent(store, "job-a")) == 3, "the replay charged nothing twice"


def test_a_backend_with_only_generate_works_with_the_async_applicator(store):
    class SyncOnly:
        def __init__(self):
            self.inner = ScriptedBackend({})

        def generate(self, request, idempotency_key=None):
            return self.inner.generate(request)

    result = apply("async", store, SyncOnly(), "job", clips(2))
    assert result.path == "preprocessed" and all(c.character_reference_urls[0].startswith("data:") for c in result.clips)


def test_the_sync_applicator_works_from_inside_a_running_event_loop(store):
    async def caller():  # e.g. sync library code called from an async video generator
        return LoraApplicator(store=store, preprocessing=ScriptedBackend({})).apply(
            "job", clips(2), "kling_v21", "char")

    result = asyncio.run(caller())
    assert result.path == "preprocessed"


def test_twenty_tasks_applying_the_same_job_charge_each_clip_once(store):
    async def main():
        applicator = AsyncLoraApplicator(store=store, preprocessing=ScriptedBackend({}), max_concurrent_clips=4)
        return await asyncio.gather(*(applicator.apply("job-3", clips(3), "kling_v21", "char") for _ in range(20)))

    results = asyncio.run(main())
    assert all(r.path == "preprocessed" for r in results)
    rows = assert_costs_consistent(store, "job-3")
    assert sorted(r["clip_id"] for r in rows) == ["c0", "c1", "c2"]


def test_max_concurrent_clips_must_be_positive(store):
    with pytest.raises(ValueError, match="max_concurrent_clips"):
        LoraApplicator(store=store, max_concurrent_clips=0)
