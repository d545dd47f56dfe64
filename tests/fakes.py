"""Live services for tests: the app on loopback (in a thread, or `sdxl-lora serve` as a process) and
the handler's local API. The client's fakes (a scripted backend, a fake Replicate) ship with the
client, in `sdxl_lora_client.testing`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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
