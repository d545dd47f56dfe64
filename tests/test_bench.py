"""Smoke runs: the benchmarks still execute and report their keys (figures come from bench/, not here)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def bench_cache(tmp_path, monkeypatch, tiny_model):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / ".cache" / "bench" / "tiny-sdxl")


def test_adapters_bench_reports_every_variant():
    from sdxl_lora_tools.bench.adapters import run

    result = run(size="tiny", rank=4, loras=3, repeats=1, steps=1, as_json=True)
    for key in ("naive_reload_ms", "cold_load_ms", "cold_locked_ms", "first_cold_load_ms", "first_cold_locked_ms",
                "hotswap_ms", "hotswap_locked_ms",
                "resident_switch_ms", "base_generate_ms", "lora_generate_ms"):
        assert result[key] > 0
    assert result["cold_locked_ms"] < result["cold_load_ms"]
    assert set(result["switch_ms_by_resident"]) == {2, 8, 16} and all(result["switch_ms_by_resident"].values())


def test_replay_bench_reports_ratio_and_share():
    from sdxl_lora_tools.bench.replay import run

    result = run(size="tiny", requests=4, loras=2, rank=4, steps=1, block=2, as_json=True)
    assert result["service_s"] > 0 and result["naive_s"] > 0
    assert 0 < result["adapter_share"] < 1 and result["p95_ms"] >= result["p50_ms"]


def test_overhead_bench_reports_ratio():
    from sdxl_lora_tools.bench.overhead import run

    result = run(size="tiny", repeats=1, steps=1, as_json=True)
    assert result["ratio"] == pytest.approx(result["http_ms"] / result["direct_ms"])


def test_soak_bench_answers_everything_and_reports_memory():
    from sdxl_lora_tools.bench.soak import run

    result = run(duration=3, clients=2, loras=4, max_resident=2, disk_loras=2, as_json=True)
    assert result["requests_tried"] > 0 and result["requests_lost"] == 0
    assert result["requests_answered"] == result["requests_tried"]
    assert result["five_xx_not_injected"] == 0 and result["unexpected"] == {}
    assert result["adapters_consistent"] and result["rss_after_soak_mb"] > 0 and result["rss_ratio"] > 0


def test_clips_bench_reports_concurrency_ratios():
    from sdxl_lora_tools.bench.clips import run

    result = run(clips=3, latency_s=0.05, repeats=1, real=True, steps=2, as_json=True)
    assert result["fake_peak_in_flight"] == 3
    for key in ("fake_sync_ratio", "fake_async_ratio", "real_sync_ratio", "real_async_ratio"):
        assert result[key] > 0


def test_soak_churn_reports_memory_after_warm_up():
    from sdxl_lora_tools.bench.soak import churn

    result = churn(activations=40, loras=4, max_resident=2, generate_every=20, warmup=8, as_json=True)
    assert result["rss_after_warmup_mb"] > 0 and result["rss_end_mb"] > 0 and len(result["rss_samples_mb"]) == 20
    assert result["adapter_injections"] >= 2


def test_compile_bench_reports_no_recompiles_and_the_generate_ratio():
    """Tiny model, eager backend, without the two start-up processes (minutes on a shared CPU; the
    inductor run times them): the sequence compiles nothing after the warm-up."""
    from sdxl_lora_tools.bench.compile import run

    result = run(size="tiny", backend="eager", steps=2, repeats=1, startup=False, as_json=True)
    assert result["recompiles"] == 0 and all(s["new_graphs"] == 0 for s in result["steps_seen"])
    assert result["a_b_a_identical"] and len(result["steps_seen"]) >= 12
    for key in ("compiled_lora_ms",
                "eager_lora_ms", "eager_fused_lora_ms", "compiled_over_eager"):
        assert result[key] > 0, key


def test_queue_bench_answers_every_request():
    from sdxl_lora_tools.bench.queue import run

    result = run(queue_maxes=(0, 8), clients=3, requests=1, service_s=0, steps=1, as_json=True)
    for queue_max in (0, 8):
        burst = result["by_queue_max"][queue_max]
        assert burst["ok"] == 3 and burst["failed"] == 0 and burst["throughput_ratio"] > 0
        assert burst["p95_s"] >= burst["p50_s"] > 0
    assert result["by_queue_max"][8]["busy"] == 0  # three callers fit a queue of eight


def test_jobs_bench_reports_throughput_latency_busy_and_charges():
    from sdxl_lora_tools.bench.jobs import run

    result = run(jobs=3, clips=2, in_flight=(4,), steps=2, baseline_requests=1, as_json=True)
    assert len(result["sequential_clips_per_s"]) == 2
    for entry in result["runs"]:
        assert entry["outcomes"] == {"enhanced": 6} and entry["charges"] == 6
        assert entry["ratio_to_sequential"] > 0 and entry["p95_job_s"] >= entry["p50_job_s"] > 0
        assert entry["pipeline_busy_share"] > 0 and entry["pipeline_ms_per_render"] > 0
        assert entry["busy_answers"] == 0
