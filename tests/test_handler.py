"""The RunPod handler under the runpod SDK's own local modes, against the FastAPI service."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sdxl_lora_client.contract import GenerateRequest
from handler.worker import make_handler
from inference.backpressure import RETRY_AFTER_MESSAGE
from inference.service import InferenceService
from inference.settings import Settings
from tests.fakes import LiveServer, start_handler_api, wait_ready
from tests.servers import FileServer
from tests.test_api import post

ROOT = Path(__file__).resolve().parents[1]


def blocking(handler):
    """The async handler, called as the SDK's loop would, one job at a time."""
    return lambda job: asyncio.run(handler(job))


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("served")
    (root / "a.safetensors").write_bytes(make_lora(seed=1, text_encoders=True).read_bytes())
    with FileServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def body(lora_server) -> dict:
    return {"prompt": "a character portrait", "num_inference_steps": 3, "width": 64, "height": 64, "seed": 5,
            "loras": [{"id": "char-a", "url": lora_server.url("a.safetensors"), "scale": 0.8}]}


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory, tiny_model) -> dict:
    env = dict(os.environ)
    env.update(SDXL_LORA_MODEL=str(tiny_model), SDXL_LORA_DEVICE="cpu", SDXL_LORA_ALLOW_PRIVATE_URLS="true",
               SDXL_LORA_LORA_CACHE_DIR=str(tmp_path_factory.mktemp("worker-cache")), PYTHONPATH=str(ROOT))
    env.pop("RUNPOD_WEBHOOK_POST_OUTPUT", None)
    return env


@pytest.fixture(scope="module")
def fastapi_image(tmp_path_factory, tiny_model, body) -> dict:
    settings = Settings(model=str(tiny_model), device="cpu", allow_private_urls=True,
                        lora_cache_dir=tmp_path_factory.mktemp("api-cache"))
    from api.app import create_app

    with LiveServer(create_app(settings)) as base:
        wait_ready(base)
        response = post(base, body, key=None)
    assert response.status_code == 200, response.text
    return response.json()["images"][0]


def test_test_input_mode_returns_the_fastapi_image(worker_env, body, fastapi_image):
    proc = subprocess.run([sys.executable, "-m", "handler", "--test_input", json.dumps({"input": body})],
                          env=worker_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    # The SDK logs the result dict (truncated in the middle); the image's sha256 precedes its base64.
    sha = re.search(r"'sha256': '([0-9a-f]{64})'", output)
    assert sha and sha.group(1) == fastapi_image["sha256"]


def test_test_input_mode_exits_1_on_an_error_result(worker_env):
    proc = subprocess.run([sys.executable, "-m", "handler", "--test_input", json.dumps({"input": {"prompt": ""}})],
                          env=worker_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "invalid_request" in proc.stdout + proc.stderr


def test_serve_api_runsync_and_run_status_return_the_fastapi_image(worker_env, body, fastapi_image):
    proc, base = start_handler_api(worker_env, ROOT)
    try:
        sync = httpx.post(f"{base}/runsync", json={"input": body}, timeout=120).json()
        assert sync["status"] == "COMPLETED", sync
        assert sync["output"]["images"][0]["sha256"] == fastapi_image["sha256"]
        assert sync["output"]["images"][0]["base64"] == fastapi_image["base64"]

        job = httpx.post(f"{base}/run", json={"input": body}, timeout=30).json()
        status = httpx.post(f"{base}/status/{job['id']}", timeout=120).json()
        assert status["status"] == "COMPLETED", status
        assert status["output"]["images"][0]["sha256"] == fastapi_image["sha256"]

        keyed = {"input": {**body, "seed": None, "idempotency_key": "job-1/clip-1"}}  # a repeat would pick another seed
        first = httpx.post(f"{base}/runsync", json=keyed, timeout=120).json()
        assert first["status"] == "COMPLETED", first
        assert httpx.post(f"{base}/runsync", json=keyed, timeout=120).json()["output"] == first["output"]

        failed = httpx.post(f"{base}/runsync", json={"input": {**body, "width": 63}}, timeout=60)
        assert failed.status_code == 200 and failed.json()["status"] == "FAILED"
        error = json.loads(failed.json()["error"])
        assert error["code"] == "invalid_request" and "width" in error["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_handler_maps_every_failure_to_a_json_string_error(tiny_model, tmp_path, lora_server):
    service = InferenceService(Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path))
    service.load()
    handler = blocking(make_handler(service))
    for job_input, code in [
        ({"prompt": "x", "steps": 3}, "invalid_request"),  # unknown field
        ({"prompt": "x", "loras": [{"id": "a", "url": lora_server.url("a.safetensors")}]}, "lora_download_failed"),
        ({"prompt": "x", "image": "ftp://example.com/x.png"}, "image_invalid"),
    ]:
        result = handler({"id": "job", "input": job_input})
        assert isinstance(result["error"], str)
        assert json.loads(result["error"])["code"] == code
    ok = handler({"id": "job", "input": GenerateRequest(prompt="x", num_inference_steps=1, width=64, height=64).model_dump()})
    assert "error" not in ok and ok["images"][0]["width"] == 64


def test_handler_answers_a_repeated_idempotency_key_without_rendering(tiny_model, tmp_path):
    service = InferenceService(Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path))
    service.load()
    handler = blocking(make_handler(service))
    job_input = {"prompt": "x", "num_inference_steps": 1, "width": 64, "height": 64, "idempotency_key": "job-1/clip-1"}
    first = handler({"id": "job-a", "input": job_input})  # no seed: a second render would pick another one
    assert "error" not in first, first
    assert handler({"id": "job-b", "input": dict(job_input)}) == first
    assert service.images_rendered == 1
    for bad_input in ({**job_input, "prompt": "y"}, {**job_input, "idempotency_key": ""},
                      {**job_input, "idempotency_key": 7}, {**job_input, "idempotency_key": None}):
        error = json.loads(handler({"id": "job-c", "input": bad_input})["error"])
        assert error["code"] == "invalid_request" and "idempotency" in error["message"]
    assert service.images_rendered == 1
    assert "error" not in handler({"id": "job-d", "input": {**job_input, "idempotency_key": "job-1/clip-2"}})
    assert service.images_rendered == 2


def test_handler_busy_message_carries_retry_after(tiny_model, tmp_path):
    not_loaded = InferenceService(Settings(model=str(tiny_model), device="cpu", lora_cache_dir=tmp_path))
    error = json.loads(blocking(make_handler(not_loaded))({"id": "job", "input": {"prompt": "x"}})["error"])
    assert error["code"] == "busy" and error["message"].startswith("the pipeline is still loading")
    assert int(RETRY_AFTER_MESSAGE.search(error["message"]).group(1)) >= 1
