"""Loopback servers in background threads, for the demo, the benchmarks and the tests: the FastAPI
app (any ASGI app) under uvicorn, and a plain static file server."""

from __future__ import annotations

import functools
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class LocalServer:
    """`with LocalServer(app) as base_url:`; `wait_ready=True` also waits for /readyz."""

    def __init__(self, app, wait_ready: bool = False, timeout_s: float = 300.0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.wait_ready = wait_ready
        self.timeout_s = timeout_s

    def __enter__(self) -> str:
        deadline = time.monotonic() + self.timeout_s
        self.thread.start()
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        base = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        if self.wait_ready:
            wait_until_ready(base, deadline - time.monotonic())
        return base

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until_ready(base: str, timeout_s: float = 60.0) -> None:
    """Until /readyz answers 200 and the optional identity model has settled (loaded or failed): the
    service serves before that, but a demo or a test wants the scores from its first request."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(f"{base}/readyz")
        if response.status_code == 200 and response.json().get("identity") not in ("loading", "not loaded"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base} never became ready")
        time.sleep(0.05)


class QuietFileHandler(SimpleHTTPRequestHandler):
    """A static file handler without request logs; subclass it to misbehave on purpose (bench/soak.py)."""

    def log_message(self, *args):
        pass


class LocalFileServer:
    """`with LocalFileServer(directory) as base_url:` serves the directory's files over HTTP.

    `handler`: a QuietFileHandler subclass, for a server that misbehaves on purpose.
    """

    def __init__(self, directory, handler: type[QuietFileHandler] = QuietFileHandler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
