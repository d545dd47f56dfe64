"""SSRF-safe streaming downloads of user-supplied URLs (LoRA files, reference images).

`fetch_to_file` streams an ``http://``, ``https://`` or ``s3://bucket/key`` URL into an open
binary file and returns the byte count. For http(s) it builds on the runpod SDK's `rp_ssrf`
pieces but runs its own resolve / validate / pin / redirect loop, because rp_ssrf's escape hatch
is a process-wide environment variable while ours is an argument (`allow_private`):

* only http and https; every address the host resolves to must be globally routable
  (`rp_ssrf.is_safe_address`), unless `allow_private` -- a host that resolves to a public and a
  private address is refused;
* the connection is pinned to the address that was checked (`rp_ssrf.PinnedIPAdapter`: TLS SNI,
  certificate check and Host header stay bound to the URL's host), so a second DNS answer cannot
  swap in another address (DNS rebinding); the session ignores proxy environment variables,
  which would otherwise dial the host by name and bypass the pin (a CA bundle named by
  ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` is still honoured);
* redirects are followed by hand, at most `MAX_REDIRECTS`, and every hop is checked again;
* `timeout_s` bounds the connect and each read (an idle connection), and an overall deadline
  bounds the whole fetch: a watchdog shuts the socket down when it passes, so a server that
  drips a byte at a time cannot hold a worker for ever;
* `max_bytes` is enforced on the declared Content-Length before the body is read, and again
  while streaming (a missing or lying Content-Length); a body shorter than its Content-Length
  is an error, never a silently truncated file.

``s3://`` is not SSRF-guarded: the endpoint and credentials are the deployer's configuration
(boto3's own credential chain), not the caller's. The size is checked with ``head_object``
first, then the body is streamed with the cap enforced while reading.

The module knows nothing about LoRAs; callers turn a `FetchError` into their own error code.
Messages name the host but never the query string (presigned URLs carry credentials there).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, Literal
from urllib.parse import urljoin, urlsplit

MiB = 1024**2
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))
CHUNK_BYTES = 1 * MiB
CONNECT_TIMEOUT_S = 10.0
# Without an explicit deadline, the body must arrive at an average of at least this rate
# (after `timeout_s` of slack): a 2 GiB LoRA gets ~17 minutes, a 32 MiB image ~16 s more than timeout_s.
MIN_AVERAGE_BYTES_PER_S = 2 * MiB
USER_AGENT = "sdxl-lora-service-fetch/1"

FetchKind = Literal["refused", "failed"]


class FetchError(Exception):
    """A fetch that did not produce the file. The message is safe to show the caller.

    `kind` is ``"refused"`` when we would not fetch it (scheme, private address, too large) and
    ``"failed"`` when we tried and the source did not deliver (HTTP status, timeout, connection
    closed early, s3 error). `status` is the HTTP status when there was one.
    """

    def __init__(self, message: str, *, kind: FetchKind = "failed", status: int | None = None):
        super().__init__(message)
        self.message = message
        self.kind: FetchKind = kind
        self.status = status

    @property
    def refused(self) -> bool:
        return self.kind == "refused"


def fetch_to_file(url: str, dest: BinaryIO, *, allow_private: bool, max_bytes: int, timeout_s: float,
                  deadline_s: float | None = None, s3_client_factory: Callable[[], object] | None = None) -> int:
    """Stream `url` (https, http or s3) into `dest`; return the number of bytes written.

    `timeout_s` bounds connecting and each wait for data; `deadline_s` (default: `timeout_s` plus
    `max_bytes` at `MIN_AVERAGE_BYTES_PER_S`) bounds the whole fetch. `s3_client_factory` returns
    the boto3 client to use for s3:// (default: a new `make_s3_client(None)`). Raises `FetchError`.
    On error, `dest` may hold part of the body: the caller owns cleaning it up.
    """
    if deadline_s is None:
        deadline_s = timeout_s + max_bytes / MIN_AVERAGE_BYTES_PER_S
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_http(url, dest, allow_private=allow_private, max_bytes=max_bytes, timeout_s=timeout_s,
                           deadline_s=deadline_s)
    if scheme == "s3":
        client = s3_client_factory() if s3_client_factory else make_s3_client(None, timeout_s=timeout_s)
        return _fetch_s3(url, dest, client, max_bytes=max_bytes, deadline=time.monotonic() + deadline_s,
                         deadline_s=deadline_s)
    raise FetchError(f"unsupported URL scheme {scheme + ':' if scheme else '(none)'}: use https://, http:// or s3://",
                     kind="refused")


def make_s3_client(endpoint_url: str | None, *, timeout_s: float = 60.0):
    """A boto3 S3 client: credentials and region from boto3's own chain, bounded timeouts, a few retries.

    With a custom `endpoint_url` (MinIO, R2, moto, ...) path-style addressing is used, which every
    S3-compatible store understands. Clients are thread-safe but slow to create: keep one.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=min(CONNECT_TIMEOUT_S, timeout_s),
        read_timeout=timeout_s,
        retries={"max_attempts": 3, "mode": "standard"},
        signature_version="s3v4",
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    # A session of its own: creating clients from boto3's shared default session is not thread-safe.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


# -- http(s) ---------------------------------------------------------------------------------------


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in resolver order, without duplicates (a seam for tests)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def checked_addresses(host: str, port: int, *, allow_private: bool) -> list[str]:
    """Resolve `host`; refuse it if any address is not globally routable (unless `allow_private`)."""
    from runpod.serverless.utils import rp_ssrf  # looked up per call, so tests can patch is_safe_address

    try:
        addresses = resolve(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"cannot resolve host {host}") from exc
    if not addresses:
        raise FetchError(f"cannot resolve host {host}")
    if not allow_private:
        for address in addresses:
            if not rp_ssrf.is_safe_address(address) or not _embedded_ipv4_is_safe(address, rp_ssrf.is_safe_address):
                said = f"the non-public address {address}" if address == host else \
                    f"{host} resolves to the non-public address {address}"
                raise FetchError(f"refused: {said} (private, loopback and link-local addresses are not fetched)",
                                 kind="refused")
    return addresses


def _embedded_ipv4_is_safe(address: str, is_safe: Callable[[str], bool]) -> bool:
    """A 6to4 address (2002::/16) names an IPv4 router inside it; is_safe_address lets 2002::/16
    through whatever that is, so the embedded IPv4 address is checked too."""
    try:
        embedded = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    sixtofour = getattr(embedded, "sixtofour", None)
    return sixtofour is None or is_safe(str(sixtofour))


def _fetch_http(url: str, dest: BinaryIO, *, allow_private: bool, max_bytes: int, timeout_s: float,
                deadline_s: float) -> int:
    import requests
    from runpod.serverless.utils import rp_ssrf  # noqa: F401 (imported before the clock starts: it takes ~2 s)

    watchdog = _Watchdog(deadline_s)
    current = url
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            parts = urlsplit(current)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise FetchError(f"refused: redirect to a {scheme or 'scheme-less'} URL (only http and https)",
                                 kind="refused")
            host = parts.hostname
            if not host:
                raise FetchError("refused: the URL has no host", kind="refused")
            try:
                port = parts.port or (443 if scheme == "https" else 80)
            except ValueError as exc:
                raise FetchError(f"refused: invalid port in the URL for {host}", kind="refused") from exc
            addresses = checked_addresses(host, port, allow_private=allow_private)
            try:
                location, total = _get_pinned(current, host, addresses, dest, watchdog=watchdog,
                                              max_bytes=max_bytes, timeout_s=timeout_s)
            except requests.RequestException as exc:
                if watchdog.expired:
                    raise _too_slow(deadline_s, host) from exc
                if isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower():
                    raise FetchError(f"timed out after {timeout_s:g} s waiting for {host}") from exc
                raise FetchError(f"download from {host} failed: {_describe(exc)}") from exc
            if location is None:
                return total
            current = urljoin(current, location)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects, starting from {urlsplit(url).hostname}")
    finally:
        watchdog.cancel()


def _get_pinned(url: str, host: str, addresses: list[str], dest: BinaryIO, *, watchdog: _Watchdog, max_bytes: int,
                timeout_s: float) -> tuple[str | None, int]:
    """GET `url` over a connection pinned to the first of `addresses` that connects.

    Returns (the Location of a redirect, 0), or (None, byte count) once the body is in `dest`.
    Only connection errors move on to the next address (dual-stack hosts whose first address is
    unroutable), as rp_ssrf does.
    """
    import requests
    from runpod.serverless.utils.rp_ssrf import SSRFError, iter_content_capped

    last_error: Exception | None = None
    for address in addresses:
        remaining = watchdog.remaining()
        if remaining <= 0:
            raise _too_slow(watchdog.seconds, host)
        session = requests.Session()
        session.trust_env = False  # no proxies from the environment: the pinned address is what gets dialled
        session.verify = _ca_bundle()
        adapter = _pinned_adapter(address, watchdog)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        try:
            try:
                response = session.get(
                    url, stream=True, allow_redirects=False,
                    headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT},
                    timeout=(min(CONNECT_TIMEOUT_S, timeout_s, remaining), min(timeout_s, remaining)))
            except requests.ConnectionError as exc:
                if watchdog.expired:
                    raise _too_slow(watchdog.seconds, host) from exc
                last_error = exc
                continue
            with response:
                status = response.status_code
                if status in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchError(f"{host} answered a redirect (HTTP {status}) without a Location",
                                         status=status)
                    return location, 0
                if not 200 <= status < 300:
                    raise FetchError(_status_message(host, status, response.reason), status=status)
                declared = _content_length(response)
                if declared is not None and declared > max_bytes:
                    raise FetchError(f"the file is {_sizes(declared, max_bytes)} allowed", kind="refused",
                                     status=status)
                total = 0
                try:
                    for chunk in iter_content_capped(response, CHUNK_BYTES, max_bytes):
                        dest.write(chunk)
                        total += len(chunk)
                except SSRFError as exc:  # the running total passed max_bytes
                    raise FetchError(f"the file is larger than the {_human(max_bytes)} allowed",
                                     kind="refused", status=status) from exc
                if watchdog.expired:
                    raise _too_slow(watchdog.seconds, host)
                if declared is not None and total < declared:
                    raise FetchError(f"{host} closed the connection after {total} of {declared} bytes", status=status)
                return None, total
        finally:
            session.close()
    raise FetchError(f"cannot connect to {host}: {_describe(last_error)}") from last_error


def _ca_bundle() -> str | bool:
    """The deployer's CA bundle, which trust_env=False would otherwise drop along with the proxies."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True


def _content_length(response) -> int | None:
    raw = response.headers.get("Content-Length")
    if raw is None or response.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _status_message(host: str, status: int, reason: str | None) -> str:
    reason = "".join(c for c in (reason or "") if c.isprintable())[:60]  # the server's words: keep them short
    message = f"{host} answered HTTP {status}" + (f" {reason}" if reason else "")
    if status in (401, 403):
        message += " (a private file? use a public or presigned URL)"
    return message


def _too_slow(deadline_s: float, host: str | None) -> FetchError:
    return FetchError(f"the download from {host} took longer than {deadline_s:g} s and was abandoned")


def _describe(exc: BaseException | None) -> str:
    """A short, caller-safe description of a transport error (no stack, no URL)."""
    if exc is None:
        return "no address to connect to"
    text = str(exc)
    for needle, said in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                         ("doesn't match", "the TLS certificate is not for this host"),
                         ("Hostname mismatch", "the TLS certificate is not for this host"),
                         ("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
                         ("IncompleteRead", "connection closed before the whole body arrived"),
                         ("Connection broken", "connection closed before the whole body arrived"),
                         ("Connection reset", "connection reset"), ("Network is unreachable", "network unreachable"),
                         ("timed out", "timed out")):
        if needle in text:
            return said
    return type(exc).__name__


def _sizes(size: int, limit: int) -> str:
    """'2.1 GiB, more than the 2.0 GiB' -- exact byte counts where rounding would hide the difference."""
    if _human(size) == _human(limit):
        return f"{size} bytes, more than the {limit} bytes"
    return f"{_human(size)}, more than the {_human(limit)}"


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class _Watchdog:
    """The overall deadline: when it passes, every socket the fetch opened is shut down.

    Per-socket timeouts only bound each wait; a server that sends a byte just before each one
    expires would otherwise hold the fetch (and its thread) for as long as it likes.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expires = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.expires - time.monotonic()

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                _shutdown(sock)
            else:
                self._sockets.append(sock)

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._sockets.clear()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv; close() alone would not
    except OSError:
        pass


_adapter_class = None


def _pinned_adapter(pinned_ip: str, watchdog: _Watchdog):
    """rp_ssrf's PinnedIPAdapter, whose connections also report their sockets to the watchdog."""
    global _adapter_class
    if _adapter_class is None:
        from runpod.serverless.utils.rp_ssrf import PinnedIPAdapter

        class TrackedPinnedAdapter(PinnedIPAdapter):
            def __init__(self, pinned_ip: str, watchdog: _Watchdog, **kwargs):
                self._watchdog = watchdog
                super().__init__(pinned_ip, **kwargs)

            def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
                pool = super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
                return self._track(pool)

            def get_connection(self, url, proxies=None):  # requests < 2.32
                return self._track(super().get_connection(url, proxies=proxies))

            def _track(self, pool):
                pool.ConnectionCls = _tracked_connection_class(pool.ConnectionCls)
                pool.conn_kw = {**(pool.conn_kw or {}), "on_socket": self._watchdog.track}
                return pool

        _adapter_class = TrackedPinnedAdapter
    return _adapter_class(pinned_ip, watchdog)


_connection_classes: dict[type, type] = {}
_connection_classes_lock = threading.Lock()


def _tracked_connection_class(base: type) -> type:
    """A subclass of urllib3's connection class that hands each new raw socket to `on_socket`."""
    if getattr(base, "_reports_sockets", False):
        return base
    with _connection_classes_lock:
        if base not in _connection_classes:

            def __init__(self, *args, on_socket=None, **kwargs):
                self._on_socket = on_socket
                base.__init__(self, *args, **kwargs)

            def _new_conn(self):  # urllib3's raw-socket factory, called before any TLS handshake
                sock = base._new_conn(self)
                if self._on_socket is not None:
                    self._on_socket(sock)
                return sock

            _connection_classes[base] = type(f"Tracked{base.__name__}", (base,), {
                "__init__": __init__, "_new_conn": _new_conn, "_reports_sockets": True})
        return _connection_classes[base]


# -- s3 --------------------------------------------------------------------------------------------


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key). The key is taken literally (it may hold ``?`` or ``#``)."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise FetchError("an s3 URL needs a bucket and a key: s3://bucket/key", kind="refused")
    return bucket, key


def _fetch_s3(url: str, dest: BinaryIO, client, *, max_bytes: int, deadline: float, deadline_s: float) -> int:
    from botocore.exceptions import BotoCoreError, ClientError
    from urllib3.exceptions import HTTPError as Urllib3Error

    bucket, key = parse_s3_url(url)
    where = f"s3://{bucket}/{key}"
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        size = int(head["ContentLength"])
        if size > max_bytes:
            raise FetchError(f"{where} is {_sizes(size, max_bytes)} allowed", kind="refused")
        extra = {"IfMatch": head["ETag"]} if head.get("ETag") else {}  # the object we sized, not a newer one
        body = client.get_object(Bucket=bucket, Key=key, **extra)["Body"]
        total = 0
        try:
            for chunk in body.iter_chunks(CHUNK_BYTES):
                total += len(chunk)
                if total > max_bytes:
                    raise FetchError(f"{where} is larger than the {_human(max_bytes)} allowed", kind="refused")
                if time.monotonic() > deadline:
                    raise FetchError(f"the download of {where} took longer than {deadline_s:g} s and was abandoned")
                dest.write(chunk)
        finally:
            body.close()
        return total
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "error"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        said = {"404": "not found (no such bucket or key)", "NoSuchKey": "not found (no such key)",
                "NoSuchBucket": "not found (no such bucket)",
                "403": "access denied", "AccessDenied": "access denied",
                "412": "changed while being downloaded", "PreconditionFailed": "changed while being downloaded",
                }.get(code, code)
        raise FetchError(f"{where}: {said}", status=status) from exc
    except (BotoCoreError, Urllib3Error) as exc:
        from botocore.exceptions import NoCredentialsError

        said = "no AWS credentials configured" if isinstance(exc, NoCredentialsError) else type(exc).__name__
        raise FetchError(f"{where}: {said}") from exc
