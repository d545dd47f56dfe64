"""The API's edges without a pipeline: every error body in the contract's envelope, header errors
as a hostile caller sends them (raw bytes over a socket to a real uvicorn), no /docs, and a check
page that loads nothing from elsewhere. Plus the render turn the app hands the service."""

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
        app.state.admission.begin_drain()
        assert assert_envelope(httpx.get(f"{url}/readyz"), "busy", 503)["message"] == "shutting down"


def test_the_validation_message_names_each_field_the_caller_wrote():
    errors = [{"loc": ("body", "loras", 0, "url"), "msg": "bad scheme"}, {"loc": ("body",), "msg": "not an object"}]
    assert validation_message(errors) == "loras.0.url: bad scheme; body: not an object"
    assert validation_message([{"loc": (), "msg": "not an object"}], drop_loc=(), whole="input") == "input: not an object"
    with pytest.raises(Exception) as caught:
        GenerateRequest.model_validate({"prompt": "x", "num_images": 0})
    assert validation_message(caught.value.errors(), drop_loc=()) == (
        "num_images: Input should be greater than or equal to 1")


# -- header errors ---------------------------------------------------------------------------------

# Bytes inside a header value. Which ones reach the app depends on uvicorn's parser (h11 lets most
# control characters through, httptools only tab and obs-text); whatever reaches it must get the
# envelope, the rest uvicorn's own plain 400, which no app code can change.
HEADER_BYTES = [bytes([b]) for b in [*range(0x00, 0x20), 0x7F, 0x80, 0xFF] if b not in (0x0A, 0x0D)]
HEADER_LINES = {  # header lines, %s the byte -> the status and code when the byte reaches the app
    AUTH_LINE + b"\r\nIdempotency-Key: a%sb": (422, "invalid_request"),
    b"Authorization: Bearer edge%s-key": (401, "unauthorized"),
}


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_a_header_byte_either_never_reaches_the_app_or_gets_the_envelope(http):
    reached: set[bytes] = set()
    with live(Unloaded(), http) as url:
        for lines, (expected_status, code) in HEADER_LINES.items():
            for byte in HEADER_BYTES:
                status, headers, body = post_with_header(url, lines % byte)
                if (status, body) == (400, UVICORN_400):
                    continue
                reached.add(byte)
                assert (status, headers.get("x-error-code"), json.loads(body)["error"]["code"]) == (
                    expected_status, code, code), (http, lines % byte, body)
    assert {b"\t", b"\x80", b"\xff"} <= reached  # tab and obs-text reach the app with either parser
    assert b"\x00" not in reached


@pytest.mark.parametrize("header", [b"Idempotency-Key: " + b"k" * 201, b"Idempotency-Key: two words",
                                    "Idempotency-Key: cl\u00e9".encode(), b"Idempotency-Key:"])
def test_a_malformed_idempotency_key_is_invalid_request_naming_the_header(base, header):
    status, headers, body = post_with_header(base, AUTH_LINE + b"\r\n" + header)
    assert (status, headers["x-error-code"]) == (422, "invalid_request"), body
    assert "Idempotency-Key" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("header", [b"Authorization: " + API_KEY.encode(), b"Authorization: Basic ZWRnZS1rZXk=",
                                    b"Authorization:", b"Authorization: Bearer", b"Authorization: Bearer  "])
def test_a_malformed_authorization_header_is_unauthorized(base, header):
    status, headers, body = post_with_header(base, header)
    assert (status, headers["x-error-code"], json.loads(body)["error"]["code"]) == (401, "unauthorized", "unauthorized")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_a_body_that_is_not_declared_json_is_invalid_request(base, content_type):
    response = httpx.post(f"{base}/v1/generate", content=b'{"prompt": "x"}',
                          headers={**AUTH, "content-type": content_type})
    assert assert_envelope(response, "invalid_request", 422)["message"].startswith("body: ")


def test_a_request_id_that_is_not_printable_ascii_is_replaced_not_echoed(base):
    assert httpx.get(f"{base}/healthz", headers={"x-request-id": "job-7.clip-2"}).headers["x-request-id"] == "job-7.clip-2"
    status, headers, _ = raw(base, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\tb\x80\r\nConnection: close\r\n\r\n")
    assert status == 200 and re.fullmatch(r"[0-9a-f]{16}", headers["x-request-id"]), headers


# -- no /docs, nothing from elsewhere ------------------------------------------------------------

def test_docs_are_off_and_the_schema_stays(base):
    assert_envelope(httpx.get(f"{base}/docs"), "invalid_request", 404)
    assert_envelope(httpx.get(f"{base}/redoc"), "invalid_request", 404)
    assert "/v1/generate" in httpx.get(f"{base}/openapi.json").json()["paths"]


class PageLoads(HTMLParser):
    """What an HTML page makes the browser load: the attributes that fetch, and its inline code."""

    FETCHING = {"src", "href", "srcset", "poster", "action", "formaction", "data", "manifest", "background"}

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.code: list[str] = []  # inline <script>/<style> text and style attributes
        self._in_code = False

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in self.FETCHING and value:
                self.targets += [part.split()[0] for part in value.split(",")] if name == "srcset" else [value]
            elif name == "style" or (name == "content" and tag == "meta"):
                self.code.append(value or "")
        self._in_code = tag in ("script", "style")

    def handle_endtag(self, tag):
        self._in_code = False

    def handle_data(self, data):
        if self._in_code:
            self.code.append(data)


CSS_LOADS = re.compile(r"""url\(\s*["']?([^"')]*)|@import\s+["']([^"']*)""", re.I)
# Module imports resolve against the script; what it fetches resolves against the page, and is
# checked by the scan for other origins below, not followed.
JS_LOADS = re.compile(r"""(?:\bfrom|\bimport\s*\(|\bimport|\bWorker\(|\bimportScripts\()\s*["'`]([^"'`]*)""")
COMMENTS = re.compile(r"""/\*[\s\S]*?\*/|(?<![:\w"'`\\])//[^\n]*""")
ELSEWHERE = re.compile(r"(?:https?:)?//[\w.-]+|\b(?:wss?|ftp):", re.I)


def loads_of(url: str, content_type: str, text: str) -> tuple[list[str], list[str]]:
    """What a page or asset loads (to follow) and its code with the comments left out (to scan)."""
    if content_type.startswith("text/html"):
        page = PageLoads()
        page.feed(text)
        return page.targets, page.code
    code = COMMENTS.sub("", text)
    pattern = CSS_LOADS if content_type.startswith("text/css") else JS_LOADS
    return [next(filter(None, m.groups()), "") for m in pattern.finditer(code)], [code]


def test_the_check_page_and_everything_it_loads_stay_on_the_origin(base):
    origin = urlsplit(base).netloc
    seen, todo = set(), [f"{base}/"]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        response = httpx.get(url)
        assert response.status_code == 200, url
        targets, code = loads_of(url, response.headers["content-type"], response.text)
        for target in targets:
            if not target.startswith(("data:", "#", "blob:")):
                absolute = urljoin(url, target).split("#")[0]
                assert urlsplit(absolute).netloc == origin, (url, target)
                todo.append(absolute)
        # Nothing it runs names another origin either (an address built at run time would show here).
        assert not [found for part in code for found in ELSEWHERE.findall(part)], (url, code)
    assert {f"{base}/", f"{base}/static/check.js", f"{base}/static/check.css"} <= seen


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
