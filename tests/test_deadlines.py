"""Every request ends within its deadline; a client that hangs up stops its generation; either way
the next request runs at once on a clean pipeline (A -> B -> A still bit-identical).

The "large" request (8 images of 512x512 at 100 steps) takes minutes on the tiny model on CPU, the
deadline here is 2 s: only an interrupted generation lets the test go on in time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import pytest

from api.admission import DEADLINE_SLACK_S
from api.app import create_app
from handler.worker import make_handler
from inference.service import InferenceService
from inference.settings import Settings
from tests.fakes import LiveServer, wait_ready
from tests.servers import FileServer

TIMEOUT_S = 8.0
LARGE = {"num_inference_steps": 100, "width": 512, "height": 512, "num_images": 8}


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("served")
    (root / "a.safetensors").write_bytes(make_lora(seed=1).read_bytes())
    (root / "b.safetensors").write_bytes(make_lora(seed=2, text_encoders=True).read_bytes())
    with FileServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory):
    settings = Settings(model=str(tiny_model), device="cpu", allow_private_urls=True, request_timeout_s=TIMEOUT_S,
                        lora_cache_dir=tmp_path_factory.mktemp("cache"), max_resident_adapters=2)
    svc = InferenceService(settings)
    svc.load()
    return settings, svc


@pytest.fixture(scope="module")
def base(service):
    settings, svc = service
    with LiveServer(create_app(settings, service=svc)) as url:
        wait_ready(url)
        yield url


def body(files, name: str | None, **extra) -> dict:
    loras = [{"id": f"id-{name}", "url": files.url(f"{name}.safetensors")}] if name else []
    return {"prompt": "a character portrait", "num_inference_steps": 3, "width": 64, "height": 64, "seed": 9,
            "loras": loras, **extra}


def image(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text[:500]
    return base64.b64decode(response.json()["images"][0]["base64"])


def interrupted(base: str, reason: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(f'sdxl_lora_interrupted_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_request_past_its_deadline_is_answered_timeout_and_the_next_runs_clean(base, files):
    a = image(httpx.post(f"{base}/v1/generate", json=body(files, "a"), timeout=60))
    b = image(httpx.post(f"{base}/v1/generate", json=body(files, "b"), timeout=60))
    before = interrupted(base, "timeout")

    started = time.monotonic()
    response = httpx.post(f"{base}/v1/generate", json=body(files, "b", **LARGE), timeout=120)
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == "timeout" and "SDXL_LORA_REQUEST_TIMEOUT_S" in error["message"]
    assert elapsed < TIMEOUT_S + DEADLINE_SLACK_S + 5, f"answered after {elapsed:.1f} s"
    assert interrupted(base, "timeout") == before + 1

    # A -> B -> A right after, on the pipeline the interrupted generation left
    assert image(httpx.post(f"{base}/v1/generate", json=body(files, "a"), timeout=60)) == a
    assert image(httpx.post(f"{base}/v1/generate", json=body(files, "b"), timeout=60)) == b
    assert image(httpx.post(f"{base}/v1/generate", json=body(files, "a"), timeout=60)) == a


def test_a_client_that_hangs_up_stops_its_generation(base, files):
    reference = image(httpx.post(f"{base}/v1/generate", json=body(files, None), timeout=60))
    before = interrupted(base, "disconnect")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s and closes the connection
        httpx.post(f"{base}/v1/generate", json=body(files, "a", **{**LARGE, "num_inference_steps": 30}), timeout=0.5)
    deadline = time.monotonic() + 30
    while interrupted(base, "disconnect") == before:
        assert time.monotonic() < deadline, "the hung-up request was never stopped"
        time.sleep(0.1)
    # had the generation gone on, this would wait minutes behind it (and time out at 60 s)
    assert image(httpx.post(f"{base}/v1/generate", json=body(files, None), timeout=60)) == reference


def test_the_runpod_handler_answers_timeout_in_its_error_string(service, files):
    _, svc = service
    output = asyncio.run(make_handler(svc)({"id": "job-1", "input": body(files, None, **LARGE)}))
    error = json.loads(output["error"])
    assert error["code"] == "timeout" and "SDXL_LORA_REQUEST_TIMEOUT_S" in error["message"]
    assert asyncio.run(make_handler(svc)({"id": "job-2", "input": body(files, None)})).get("images")
