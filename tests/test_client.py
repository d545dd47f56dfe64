"""The thin client against a real service on loopback, a fake Replicate, and SQLite."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from sdxl_lora_client import (
    AsyncLoraApplicator, ClipPrompt, EnhanceOptions, LoraApplicator, ReplicateClient, RunPodBackend, ServiceBackend,
    SqlStore,
)
from sdxl_lora_client.compat import load_matrix
from sdxl_lora_client.testing import FakeReplicate
from tests.fakes import LiveServer, start_handler_api, wait_ready
from tests.servers import FileServer

ROOT = Path(__file__).resolve().parents[1]
FAST = EnhanceOptions(num_inference_steps=2, strength=0.7)
STATUSES_THAT_FALL_BACK = ["pending", "training", "validating", "failed"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("files")
    (root / "char.safetensors").write_bytes(make_lora(seed=1, text_encoders=True).read_bytes())
    Image.new("RGB", (64, 64), (180, 120, 90)).save(root / "face.png")
    Image.new("RGB", (64, 64), (20, 90, 200)).save(root / "face2.png")
    with FileServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model):
    from api.app import create_app
    from inference.settings import Settings

    settings = Settings(model=str(tiny_model), device="cpu", allow_private_urls=True,
                        lora_cache_dir=tmp_path_factory.mktemp("svc-cache"))
    with LiveServer(create_app(settings)) as base:
        wait_ready(base)
        yield base


@pytest.fixture
def store(tmp_path, files):
    store = SqlStore(f"sqlite:///{tmp_path / 'video.db'}")
    store.put_lora("char", status="completed", url=files.url("char.safetensors"), trigger="<s0>")
    return store


def clips(files) -> list[ClipPrompt]:
    return [
        ClipPrompt("c1", "walks into the bar", [files.url("face.png"), files.url("face2.png")], [files.url("scene.png")]),
        ClipPrompt("c2", "a wide landscape shot", [], [files.url("scene.png")]),
        ClipPrompt("c3", "turns around", [files.url("face2.png")], []),
    ]


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def applicator(store, backend, **kwargs) -> LoraApplicator:
    kwargs.setdefault("options", FAST)
    kwargs.setdefault("sleep", Sleeps())
    return LoraApplicator(store=store, preprocessing=backend, **kwargs)


def assert_costs_consistent(store, job_id):
    rows = store.job_costs(job_id)
    assert store.total_cost(job_id) == sum(r["cost"] for r in rows), "Decimal: exactly"
    return rows


def decode(data_uri: str) -> bytes:
    assert data_uri.startswith("data:image/png;base64,")
    return base64.b64decode(data_uri.split(",", 1)[1])


# -- status gate -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", STATUSES_THAT_FALL_BACK + ["missing", "no_url"])
def test_lora_not_ready_keeps_original_references(store, files, service, status):
    lora_id = "char"
    if status == "missing":
        lora_id = "nobody"
    elif status == "no_url":
        store.put_lora("char", status="completed", url=None)
    else:
        store.put_lora("char", status=status, url=files.url("char.safetensors"))
    result = applicator(store, ServiceBackend(service)).apply("job", clips(files), "kling_v21", lora_id)
    assert result.path == "reference_fallback"
    assert result.clips == clips(files)
    assert [(o.clip_id, o.status, o.reason) for o in result.outcomes] == [
        (c, "original", "lora_not_ready") for c in ("c1", "c2", "c3")]
    [warning] = result.warnings
    assert warning.startswith("all 3 clips: original reference kept (lora_not_ready: "), "one for the job"
    assert store.job_costs("job") == [] and store.total_cost("job") == 0
    assert files.hits["/char.safetensors"] == 0 or status not in ("missing", "no_url")


def test_no_lora_selected_is_path_none(store, files):
    result = applicator(store, None).apply("job", clips(files), "kling_v21", None)
    assert result.path == "none" and result.clips == clips(files) and result.warnings == []
    assert [(o.status, o.reason) for o in result.outcomes] == [("original", None)] * 3


# -- preprocessing path ------------------------------------------------------------------------


@pytest.mark.parametrize("video_model", sorted(load_matrix()) + ["some_future_model"])
def test_every_model_without_direct_weights_is_preprocessed(store, files, service, video_model):
    original = clips(files)
    result = applicator(store, ServiceBackend(service)).apply("job", original, video_model, "char")
    assert result.path == "preprocessed" and result.lora_url is None
    enhanced, untouched, second = result.clips
    assert Image.open(io.BytesIO(decode(enhanced.character_reference_urls[0]))).size == (64, 64)
    assert enhanced.character_reference_urls[1:] == original[0].character_reference_urls[1:]
    assert enhanced.scene_reference_urls == original[0].scene_reference_urls
    assert untouched == original[1]
    assert second.character_reference_urls[0].startswith("data:image/png")
    assert [(o.status, o.reason, o.cost, o.attempts) for o in result.outcomes] == [
        ("enhanced", None, Decimal("0.005"), 1), ("original", "no_character_reference", 0, 0),
        ("enhanced", None, Decimal("0.005"), 1)]
    assert decode(enhanced.character_reference_urls[0]) == base64.b64decode(result.outcomes[0].image.base64)
    assert result.warnings == [], "a clip without a character reference is not a fallback"
    assert original[0].character_reference_urls[0] == files.url("face.png"), "the caller's clips are not mutated"
    rows = assert_costs_consistent(store, "job")
    assert sorted((r["clip_id"], r["stage"], r["api_name"], r["cost"]) for r in rows) == [  # clips run side by side
        ("c1", "lora_application", "sdxl_lora_preprocessing", Decimal("0.005")),
        ("c3", "lora_application", "sdxl_lora_preprocessing", Decimal("0.005"))]


def test_the_lora_is_fetched_once_per_job_and_the_trigger_is_in_the_prompt(tmp_path, store, files, tiny_model):
    from api.app import create_app
    from inference.settings import Settings

    seen = []

    class Recording(ServiceBackend):
        async def agenerate(self, request, idempotency_key=None):
            seen.append(request)
            return await super().agenerate(request, idempotency_key)

    before = files.hits["/char.safetensors"]
    settings = Settings(model=str(tiny_model), device="cpu", allow_private_urls=True, lora_cache_dir=tmp_path / "c")
    with LiveServer(create_app(settings)) as base:
        wait_ready(base)
        applicator(store, Recording(base)).apply("job", clips(files), "hailuo_23", "char")
    assert files.hits["/char.safetensors"] - before == 1
    assert [r.prompt for r in seen] == ["<s0> walks into the bar", "<s0> turns around"]
    assert all(r.loras[0].id == "char" and r.image for r in seen)


def test_replaying_a_job_charges_nothing_twice_and_renders_the_same(store, files, service):
    first = applicator(store, ServiceBackend(service)).apply("job", clips(files), "veo_31", "char")
    total = store.total_cost("job")
    again = applicator(store, ServiceBackend(service)).apply("job", clips(files), "veo_31", "char")
    assert store.total_cost("job") == total == Decimal("0.01")
    assert len(assert_costs_consistent(store, "job")) == 2
    assert [c.character_reference_urls for c in again.clips] == [c.character_reference_urls for c in first.clips]


def test_gpu_second_pricing(store, files, service):
    from sdxl_lora_client import Pricing

    applicator(store, ServiceBackend(service), pricing=Pricing(per_gpu_second=Decimal("0.0004"))).apply(
        "job", clips(files)[:1], "veo_31", "char")
    [row] = assert_costs_consistent(store, "job")
    gpu_s = (row["details"]["timings_ms"]["adapter"] + row["details"]["timings_ms"]["inference"]) / 1e3
    assert row["cost"] == pytest.approx(Decimal(round(gpu_s * 0.0004, 6)), abs=Decimal("0.000001"))


# -- failures -----------------------------------------------------------------------------------


def test_backend_down_retries_2_4_8_then_keeps_originals_for_the_whole_job(store, files):
    sleeps = Sleeps()
    dead = ServiceBackend("http://127.0.0.1:9", timeout_s=2)
    result = applicator(store, dead, sleep=sleeps, max_concurrent_clips=1).apply("job", clips(files), "kling_v21", "char")
    assert result.path == "reference_fallback" and result.clips == clips(files)
    assert sleeps == [2.0, 4.0, 8.0], "three retries with exponential backoff, then no more for later clips"
    assert [(o.reason, o.attempts) for o in result.outcomes] == [
        ("backend_unavailable", 4), ("no_character_reference", 0), ("backend_unavailable", 0)]
    assert len(result.warnings) == 2 and "c3: original reference kept" in result.warnings[1]
    assert "skipped: clip c1 gave up" in result.warnings[1]
    assert store.job_costs("job") == [] and store.total_cost("job") == 0


def test_clips_running_side_by_side_each_retry_on_their_own(store, files):
    sleeps = Sleeps()
    dead = ServiceBackend("http://127.0.0.1:9", timeout_s=2)
    result = applicator(store, dead, sleep=sleeps).apply("job", clips(files), "kling_v21", "char")
    assert result.path == "reference_fallback" and result.clips == clips(files)
    assert sorted(sleeps) == [2.0, 2.0, 4.0, 4.0, 8.0, 8.0], "c1 and c3 started together: 2, 4, 8 s each"
    assert [o.attempts for o in result.outcomes] == [4, 0, 4]
    assert [w.split(":")[0] for w in result.warnings] == ["clips c1, c3"], "one per reason, clips in their order"
    assert store.job_costs("job") == []


def test_lora_404_is_not_retried_and_keeps_originals(store, files, service):
    store.put_lora("gone", status="completed", url=files.url("gone.safetensors"))
    sleeps = Sleeps()
    result = applicator(store, ServiceBackend(service), sleep=sleeps).apply("job", clips(files), "kling_v21", "gone")
    assert result.path == "reference_fallback" and result.clips == clips(files)
    assert sleeps == [] and {o.reason for o in result.outcomes} == {"lora_download_failed", "no_character_reference"}
    assert store.job_costs("job") == []


def test_service_answering_5xx_keeps_originals(store, files):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    broken = FastAPI()

    @broken.post("/v1/generate")
    def fail():
        return JSONResponse({"error": {"code": "internal", "message": "boom"}}, status_code=500)

    sleeps = Sleeps()
    with LiveServer(broken) as base:
        result = applicator(store, ServiceBackend(base), sleep=sleeps, max_concurrent_clips=1).apply(
            "job", clips(files), "wan_25_i2v", "char")
    assert result.path == "reference_fallback" and result.clips == clips(files)
    assert sleeps == [2.0, 4.0, 8.0]
    assert store.job_costs("job") == []


# -- direct path ---------------------------------------------------------------------------------


def direct_matrix():
    matrix = load_matrix()
    matrix["kling_v21"] = replace(matrix["kling_v21"], direct_lora_supported=True, lora_field="lora_weights")
    return matrix


def test_direct_path_passes_the_lora_in_the_models_field(store, files):
    store.put_lora("char", status="completed", url=files.url("char.safetensors"),
                   direct_weights={"kling": "https://weights.example/kling-char.safetensors"})
    with FakeReplicate() as fake:
        client = ReplicateClient("token", base_url=fake.url, poll_interval_s=0.01)
        result = applicator(store, None, replicate=client, matrix=direct_matrix()).apply(
            "job", clips(files), "kling_v21", "char")
    assert result.path == "direct" and result.lora_url == "https://weights.example/kling-char.safetensors"
    assert [c["input"].get("lora_weights") for c in fake.calls] == [result.lora_url] * 3
    first_clip = next(c for c in fake.calls if "walks into the bar" in c["input"]["prompt"])  # clips run side by side
    assert first_clip["input"]["start_image"] == files.url("face.png")
    assert all(c["prefer"].startswith("wait") for c in fake.calls)
    assert all(c.video_url and c.video_url.endswith(".mp4") for c in result.clips)
    rows = assert_costs_consistent(store, "job")
    assert [(r["api_name"], r["cost"]) for r in rows] == [("lora_direct", Decimal("0.0001"))] * 3
    assert [(o.status, o.cost, o.attempts) for o in result.outcomes] == [("direct", Decimal("0.0001"), 1)] * 3


def test_sdxl_lora_never_goes_direct_without_weights_for_that_architecture(store, files, service):
    with FakeReplicate() as fake:
        client = ReplicateClient("token", base_url=fake.url, poll_interval_s=0.01)
        result = applicator(store, ServiceBackend(service), replicate=client, matrix=direct_matrix()).apply(
            "job", clips(files)[:1], "kling_v21", "char")
    assert result.path == "preprocessed" and fake.calls == []


def test_direct_failure_retries_once_then_preprocesses_and_runs_without_the_lora(store, files, service):
    store.put_lora("char", status="completed", url=files.url("char.safetensors"),
                   direct_weights={"kling": "https://weights.example/kling-char.safetensors"})
    with FakeReplicate() as fake:
        fake.script = ["fail", "500"]  # the first clip's direct attempt and its one retry
        client = ReplicateClient("token", base_url=fake.url, poll_interval_s=0.01)
        result = applicator(store, ServiceBackend(service), replicate=client, matrix=direct_matrix()).apply(
            "job", clips(files)[:1], "kling_v21", "char")
    assert [("lora_weights" in c["input"]) for c in fake.calls] == [True, True, False]
    assert fake.calls[2]["input"]["start_image"].startswith("data:image/png"), "the enhanced reference"
    assert result.path == "preprocessed" and result.clips[0].video_url
    rows = assert_costs_consistent(store, "job")
    assert [r["api_name"] for r in rows] == ["sdxl_lora_preprocessing"]


def test_throttled_create_is_retried_after_retry_after(files):
    with FakeReplicate() as fake:
        fake.script = ["429"]
        client = ReplicateClient("token", base_url=fake.url, poll_interval_s=0.01)
        asyncio.run(client.run("kwaivgi/kling-v2.1", {"prompt": "x"}))
    assert [c["action"] for c in fake.calls] == ["429", "ok"]
    assert fake.calls[1]["at"] - fake.calls[0]["at"] >= 0.95


def test_compat_probe_reports_lora_like_inputs(capsys):
    from sdxl_lora_tools.cli import main

    with FakeReplicate(schemas={"wan-video/wan-2.2-i2v-fast": {"image": {}, "lora_weights_transformer": {},
                                                               "lora_scale_transformer": {}}}) as fake:
        assert main(["compat", "--probe", "--replicate-url", fake.url, "--token", "t"]) == 0
    out = capsys.readouterr().out
    assert "wan_22_i2v_fast" in out and "lora_scale_transformer, lora_weights_transformer" in out
    assert "kling_v21" in out


# -- RunPod backend against the real handler ----------------------------------------------------------


def test_runpod_backend_matches_the_service_backend(tmp_path, store, files, service, tiny_model):
    env = dict(os.environ, SDXL_LORA_MODEL=str(tiny_model), SDXL_LORA_DEVICE="cpu",
               SDXL_LORA_ALLOW_PRIVATE_URLS="true", SDXL_LORA_LORA_CACHE_DIR=str(tmp_path / "w"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "client")]))  # this checkout's client too
    proc, base = start_handler_api(env, ROOT)
    try:
        via_runpod = applicator(store, RunPodBackend(None, None, base_url=base)).apply(
            "job-rp", clips(files)[:1], "kling_v21", "char")

        async def async_apply():
            backend = RunPodBackend(None, None, base_url=base)
            try:
                return await AsyncLoraApplicator(store=store, preprocessing=backend, options=FAST).apply(
                    "job-rp-async", clips(files)[:1], "kling_v21", "char")
            finally:
                await backend.aclose()

        via_runpod_async = asyncio.run(async_apply())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    via_service = applicator(store, ServiceBackend(service)).apply("job-rp", clips(files)[:1], "kling_v21", "char")
    assert via_runpod.path == via_service.path == via_runpod_async.path == "preprocessed"
    runpod_image = decode(via_runpod.clips[0].character_reference_urls[0])
    assert runpod_image == decode(via_service.clips[0].character_reference_urls[0])
    assert decode(via_runpod_async.clips[0].character_reference_urls[0]) != runpod_image, \
        "another job id, another seed: a different image (the job's seed is fixed by job and clip)"


def test_async_applicator_on_the_real_service_matches_the_sync_one(store, files, service):
    sync = applicator(store, ServiceBackend(service)).apply("job-s", clips(files), "veo_31", "char")

    async def async_apply():
        backend = ServiceBackend(service)
        try:
            return await AsyncLoraApplicator(store=store, preprocessing=backend, options=FAST).apply(
                "job-s", clips(files), "veo_31", "char")
        finally:
            await backend.aclose()

    again = asyncio.run(async_apply())
    assert all(o.cost == 0 for o in again.outcomes), "a replay: this apply() charged nothing"
    again.outcomes = [replace(o, cost=s.cost) for o, s in zip(again.outcomes, sync.outcomes)]
    assert again == sync, "the same enhanced references, bit for bit, and the same warnings"
    assert len(assert_costs_consistent(store, "job-s")) == 2


# -- store -------------------------------------------------------------------------------------------------


def test_twenty_threads_charging_one_job_lose_nothing(tmp_path):
    store = SqlStore(f"sqlite:///{tmp_path / 'costs.db'}")
    store.create_job("job")
    errors = []

    def charge(i: int) -> None:
        try:
            for stage_clip in range(5):
                store.charge("job", f"clip-{i}-{stage_clip}", "lora_application", "sdxl_lora_preprocessing", 0.005)
            store.charge("job", f"clip-{i}-0", "lora_application", "sdxl_lora_preprocessing", 0.005)  # a replay
        except Exception as exc:  # noqa: BLE001 - any error is a lost charge
            errors.append(exc)

    threads = [threading.Thread(target=charge, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = assert_costs_consistent(store, "job")
    assert len(rows) == 100 and store.total_cost("job") == Decimal("0.5")


def test_demo_runs_the_whole_path(tmp_path, monkeypatch, capsys):
    from sdxl_lora_tools.demo import run_demo

    monkeypatch.chdir(tmp_path)
    sheet = run_demo(tmp_path / "out")
    out = capsys.readouterr().out
    assert "path=preprocessed" in out and "job total_cost: $0.005000" in out
    assert Image.open(sheet).size == (512, 312)  # original | enhanced, labelled
