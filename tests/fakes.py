"""Live services for tests: the app on loopback (in a thread, or `sdxl-lora serve` as a process), the
handler's local API, and a fake Replicate API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from sdxl_lora_tools.local_servers import LocalServer, wait_until_ready


LiveServer = LocalServer
ROOT = Path(__file__).resolve().parents[1]


def wait_ready(base: str, timeout: float = 60) -> None:
    wait_until_ready(base, timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(model, log_dir, env: dict[str, str], timeout_s: float = 180) -> tuple[subprocess.Popen, str, Path]:
    """`sdxl-lora serve` as its own process on a free loopback port, with `env` (SDXL_LORA_*) added to
    ours; returns (process, base URL, log file) once /readyz answers 200. The caller stops it."""
    port = free_port()
    log = Path(log_dir) / f"serve-{port}.log"
    script = Path(sys.executable).with_name("sdxl-lora")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sdxl_lora_tools.cli"]
    full_env = dict(os.environ, SDXL_LORA_DEVICE="cpu", PYTHONPATH=str(ROOT), **env)
    with open(log, "wb") as out:
        proc = subprocess.Popen([*command, "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)],
                                env=full_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base, log
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the service did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def start_handler_api(env: dict, cwd) -> tuple[subprocess.Popen, str]:
    """`python -m handler --rp_serve_api` on a free loopback port; returns (process, base URL) once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "handler", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
                             "--rp_api_port", str(port)], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            httpx.get(f"{base}/openapi.json", timeout=2)
            return proc, base
        except httpx.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("the handler's local API did not start") from None
            time.sleep(0.2)


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
