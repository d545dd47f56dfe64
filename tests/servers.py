"""Loopback servers for tests: a plain HTTP file server with scriptable misbehaviour, and moto's S3."""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

Behaviour = Callable[[BaseHTTPRequestHandler, bytes | None], None]


class FileServer:
    """Serves files under `root` on 127.0.0.1; counts GETs per path; `behave[path]` overrides a path."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits: collections.Counter[str] = collections.Counter()
        self.behave: dict[str, Behaviour] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                server.hits[path] += 1
                file = server.root / path.lstrip("/")
                body = file.read_bytes() if file.is_file() else None
                if path in server.behave:
                    server.behave[path](self, body)
                elif body is None:
                    send(self, 404, b"not found")
                else:
                    send(self, 200, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name.lstrip('/')}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


# -- misbehaviours --------------------------------------------------------------------------------


def stall(seconds: float) -> Behaviour:
    def behave(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body or b"")))
        handler.end_headers()
        handler.wfile.write((body or b"")[:10])
        handler.wfile.flush()
        time.sleep(seconds)

    return behave


def close_half_way(handler, body):
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body[: len(body) // 2])
    handler.wfile.flush()
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def more_than_declared(handler, body):
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body) // 2))
    handler.end_headers()
    handler.wfile.write(body)
    handler.close_connection = True


def no_content_length(handler, body):
    handler.send_response(200)
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)
    handler.close_connection = True


def redirect_to(location: str) -> Behaviour:
    return lambda handler, body: send(handler, 302, b"", {"Location": location})


def fail_first(times: int, status: int = 500) -> Behaviour:
    calls = {"n": 0}

    def behave(handler, body):
        calls["n"] += 1
        if calls["n"] <= times:
            send(handler, status, b"try again")
        else:
            send(handler, 200, body)

    return behave


def slow_ok(seconds: float) -> Behaviour:
    def behave(handler, body):
        time.sleep(seconds)
        send(handler, 200, body)

    return behave


class S3Server:
    """moto's ThreadedMotoServer on a free loopback port (real HTTP), with dummy credentials set."""

    def __init__(self, monkeypatch):
        from moto.server import ThreadedMotoServer

        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}.items():
            monkeypatch.setenv(key, value)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def __enter__(self) -> S3Server:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()
