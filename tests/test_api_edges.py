"""The API's edges without a pipeline: every error body in the contract's envelope. Plus the render
turn the app hands the service."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from contextlib import contextmanager
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from api.app import create_app
from inference.errors import RequestCancelled, validation_message
from inference.service import InferenceService
from inference.settings import Settings
from sdxl_lora_client.contract import GenerateRequest
from tests.fakes import LiveServer

API_KEY = "edge-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
AUTH_LINE = b"Authorization: Bearer " + API_KEY.encode()
UVICORN_400 = b"Invalid HTTP request received."


class Unloaded:
    """A service whose pipeline never loads: the app's edges need none."""

    ready = False
    settings = Settings(model="unused", device="cpu")

    def load(self) -> None:
        pass

    def adapters(self) -> dict:
        raise RuntimeError("a bug past every handler")


class FailsToLoad(Unloaded):
    def load(self) -> None:
        raise OSError("no such model")


def live(service, http: str = "auto") -> LiveServer:
    server = LiveServer(create_app(Settings(model="unused", device="cpu", api_key=API_KEY), service=service))
    server.server.config.http = http  # read when the server starts: "h11" or "httptools" (auto: httptools if installed)
    return server


@pytest.fixture(scope="module")
def base():
    with live(Unloaded()) as url:
        yield url


def assert_envelope(response: httpx.Response, code: str, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"code", "message"}, response.text
    assert error["code"] == code and error["message"]
    assert response.headers["x-error-code"] == code
    return error


def raw(base_url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (httpx refuses to send what a hostile caller would); status, headers, body."""
    host, port = urlsplit(base_url).hostname, urlsplit(base_url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def post_with_header(base_url: str, header: bytes) -> tuple[int, dict[str, str], bytes]:
    body = b'{"prompt": "x"}'
    return raw(base_url, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header
               + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


# -- one error body ------------------------------------------------------------------------------


def test_every_error_the_api_writes_is_the_envelope_with_its_code_in_x_error_code(base):
    assert assert_envelope(httpx.get(f"{base}/readyz"), "busy", 503)["message"] == "pipeline loading"
    assert_envelope(httpx.get(f"{base}/no/such/route"), "invalid_request", 404)
    assert_envelope(httpx.get(f"{base}/v1/generate"), "invalid_request", 405)
    assert_envelope(httpx.post(f"{base}/v1/generate", json={"prompt": "x"}), "unauthorized", 401)
    assert_envelope(httpx.post(f"{base}/v1/generate", content=b"{not json", headers=AUTH), "invalid_request", 422)
    error = assert_envelope(httpx.post(f"{base}/v1/generate", json={"prompt": "x", "width": "wide"}, headers=AUTH),
                            "invalid_request", 422)
    assert error["message"] == "width: Input should be a valid integer"
    busy = httpx.post(f"{base}/v1/generate", json={"prompt": "x"}, headers=AUTH)
    assert_envelope(busy, "busy", 429)
    assert int(busy.headers["retry-after"]) >= 1
    assert_envelope(httpx.get(f"{base}/v1/adapters", headers=AUTH), "internal", 500)  # past every handler


def test_the_body_limit_answers_in_the_envelope_before_reading_the_body(base):
    status, headers, body = raw(base, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: 999999999999\r\n\r\n")
    assert status == 422 and headers["x-error-code"] == "invalid_request", body
    assert json.loads(body)["error"]["message"].startswith("the request body is larger than the")


def test_readyz_says_why_the_pipeline_failed_and_that_it_drains_in_the_envelope():
    service = FailsToLoad()
    app = create_app(Settings(model="unused", device="cpu"), service=service)
    with LiveServer(app) as url:
        deadline = time.monotonic() + 30
        while (response := httpx.get(f"{url}/readyz")).json()["error"]["code"] != "internal":
            assert time.monotonic() < deadline, response.text
            time.sleep(0.05)
        assert "no such model" in assert_envelope(response, "internal", 503)["message"]
        app.state.service_state.begin_drain()
        assert assert_envelope(httpx.get(f"{url}/readyz"), "busy", 503)["message"] == "shutting down"


def test_the_validation_message_names_each_field_the_caller_wrote():
    errors = [{"loc": ("body", "loras", 0, "url"), "msg": "bad scheme"}, {"loc": ("body",), "msg": "not an object"}]
    assert validation_message(errors) == "loras.0.url: bad scheme; body: not an object"
    assert validation_message([{"loc": (), "msg": "not an object"}], drop_loc=(), whole="input") == "input: not an object"
    with pytest.raises(Exception) as caught:
        GenerateRequest.model_validate({"prompt": "x", "num_images": 0})
    assert validation_message(caught.value.errors(), drop_loc=()) == (
        "num_images: Input should be greater than or equal to 1")


# -- the render turn -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory):
    svc = InferenceService(Settings(model=str(tiny_model), device="cpu",
                                    lora_cache_dir=tmp_path_factory.mktemp("cache")))
    svc.load()
    return svc


def recording_turn(events: list[str]):
    @contextmanager
    def turn():
        events.append("turn taken")
        try:
            yield
        finally:
            events.append("turn given back")

    return turn


def test_the_service_holds_the_render_turn_from_ready_inputs_to_before_encoding(service):
    events: list[str] = []
    request = GenerateRequest(prompt="x", width=64, height=64, num_inference_steps=2, seed=1)
    service.generate(request, progress=events.append, render_turn=recording_turn(events))
    assert events == ["fetch", "generate", "turn taken", "turn given back", "encode"]


def test_a_request_stopped_while_rendering_gives_the_turn_back(service):
    events: list[str] = []
    cancel = threading.Event()
    cancel.set()
    request = GenerateRequest(prompt="x", width=64, height=64, num_inference_steps=2, seed=1)
    with pytest.raises(RequestCancelled):
        service.generate(request, progress=events.append, cancel=cancel, render_turn=recording_turn(events))
    assert events[-2:] == ["turn taken", "turn given back"] and "encode" not in events
