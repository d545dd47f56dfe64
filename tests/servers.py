"""Loopback servers for tests: a threaded HTTP file server with scriptable misbehaviour, and moto's S3.

    with FileServer(tmp_path) as server:              # serves files under tmp_path on 127.0.0.1
        server.add("a.safetensors", data)             # or write into server.root yourself
        server.behave["/a.safetensors"] = stall(5)    # override one path (see the behaviours below)
        fetch(server.url("a.safetensors"))
        assert server.hits["/a.safetensors"] == 1     # GETs per path (HEADs in server.heads)
        server.requests[-1].headers["Host"]           # every request: method, path, headers

    with S3Server() as s3:                            # moto's ThreadedMotoServer on a free loopback port
        s3.put("bucket", "key", b"...")               # creates the bucket when needed
        store = Something(s3_endpoint_url=s3.endpoint)  # credentials: S3Server(monkeypatch) sets
                                                        # dummy AWS_* variables for the test

A behaviour is ``fn(handler, body)``: `handler` is the request's BaseHTTPRequestHandler and `body`
the file's bytes (None when there is no such file). Behaviours below cover the usual faults:
404/any status, redirects, stalls, slow drips, early close, lying or missing Content-Length.
Connection errors while answering (the client gave up) are swallowed, so tests stay quiet.
"""

from __future__ import annotations

import collections
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

Behaviour = Callable[[BaseHTTPRequestHandler, "bytes | None"], None]


class Request(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]


class TlsFiles(NamedTuple):
    ca: Path  # the CA certificate (PEM): give it to the client as its trust store
    cert: Path  # the server certificate (PEM), signed by that CA
    key: Path  # the server's private key (PEM)


def make_tls_files(directory: Path, hostnames: tuple[str, ...] = ("localhost",),
                   ips: tuple[str, ...] = ("127.0.0.1",)) -> TlsFiles:
    """A throwaway CA and a server certificate for `hostnames` and `ips` (needs `cryptography`)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    names = [x509.DNSName(h) for h in hostnames] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hostnames or ips)[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


class FileServer:
    """Serves the files under `root` (a fresh temp dir when None) on `host`, port chosen by the OS;
    over https when given `tls` (see `make_tls_files`)."""

    def __init__(self, root: Path | str | None = None, host: str = "127.0.0.1", tls: TlsFiles | None = None):
        self._tempdir = tempfile.TemporaryDirectory(prefix="fileserver-") if root is None else None
        self.root = Path(root if root is not None else self._tempdir.name)
        self.host = host
        self.hits: collections.Counter[str] = collections.Counter()  # GETs per path
        self.heads: collections.Counter[str] = collections.Counter()  # HEADs per path
        self.requests: list[Request] = []
        self.behave: dict[str, Behaviour] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (ConnectionError, ssl.SSLError):  # the client went away or refused our certificate
                    self.close_connection = True

            def do_GET(self):
                server._answer(self, head=False)

            def do_HEAD(self):
                server._answer(self, head=True)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "https" if tls else "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert, tls.key)
            # The handshake happens in the request's thread, so a stuck client never blocks accept().
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True,
                                                    do_handshake_on_connect=False)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"FileServer:{self.port}", daemon=True)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name.lstrip('/')}"

    def add(self, name: str, data: bytes) -> str:
        """Write `data` to root/name and return its URL."""
        path = self.root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.url(name)

    def reset_counts(self) -> None:
        with self._lock:
            self.hits.clear()
            self.heads.clear()
            self.requests.clear()

    def _answer(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = handler.path.split("?", 1)[0]
        with self._lock:
            (self.heads if head else self.hits)[path] += 1
            self.requests.append(Request(handler.command, handler.path, dict(handler.headers.items())))
        file = (self.root / path.lstrip("/")).resolve()
        inside = file.is_relative_to(self.root.resolve())
        body = file.read_bytes() if inside and file.is_file() else None
        try:
            if path in self.behave and not head:
                self.behave[path](handler, body)
            elif body is None:
                send(handler, 404, b"not found")
            elif head:
                handler.send_response(200)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
            else:
                send(handler, 200, body)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ssl.SSLError):
            handler.close_connection = True

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
        if self._tempdir is not None:
            self._tempdir.cleanup()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None) -> None:
    """A complete response with a correct Content-Length."""
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


# -- behaviours -----------------------------------------------------------------------------------


def status(code: int, body: bytes = b"", headers: dict | None = None) -> Behaviour:
    """Answer `code` whatever the path holds."""
    return lambda handler, _body: send(handler, code, body, headers)


def redirect_to(location: str, code: int = 302) -> Behaviour:
    return lambda handler, body: send(handler, code, b"", {"Location": location})


def stall(seconds: float) -> Behaviour:
    """Headers and the first 10 bytes, then silence for `seconds` (a read timeout)."""

    def behave(handler, body):
        body = body or b""
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:10])
        handler.wfile.flush()
        time.sleep(seconds)
        handler.close_connection = True

    return behave


def drip(interval: float, chunk: int = 1, total_s: float = 10.0) -> Behaviour:
    """The body `chunk` bytes at a time, one chunk every `interval` seconds (for at most `total_s`):
    no single read ever times out, only an overall deadline stops it."""

    def behave(handler, body):
        body = body or b""
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.flush()
        started = time.monotonic()
        for start in range(0, len(body), chunk):
            if time.monotonic() - started > total_s:
                break
            handler.wfile.write(body[start:start + chunk])
            handler.wfile.flush()
            time.sleep(interval)
        handler.close_connection = True

    return behave


def close_half_way(handler, body):
    """Declare the full length, send half, close the connection."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body[: len(body) // 2])
    handler.wfile.flush()
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def more_than_declared(handler, body):
    """Declare half the length, send everything."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body) // 2))
    handler.end_headers()
    handler.wfile.write(body)
    handler.close_connection = True


def no_content_length(handler, body):
    """No Content-Length: the body ends when the connection closes."""
    handler.send_response(200)
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)
    handler.close_connection = True


def fail_first(times: int, status: int = 500) -> Behaviour:  # noqa: F811 (the parameter shadows status())
    """Answer `status` to the first `times` GETs, then the file."""
    code = status
    calls = {"n": 0}
    lock = threading.Lock()

    def behave(handler, body):
        with lock:
            calls["n"] += 1
            failing = calls["n"] <= times
        if failing or body is None:
            send(handler, code if failing else 404, b"try again" if failing else b"not found")
        else:
            send(handler, 200, body)

    return behave


def slow_ok(seconds: float) -> Behaviour:
    """Wait `seconds`, then answer the file normally (keeps a download in flight for concurrency tests)."""

    def behave(handler, body):
        time.sleep(seconds)
        if body is None:
            send(handler, 404, b"not found")
        else:
            send(handler, 200, body)

    return behave


# -- S3 -------------------------------------------------------------------------------------------

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


class S3Server:
    """moto's ThreadedMotoServer on a free 127.0.0.1 port: real HTTP, so code under test uses real boto3.

    Pass pytest's `monkeypatch` to set dummy credentials (`DUMMY_AWS_ENV`) in the environment for
    the test, as boto3's credential chain in the code under test will look there. moto's state is
    process-wide: `reset()` empties it (for a server shared across tests).
    """

    def __init__(self, monkeypatch=None):
        from moto.server import ThreadedMotoServer

        if monkeypatch is not None:
            monkeypatch.delenv("AWS_PROFILE", raising=False)
            for key, value in DUMMY_AWS_ENV.items():
                monkeypatch.setenv(key, value)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.port: int | None = None
        self.endpoint: str | None = None

    def client(self):
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing")

    def put(self, bucket: str, key: str, data: bytes) -> str:
        """Store `data` at s3://bucket/key (creating the bucket) and return that URL."""
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        client.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def reset(self) -> None:
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        opener.open(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"), timeout=10).close()

    def __enter__(self) -> S3Server:
        self.server.start()
        _, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()


# -- a switchable TCP front -----------------------------------------------------------------------


class TcpGate:
    """A fixed loopback port in front of a real server, whose behaviour a test switches.

    Modes: ``"forward"`` relays bytes to `target` (host, port); ``"stall"`` accepts connections and
    never answers (a read timeout for the client); ``"refuse"`` closes the listening socket, so a
    connect is refused. Switching mode drops every open connection, so a client's keep-alive pool
    cannot carry the old behaviour over. The port stays the same throughout: the code under test
    keeps one endpoint URL, as it would with a real S3 endpoint that goes down and comes back.

        with S3Server(monkeypatch) as s3, TcpGate(("127.0.0.1", s3.port)) as gate:
            gate.set_mode("stall")
            ... endpoint_url=gate.endpoint ...
    """

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1"):
        self.target = target
        self.host = host
        self.mode = "forward"
        self.accepted = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.port = self._listen(0)
        self._thread = threading.Thread(target=self._accept_loop, name=f"TcpGate:{self.port}", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set_mode(self, mode: str) -> None:
        if mode not in ("forward", "stall", "refuse"):
            raise ValueError(mode)
        with self._lock:
            self.mode = mode
            conns, self._conns = self._conns, []
            if mode == "refuse" and self._listener is not None:
                self._listener.close()
                self._listener = None
        for conn in conns:
            _close_quietly(conn)
        if mode != "refuse" and self._listener is None:
            self._listen(self.port)

    def _listen(self, port: int) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, port))
        listener.listen(64)
        listener.settimeout(0.05)
        with self._lock:
            self._listener = listener
        return listener.getsockname()[1]

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):  # timeout, or the listener was closed by set_mode
                continue
            conn.settimeout(None)
            with self._lock:
                mode = self.mode
                self.accepted += 1
                self._conns.append(conn)
            if mode == "forward":
                threading.Thread(target=self._relay, args=(conn,), daemon=True).start()
            # "stall": keep the connection open and never read or answer; set_mode/close drops it

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close_quietly(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._conns.append(upstream)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                _close_quietly(src)
                _close_quietly(dst)

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)

    def __enter__(self) -> TcpGate:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            conns, self._conns = self._conns, []
            listener, self._listener = self._listener, None
        for conn in conns:
            _close_quietly(conn)
        if listener is not None:
            listener.close()


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
