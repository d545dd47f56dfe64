"""Many jobs through one applicator against the real tiny service at its default settings, with a
real PostgreSQL ledger: every clip enhanced, every render charged once, nothing rendered twice.

NEEDS THE SERVICE SIDE OF ISSUE 19 (the idempotency store and the metric
`sdxl_lora_images_generated_total`): without it, the replay renders again and the metric is missing.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from PIL import Image

from sdxl_lora_client import AsyncLoraApplicator, ClipPrompt, EnhanceOptions, ServiceBackend, SqlStore
from tests.fakes import LiveServer, wait_ready
from tests.postgres import postgres_server, postgres_url  # noqa: F401 - fixtures
from tests.servers import FileServer

FAST = EnhanceOptions(num_inference_steps=2, strength=0.5)
RENDERED = re.compile(r"^sdxl_lora_images_generated_total(?:\{[^}]*\})?\s+([0-9.e+]+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("files")
    (root / "char.safetensors").write_bytes(make_lora(seed=1).read_bytes())
    for i in range(5):
        Image.new("RGB", (64, 64), (40 * i, 120, 90)).save(root / f"face-{i}.png")
    with FileServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model):
    from api.app import create_app
    from inference.settings import Settings

    settings = Settings(model=str(tiny_model), device="cpu", allow_private_urls=True,
                        lora_cache_dir=tmp_path_factory.mktemp("load-cache"))  # QUEUE_MAX etc. at their defaults
    with LiveServer(create_app(settings)) as base:
        wait_ready(base)
        yield base


@pytest.fixture
def ledger(postgres_url, files):
    with SqlStore(postgres_url) as store:
        store.put_lora("char", status="completed", url=files.url("char.safetensors"), trigger="<s0>")
        yield store


def clips(files) -> list[ClipPrompt]:
    return [ClipPrompt(f"c{i}", f"shot {i}", [files.url(f"face-{i}.png")], []) for i in range(5)]


def rendered(base: str) -> int:
    match = RENDERED.search(httpx.get(f"{base}/metrics").text)
    assert match, "the service exports sdxl_lora_images_generated_total"
    return int(float(match.group(1)))


def apply_all(service, ledger, files, jobs: list[str]):
    async def main():
        async with AsyncLoraApplicator(store=ledger, preprocessing=ServiceBackend(service), options=FAST) as applicator:
            return await asyncio.gather(*(applicator.apply(job, clips(files), "kling_v21", "char") for job in jobs))

    return asyncio.run(main())


def test_twenty_concurrent_jobs_enhance_every_clip_and_renders_equal_charges(service, ledger, files):
    before = rendered(service)
    jobs = [f"job-{i}" for i in range(20)]
    results = apply_all(service, ledger, files, jobs)
    statuses = [o.status for r in results for o in r.outcomes]
    assert statuses.count("enhanced") == 100, [w for r in results for w in r.warnings][:5]
    charges = sum(len(ledger.job_costs(job)) for job in jobs)
    assert charges == 100 and rendered(service) - before == charges


def test_concurrent_applies_of_one_job_and_a_replay_render_each_clip_once(service, ledger, files):
    before = rendered(service)
    first = apply_all(service, ledger, files, ["job-x"] * 10)
    replay = apply_all(service, ledger, files, ["job-x"])
    assert rendered(service) - before == 5, "5 clips: 5 renders, however many applies and replays"
    references = {tuple(c.character_reference_urls[0] for c in r.clips) for r in first + replay}
    assert len(references) == 1, "the replay returns the same references"
    assert all(o.status == "enhanced" for r in first + replay for o in r.outcomes)
    assert len(ledger.job_costs("job-x")) == 5
