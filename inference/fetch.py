"""SSRF-safe streaming downloads of user-supplied URLs (LoRAs, reference images).

Built on the runpod SDK's `rp_ssrf` pieces: every resolved address must be globally routable
(unless private URLs are allowed), the connection is pinned to the address that was checked
(no DNS rebinding), each redirect hop is checked again, and the body is capped both by its
Content-Length and while streaming. Our own loop, because rp_ssrf's escape hatch is a
process-wide environment variable while ours is a per-store setting.
"""

from __future__ import annotations

import socket
import time
from typing import BinaryIO
from urllib.parse import urljoin, urlparse

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
CHUNK = 1 << 20


class FetchError(Exception):
    """A download that failed; the message is safe to show the caller."""


def fetch_to_file(url: str, dest: BinaryIO, *, allow_private: bool, max_bytes: int, timeout_s: float,
                  s3_client_factory=None) -> int:
    """Stream `url` (http, https or s3) into `dest`; return the byte count."""
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        return _fetch_http(url, dest, allow_private=allow_private, max_bytes=max_bytes, timeout_s=timeout_s)
    if scheme == "s3":
        factory = s3_client_factory or (lambda: make_s3_client(None))
        return _fetch_s3(url, dest, factory(), max_bytes=max_bytes, deadline=time.monotonic() + timeout_s)
    raise FetchError(f"unsupported URL scheme {scheme!r}: use https://, http:// or s3://")


def _fetch_http(url: str, dest: BinaryIO, *, allow_private: bool, max_bytes: int, timeout_s: float) -> int:
    import requests
    from runpod.serverless.utils.rp_ssrf import PinnedIPAdapter

    deadline = time.monotonic() + timeout_s
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        parsed = urlparse(current)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise FetchError(f"refused URL {current!r}: only http(s) URLs with a host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        address = _checked_address(parsed.hostname, port, allow_private)
        session = requests.Session()
        session.trust_env = False  # no proxies: the pinned address is what gets dialled
        adapter = PinnedIPAdapter(address)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        try:
            response = session.get(current, stream=True, allow_redirects=False,
                                   timeout=(min(10.0, timeout_s), timeout_s))
            with response:
                if response.status_code in REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError(f"redirect without a Location from {parsed.hostname}")
                    current = urljoin(current, location)
                    continue
                if response.status_code != 200:
                    raise FetchError(f"{parsed.hostname} answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise FetchError(f"file is {int(declared)} bytes, more than the {max_bytes} allowed")
                total = 0
                for chunk in response.iter_content(CHUNK):
                    total += len(chunk)
                    if total > max_bytes:
                        raise FetchError(f"file is larger than the {max_bytes} bytes allowed")
                    if time.monotonic() > deadline:
                        raise FetchError(f"download took longer than {timeout_s:.0f} s")
                    dest.write(chunk)
                if declared and declared.isdigit() and total != int(declared):
                    raise FetchError(f"connection closed after {total} of {declared} bytes")
                return total
        except requests.Timeout as exc:
            raise FetchError(f"timed out fetching from {parsed.hostname}") from exc
        except requests.RequestException as exc:
            raise FetchError(f"download from {parsed.hostname} failed: {type(exc).__name__}") from exc
        finally:
            session.close()
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def _checked_address(host: str, port: int, allow_private: bool) -> str:
    """Resolve `host`; refuse it if any address is not globally routable (a mixed answer is hostile)."""
    from runpod.serverless.utils.rp_ssrf import is_safe_address

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve host {host!r}") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise FetchError(f"cannot resolve host {host!r}")
    if not allow_private:
        for address in addresses:
            if not is_safe_address(address):
                raise FetchError(f"refused: {host} resolves to the non-public address {address} "
                                 "(set SDXL_LORA_ALLOW_PRIVATE_URLS to allow)")
    return addresses[0]


def _fetch_s3(url: str, dest: BinaryIO, client, *, max_bytes: int, deadline: float) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(url)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise FetchError(f"s3 URL needs a bucket and a key: {url!r}")
    try:
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        if size > max_bytes:
            raise FetchError(f"file is {size} bytes, more than the {max_bytes} allowed")
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        total = 0
        for chunk in body.iter_chunks(CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise FetchError(f"file is larger than the {max_bytes} bytes allowed")
            if time.monotonic() > deadline:
                raise FetchError("s3 download took too long")
            dest.write(chunk)
        return total
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise FetchError(f"s3://{bucket}/{key}: {code}") from exc
    except BotoCoreError as exc:
        raise FetchError(f"s3://{bucket}/{key}: {type(exc).__name__}") from exc


def make_s3_client(endpoint_url: str | None):
    """A boto3 S3 client (credentials from boto3's own chain), with bounded timeouts."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"},
                    signature_version="s3v4")
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)
