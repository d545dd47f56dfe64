"""SSRF-safe streaming downloads over http(s) (LoRA files, reference images), and the one copy loop.

`fetch_http` streams an ``http://`` or ``https://`` URL into an open binary file through
`copy_capped`, the loop every source uses (`inference.sources` adds ``s3://`` and local files, and
decides which scheme goes where), which enforces the size cap and the overall `Deadline` on every
chunk.

http(s) runs on httpx with a resolve / validate / pin / redirect loop of its own around
`rp_ssrf.is_safe_address` (rp_ssrf's `safe_get` is built on requests and its escape hatch is a
process-wide environment variable; ours is an argument, `allow_private`):

* only http and https; every address the host resolves to must be globally routable
  (`is_safe_address`, which also refuses IPv4-mapped IPv6 such as ``::ffff:127.0.0.1``; 6to4, which
  it lets through, is checked for the IPv4 address inside), unless `allow_private`;
* the request goes to the checked address (the URL's host replaced by the IP) while the Host
  header, TLS SNI and certificate check keep the URL's host (httpcore's ``sni_hostname``), so a
  second DNS answer cannot swap in another address (DNS rebinding); proxy settings are ignored, as
  a proxy would dial the host by name (the CA bundle variables are still read, by `_verify`);
* redirects are followed by hand, at most `MAX_REDIRECTS`, every hop checked again; only
  connection errors move on to the host's next address (dual-stack hosts);
* the body is read raw (``Accept-Encoding: identity``, never decoded): the bytes counted are the
  bytes written, so no compressed body inflates past the cap. `max_bytes` is checked on the
  Content-Length, then while streaming; a body shorter than its Content-Length is an error (h11
  checks the framing), never a truncated file.

Time: `timeout_s` bounds connecting and each wait for data; the deadline bounds the whole fetch.
httpx's raw stream yields every receive as it arrives and the deadline is checked after each, so a
server that drips a byte at a time is cut off at its first byte past the deadline, and a silent one
by the read timeout (`timeout_s`, or the time left when the request was sent if less). A fetch ends
at most one read timeout after its deadline, with no watchdog thread (tests/test_fetch.py: drip
and stall tests).

Callers turn a `FetchError` into their own error code. Messages never show a query string
(presigned URLs carry credentials there).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import BinaryIO, Literal

import httpx

from inference.deadline import Deadline

MiB = 1024**2
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))
CHUNK_BYTES = 64 * 1024  # what httpcore reads per receive; small enough to check the deadline often
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
    closed early, s3 error, unreadable file). `status` is the HTTP status when there was one.
    """

    def __init__(self, message: str, *, kind: FetchKind = "failed", status: int | None = None):
        super().__init__(message)
        self.message = message
        self.kind: FetchKind = kind
        self.status = status

    @property
    def refused(self) -> bool:
        return self.kind == "refused"


def too_slow(deadline: Deadline, source: str) -> FetchError:
    return FetchError(f"the download from {source} took longer than {deadline.seconds:g} s and was abandoned")


def copy_capped(chunks: Iterable[bytes], dest: BinaryIO, *, max_bytes: int, deadline: Deadline | None,
                source: str) -> int:
    """Write `chunks` to `dest`; return the byte count. The one copy loop of every source.

    FetchError (refused) once the total passes `max_bytes`, before that chunk is written; FetchError
    (failed) when `deadline` has passed after a chunk. `source` names the source in those messages.
    Errors from `chunks` and `dest.write` (a full disk) pass through unchanged.
    """
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise too_large(source, max_bytes)
        if deadline is not None and deadline.expired:
            raise too_slow(deadline, source)
        dest.write(chunk)
    return total


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
    except (OSError, UnicodeError) as exc:
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


def fetch_http(url: str, dest: BinaryIO, *, allow_private: bool, max_bytes: int, timeout_s: float,
               deadline: Deadline) -> int:
    """Stream an http(s) `url` into `dest` (see the module docstring); return the byte count."""
    host = "the host"  # for messages, until the URL is parsed
    try:
        current = httpx.URL(url)
        first = current.raw_host.decode("ascii", "replace")
        for _hop in range(MAX_REDIRECTS + 1):
            if current.scheme not in ("http", "https"):
                said = current.scheme or "scheme-less"
                raise FetchError(f"refused: redirect to a {said} URL (only http and https)", kind="refused")
            host = current.raw_host.decode("ascii", "replace")
            if not host:
                raise FetchError("refused: the URL has no host", kind="refused")
            port = current.port or (443 if current.scheme == "https" else 80)
            if not 0 < port < 65536:
                raise FetchError(f"refused: invalid port in the URL for {host}", kind="refused")
            addresses = checked_addresses(host, port, allow_private=allow_private)
            location, total = _get_pinned(current, host, addresses, dest, max_bytes=max_bytes, timeout_s=timeout_s,
                                          deadline=deadline)
            if location is None:
                return total
            current = current.join(location)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects, starting from {first}")
    except httpx.InvalidURL as exc:  # its message may quote the URL: not shown
        raise FetchError("refused: not a valid URL", kind="refused") from exc
    except httpx.TimeoutException as exc:
        if deadline.expired:
            raise too_slow(deadline, host) from exc
        raise FetchError(f"timed out after {timeout_s:g} s waiting for {host}") from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"download from {host} failed: {_describe(exc)}") from exc


def _get_pinned(url: httpx.URL, host: str, addresses: list[str], dest: BinaryIO, *, max_bytes: int,
                timeout_s: float, deadline: Deadline) -> tuple[str | None, int]:
    """GET `url` from the first of `addresses` that accepts a connection.

    Returns (the Location of a redirect, 0), or (None, byte count) once the body is in `dest`.
    An httpx transport rather than a Client: nothing from the environment (proxies), no redirects,
    auth or cookies, and no INFO log line with the URL (and its query string) in it. A fresh one
    per attempt: a pooled connection made for one host name must never carry a request for another.
    """
    headers = {"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    last_error: Exception | None = None
    for address in addresses:
        left = deadline.remaining()
        if left <= 0:
            raise too_slow(deadline, host)
        timeout = httpx.Timeout(min(timeout_s, left), connect=min(CONNECT_TIMEOUT_S, timeout_s, left))
        extensions = {"timeout": timeout.as_dict(), **({"sni_hostname": host} if url.scheme == "https" else {})}
        request = httpx.Request("GET", url.copy_with(host=address), headers=headers, extensions=extensions)
        with httpx.HTTPTransport(verify=_verify()) as transport:
            try:
                response = transport.handle_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # raised before any response only
                last_error = exc
                continue
            try:
                return _receive(response, host, dest, max_bytes=max_bytes, deadline=deadline)
            finally:
                response.close()
    if deadline.expired:
        raise too_slow(deadline, host) from last_error
    raise FetchError(f"cannot connect to {host}: {_describe(last_error)}") from last_error


def _receive(response: httpx.Response, host: str, dest: BinaryIO, *, max_bytes: int,
             deadline: Deadline) -> tuple[str | None, int]:
    status = response.status_code
    if status in REDIRECT_STATUSES:
        location = response.headers.get("Location")
        if not location:
            raise FetchError(f"{host} answered a redirect (HTTP {status}) without a Location", status=status)
        return location, 0
    if not 200 <= status < 300:
        raise FetchError(_status_message(host, status, response.reason_phrase), status=status)
    length = response.headers.get("Content-Length", "")
    declared = int(length) if length.isascii() and length.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise too_large(host, max_bytes, declared, status=status)
    error = None
    try:
        total = copy_capped(response.iter_raw(), dest, max_bytes=max_bytes, deadline=deadline, source=host)
        if declared is None or total >= declared:  # (h11 stops at the declared length: never more)
            return None, total
    except httpx.RemoteProtocolError as exc:  # h11: the connection ended before the body did
        error = exc
    of = f" of {declared} bytes" if declared is not None else ""
    raise FetchError(f"{host} closed the connection before sending the whole body{of}", status=status) from error


def _verify() -> ssl.SSLContext:
    """The deployer's CA bundle, named in the environment as requests, curl and OpenSSL read it."""
    names = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
    return _ssl_context(next((os.environ[n] for n in names if os.environ.get(n)), None))


@functools.lru_cache(maxsize=4)
def _ssl_context(bundle: str | None) -> ssl.SSLContext:
    """One context per bundle path, read once: loading a bundle takes ~0.2 s, too long for every request."""
    if bundle is None:
        return httpx.create_ssl_context(trust_env=False)  # certifi's bundle
    if os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


def _status_message(host: str, status: int, reason: str | None) -> str:
    reason = "".join(c for c in (reason or "") if c.isprintable())[:60]  # the server's words: keep them short
    message = f"{host} answered HTTP {status}" + (f" {reason}" if reason else "")
    if status in (401, 403):
        message += " (a private file? use a public or presigned URL)"
    return message


def _describe(exc: BaseException | None) -> str:
    """A short, caller-safe description of a transport error (no stack, no URL)."""
    if exc is None:
        return "no address to connect to"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    text = str(exc)
    for needle, said in (("Connection refused", "connection refused"),
                         ("Hostname mismatch", "the TLS certificate is not for this host"),
                         ("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
                         ("without sending a response", "the server closed the connection without answering"),
                         ("Connection reset", "connection reset"), ("Network is unreachable", "network unreachable")):
        if needle in text:
            return said
    return "not a valid HTTP answer" if isinstance(exc, httpx.RemoteProtocolError) else type(exc).__name__


def too_large(source: str, limit: int, size: int | None = None, *, status: int | None = None) -> FetchError:
    said = _sizes(size, limit) if size is not None else f"larger than the {_human(limit)}"
    return FetchError(f"the file from {source} is {said} allowed", kind="refused", status=status)


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
