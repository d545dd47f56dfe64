"""Fakes for the video generator's own tests: a preprocessing backend with scripted answers and a
Replicate API on loopback. No network, no GPU, nothing beyond the client's own dependencies.

    from sdxl_lora_client.testing import ScriptedBackend, FakeReplicate

    backend = ScriptedBackend({"https://cdn/ref.png": ["busy", "ok"]})   # per reference URL
    applicator = AsyncLoraApplicator(store=SqlStore("sqlite://"), preprocessing=backend, sleep=no_wait)
    result = await applicator.apply("job-1", clips, "kling_v21", "lora-1")
    assert result.outcomes[0].status == "enhanced" and backend.attempts["https://cdn/ref.png"] == 2

    with FakeReplicate() as replicate:          # script: "ok", "fail", "500", "429", "html", "hang"
        client = ReplicateClient("token", base_url=replicate.url, poll_interval_s=0.01)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import threading
import time
import zlib
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sdxl_lora_client.backends import RETRYABLE_CODES
from sdxl_lora_client.contract import GenerateRequest, GenerateResponse, PrefetchRequest, PrefetchResponse
from sdxl_lora_client.errors import BackendError, ClientCode

__all__ = ["FakeReplicate", "ScriptedBackend", "TINY_PNG_BASE64", "answer_for", "png_bytes"]

# A 1x1 PNG: what the fake backend "renders" when no size is asked.
TINY_PNG_BASE64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def png_bytes(width: int = 1, height: int = 1, rgb: tuple[int, int, int] = (200, 120, 90)) -> bytes:
    """A plain RGB PNG of one colour, written with the standard library."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def answer_for(request: dict, image_url: str | None = None) -> dict:
    """The JSON of a good answer to a generate request's JSON (seed, size, LoRAs echoed), as the
    client checks it: for the video generator's own stand-in services. `image_url`: url delivery."""
    width, height = request.get("width") or 1, request.get("height") or 1
    data = TINY_PNG if (width, height) == (1, 1) else png_bytes(width, height)
    image = {"seed": request.get("seed") or 0, "width": width, "height": height, "mime": "image/png",
             "sha256": hashlib.sha256(data).hexdigest()}
    image.update({"url": image_url} if image_url else {"base64": base64.b64encode(data).decode()})
    return {"images": [image],
            "loras": [{"id": lora["id"], "sha256": lora.get("sha256") or "0" * 64, "source": "disk"}
                      for lora in request.get("loras", [])],
            "model": {"id": "scripted", "dtype": "float32", "device": "cpu"},
            "timings_ms": {"adapter": 10.0, "inference": 90.0, "total": 100.0}}


TINY_PNG = base64.b64decode(TINY_PNG_BASE64)


class ScriptedBackend:
    """A preprocessing backend answering by the request's reference image URL.

    `script[url]` is consumed one entry per attempt: "ok"; an error code the service can answer
    (`busy`, `out_of_memory`, `lora_download_failed`, `image_invalid`, ...), raised as the
    `BackendError` a real backend raises; "busy:N" (busy, Retry-After N s); or "invalid_answer".
    Then "ok" forever. `latency_s` makes each answer take that long (async callers only).

    It records every request (`requests`, `keys` = idempotency keys, `attempts` per URL), the
    most requests it had in flight at once (`peak`), and prefetches (`prefetched`).
    """

    def __init__(self, script: dict[str, list[str]] | None = None, latency_s: float = 0.0):
        self.script = {url: list(outcomes) for url, outcomes in (script or {}).items()}
        self.latency_s = latency_s
        self.requests: list[GenerateRequest] = []
        self.keys: list[str | None] = []
        self.attempts: dict[str, int] = defaultdict(int)
        self.prefetched: list[PrefetchRequest] = []
        self.prefetch_failures: dict[str, str] = {}  # LoRA id -> error code to answer for it
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()

    def generate(self, request: GenerateRequest, idempotency_key: str | None = None) -> GenerateResponse:
        with self._lock:
            self.requests.append(request)
            self.keys.append(idempotency_key)
            self.attempts[request.image] += 1
            queue = self.script.get(request.image)
            outcome = queue.pop(0) if queue else "ok"
        if outcome != "ok":
            raise _scripted_error(outcome)
        return GenerateResponse.model_validate(answer_for(request.model_dump(mode="json")))

    async def agenerate(self, request: GenerateRequest, idempotency_key: str | None = None) -> GenerateResponse:
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.latency_s)
            return self.generate(request, idempotency_key)
        finally:
            with self._lock:
                self.in_flight -= 1

    def prefetch(self, request: PrefetchRequest) -> PrefetchResponse:
        self.prefetched.append(request)
        return PrefetchResponse(loras=[
            {"id": lora.id, "status": "failed", "code": self.prefetch_failures[lora.id], "message": "scripted"}
            if lora.id in self.prefetch_failures else {"id": lora.id, "sha256": lora.sha256, "status": "cached"}
            for lora in request.loras])

    async def aprefetch(self, request: PrefetchRequest) -> PrefetchResponse:
        return self.prefetch(request)


def _scripted_error(outcome: str) -> BackendError:
    code, _, seconds = outcome.partition(":")
    if code == ClientCode.INVALID_ANSWER:
        return BackendError("scripted: the answer is not a generate response", code, True)
    return BackendError(f"{code}: scripted", code, code in RETRYABLE_CODES, float(seconds) if seconds else None)


class FakeReplicate:
    """Enough of Replicate's HTTP API for the client, on a loopback port: create, get and cancel a
    prediction, get a model.

    `script` is consumed one entry per prediction create: "ok", "fail" (the prediction ends
    failed), "500" (HTTP 500), "429" (throttled, Retry-After: 1), "html" (an HTML page with 200),
    "no_output" (succeeded, without an output) or "hang" (the prediction stays processing until
    cancelled); then "ok" forever. `calls` lists
    the creates, `polls` the ids polled, `cancelled` the ids cancelled.
    """

    def __init__(self, schemas: dict[str, dict] | None = None):
        self.calls: list[dict] = []
        self.script: list[str] = []
        self.schemas = schemas or {}
        self.predictions: dict[str, dict] = {}
        self.cancelled: list[str] = []
        self.polls: list[str] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _replicate_handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeReplicate:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def create(self, model: str, body: dict, prefer: str | None) -> tuple[int, dict | str, dict]:
        with self._lock:
            action = self.script.pop(0) if self.script else "ok"
            self.calls.append({"model": model, "input": body.get("input", {}), "action": action, "prefer": prefer,
                               "at": time.monotonic()})
            pid = f"p{len(self.calls)}"
        if action == "429":
            return 429, {"detail": "throttled"}, {"Retry-After": "1"}
        if action == "500":
            return 500, {"detail": "boom"}, {}
        if action == "html":
            return 200, "<html><body>502 Bad Gateway</body></html>", {"Content-Type": "text/html"}
        failed = action == "fail"
        no_output = failed or action in ("hang", "no_output")
        self.predictions[pid] = {"id": pid, "status": "processing" if action == "hang" else
                                 "failed" if failed else "succeeded", "error": "model error" if failed else None,
                                 "output": None if no_output else f"https://replicate.delivery/{pid}.mp4"}
        return 201, {"id": pid, "status": "processing"}, {}  # as when Prefer: wait runs out

    def cancel(self, pid: str) -> tuple[int, dict, dict]:
        prediction = self.predictions.get(pid)
        if prediction is None:
            return 404, {"detail": "not found"}, {}
        self.cancelled.append(pid)
        if prediction["status"] not in ("succeeded", "failed", "canceled"):
            prediction["status"] = "canceled"
        return 200, prediction, {}


def _replicate_handler(fake: FakeReplicate):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status: int, body: dict | str, headers: dict) -> None:
            data = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                               **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("content-length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            parts = self.path.strip("/").split("/")
            if parts[:2] == ["v1", "predictions"] and parts[-1] == "cancel":
                return self.reply(*fake.cancel(parts[2]))
            model = "/".join(parts[2:4])  # /v1/models/{owner}/{name}/predictions
            self.reply(*fake.create(model, body, self.headers.get("prefer")))

        def do_GET(self):
            parts = self.path.strip("/").split("/")
            if parts[:2] == ["v1", "predictions"] and parts[2] in fake.predictions:
                fake.polls.append(parts[2])
                return self.reply(200, fake.predictions[parts[2]], {})
            if parts[:2] == ["v1", "models"]:
                properties = fake.schemas.get("/".join(parts[2:4]), {"prompt": {"type": "string"}})
                return self.reply(200, {"latest_version": {"openapi_schema": {
                    "components": {"schemas": {"Input": {"properties": properties}}}}}}, {})
            self.reply(404, {"detail": "not found"}, {})

    return Handler
