"""Live services for tests: uvicorn on a free loopback port, and a fake Replicate API."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class LiveServer:
    """An ASGI app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_ready(base: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if httpx.get(f"{base}/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("service never became ready")


class FakeReplicate:
    """Enough of Replicate's HTTP API for the client: create prediction, get prediction, get model.

    `script` is consumed one entry per prediction create: "ok", "fail" (the prediction ends
    failed), "500" (HTTP 500) or "429" (throttled, Retry-After: 1); then "ok" forever.
    """

    def __init__(self, schemas: dict[str, dict] | None = None):
        self.calls: list[dict] = []
        self.script: list[str] = []
        self.schemas = schemas or {}
        self.predictions: dict[str, dict] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                   **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                model = "/".join(self.path.strip("/").split("/")[2:4])  # /v1/models/{owner}/{name}/predictions
                action = fake.script.pop(0) if fake.script else "ok"
                fake.calls.append({"model": model, "input": body.get("input", {}), "action": action,
                                   "prefer": self.headers.get("prefer"), "at": time.monotonic()})
                if action == "429":
                    return self.reply(429, {"detail": "throttled"}, {"Retry-After": "1"})
                if action == "500":
                    return self.reply(500, {"detail": "boom"})
                pid = f"p{len(fake.calls)}"
                failed = action == "fail"
                fake.predictions[pid] = {"id": pid, "status": "failed" if failed else "succeeded",
                                         "error": "model error" if failed else None,
                                         "output": None if failed else f"https://replicate.delivery/{pid}.mp4"}
                self.reply(201, {"id": pid, "status": "processing"})  # as when Prefer: wait runs out

            def do_GET(self):
                parts = self.path.strip("/").split("/")
                if parts[:2] == ["v1", "predictions"] and parts[2] in fake.predictions:
                    return self.reply(200, fake.predictions[parts[2]])
                if parts[:2] == ["v1", "models"]:
                    properties = fake.schemas.get("/".join(parts[2:4]), {"prompt": {"type": "string"}})
                    return self.reply(200, {"latest_version": {"openapi_schema": {
                        "components": {"schemas": {"Input": {"properties": properties}}}}}})
                self.reply(404, {"detail": "not found"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeReplicate:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
