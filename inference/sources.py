"""Where bytes come from: which URLs are accepted, and reading each kind into a file.

The one place that decides the URL schemes (`REMOTE_SCHEMES`, `is_remote`, `is_local`): the LoRA
store, the reference-image loader and `fetch_to_file` all ask here. http(s) goes through the
SSRF-safe transport of `inference.fetch`; ``s3://bucket/key`` through boto3, with one lazily made,
locked client (`SharedS3Client`) that the store, the reference loader and the uploads share;
local paths and ``file://`` URLs through `read_local`, for the local CLI only (`check_lora_source`).
All of them copy through `inference.fetch.copy_capped`, so the size cap and the deadline hold alike.

``s3://`` is not SSRF-guarded: endpoint and credentials are the deployer's configuration (boto3's
credential chain), not the caller's; the size is checked with ``head_object`` before streaming.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

from inference.deadline import Deadline
from inference.errors import ErrorCode, ServiceError
from inference.fetch import (CHUNK_BYTES, CONNECT_TIMEOUT_S, MIN_AVERAGE_BYTES_PER_S, FetchError, copy_capped,
                             fetch_http, too_large)

REMOTE_SCHEMES = ("https", "http", "s3")
SCHEMES_SAID = "https://, http:// or s3://"
_SCHEME_RE = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.\-]*):")


def url_scheme(url: str) -> str:
    """The URL's scheme in lower case; "" when it has none (a plain path)."""
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:  # e.g. an unbalanced [ in the host: the scheme is still readable
        found = _SCHEME_RE.match(url)
        return found[1].lower() if found else ""


def is_remote(url: str) -> bool:
    return url_scheme(url) in REMOTE_SCHEMES


def is_local(url: str) -> bool:
    """A ``file://`` URL or a plain path."""
    scheme = url_scheme(url)
    return scheme == "file" or (scheme == "" and bool(url))


def redact(url: str) -> str:
    """The URL without query string or fragment (presigned URLs carry credentials there), shortened."""
    if url_scheme(url) == "s3":
        return url[:200]
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(not a valid URL)"
    shown = f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path
    return shown if len(shown) <= 200 else shown[:199] + "…"


# -- any source ------------------------------------------------------------------------------------


def fetch_to_file(url: str, dest: BinaryIO, *, allow_private: bool, max_bytes: int, timeout_s: float,
                  deadline_s: float | None = None, deadline: Deadline | None = None,
                  s3_client_factory: Callable[[], object] | None = None) -> int:
    """Stream `url` (https, http or s3) into `dest`; return the number of bytes written.

    `timeout_s` bounds connecting and each wait for data. The whole fetch is bounded by `deadline`
    when given (e.g. one shared by a whole request), else by one `deadline_s` from now (default:
    `timeout_s` plus `max_bytes` at `MIN_AVERAGE_BYTES_PER_S`); an http(s) fetch ends at most
    `timeout_s` past it. `s3_client_factory` returns the boto3 client for s3:// (default: a new
    `make_s3_client(None)`). Raises `FetchError`. On error, `dest` may hold part of the body: the
    caller owns cleaning it up.
    """
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        from runpod.serverless.utils import rp_ssrf  # noqa: F401 (its first import takes ~2 s: before the clock)
    elif scheme not in REMOTE_SCHEMES:
        raise FetchError(f"unsupported URL scheme {scheme + ':' if scheme else '(none)'}: use {SCHEMES_SAID}",
                         kind="refused")
    if deadline is None:
        deadline = Deadline(deadline_s if deadline_s is not None else timeout_s + max_bytes / MIN_AVERAGE_BYTES_PER_S)
    if scheme == "s3":
        client = s3_client_factory() if s3_client_factory else make_s3_client(None, timeout_s=timeout_s)
        return _fetch_s3(url, dest, client, max_bytes=max_bytes, deadline=deadline)
    return fetch_http(url, dest, allow_private=allow_private, max_bytes=max_bytes, timeout_s=timeout_s,
                      deadline=deadline)


def check_lora_source(url: str, *, allow_local_paths: bool) -> None:
    """Refuse a LoRA URL the store would not read (ServiceError ``lora_download_failed``)."""
    if is_remote(url):
        return
    if is_local(url):
        if allow_local_paths:
            return
        raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED,
                           f"local files are not accepted here ({redact(url)!r}): use an {SCHEMES_SAID} URL")
    raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED, f"unsupported LoRA URL {redact(url)!r}: use {SCHEMES_SAID}"
                       + (" (or a local path)" if allow_local_paths else ""))


def read_lora_source(url: str, dest: BinaryIO, *, allow_private: bool, max_bytes: int, timeout_s: float,
                     deadline_s: float | None, s3: SharedS3Client) -> None:
    """A LoRA's bytes into `dest`, from a URL `check_lora_source` accepted."""
    try:
        if is_local(url):
            read_local(url, dest, max_bytes=max_bytes)
        else:
            fetch_to_file(url, dest, allow_private=allow_private, max_bytes=max_bytes, timeout_s=timeout_s,
                          deadline_s=deadline_s, s3_client_factory=s3.get)
    except FetchError as exc:
        raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED, f"cannot fetch the LoRA: {exc.message}") from exc


# -- local files -----------------------------------------------------------------------------------


def read_local(source: str | os.PathLike, dest: BinaryIO, *, max_bytes: int, deadline: Deadline | None = None) -> int:
    """Copy a local file into `dest` and return the number of bytes written.

    `source` is a path (``~`` expanded) or a ``file://`` URL naming a file on this machine. No
    access control here: the caller decides whether local files are acceptable at all. Only
    regular files are read (a FIFO or a device could block or never end). Raises `FetchError`.
    """
    path = _local_path(source)
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise FetchError(f"{path} is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise FetchError(f"{path} is not a regular file", kind="refused")
        if info.st_size > max_bytes:
            raise too_large(str(path), max_bytes, info.st_size)
        file = open(path, "rb")
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    with file:
        return copy_capped(_read_chunks(file, path), dest, max_bytes=max_bytes, deadline=deadline, source=str(path))


def _local_path(source: str | os.PathLike) -> Path:
    text = os.fspath(source)
    parts = urlsplit(text)
    if parts.scheme.lower() != "file":
        return Path(text).expanduser()
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"file:// URLs must name a file on this machine, not on {parts.netloc}", kind="refused")
    return Path(url2pathname(parts.path))  # url2pathname also undoes the %-escapes


def _read_chunks(file: BinaryIO, path: Path) -> Iterator[bytes]:
    """The file's chunks; a read error becomes a FetchError (a write error in copy_capped stays an OSError)."""
    while True:
        try:
            chunk = file.read(CHUNK_BYTES)
        except OSError as exc:
            raise _unreadable(path, exc) from exc
        if not chunk:
            return
        yield chunk


def _unreadable(path: Path, exc: OSError) -> FetchError:
    if isinstance(exc, FileNotFoundError):
        return FetchError(f"no such file: {path}")
    if isinstance(exc, IsADirectoryError):
        return FetchError(f"{path} is a directory, not a file")
    if isinstance(exc, PermissionError):
        return FetchError(f"cannot read {path}: permission denied")
    return FetchError(f"cannot read {path}: {exc.strerror or type(exc).__name__}")


# -- s3 --------------------------------------------------------------------------------------------


class SharedS3Client:
    """One boto3 S3 client for the whole service, made at first use (creating one is slow, and
    boto3's client creation is not thread-safe), under a lock; clients themselves are thread-safe."""

    def __init__(self, endpoint_url: str | None, *, timeout_s: float = 60.0):
        self.endpoint_url = endpoint_url
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._client = None

    def get(self):
        with self._lock:
            if self._client is None:
                self._client = make_s3_client(self.endpoint_url, timeout_s=self.timeout_s)
            return self._client


def make_s3_client(endpoint_url: str | None, *, timeout_s: float = 60.0):
    """A boto3 S3 client: credentials and region from boto3's own chain, bounded timeouts, a few retries.

    With a custom `endpoint_url` (MinIO, R2, moto, ...) path-style addressing is used, which every
    S3-compatible store understands. Clients are thread-safe but slow to create: keep one.
    """
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=min(CONNECT_TIMEOUT_S, timeout_s), read_timeout=timeout_s,
                    retries={"max_attempts": 3, "mode": "standard"}, signature_version="s3v4",
                    s3={"addressing_style": "path"} if endpoint_url else None)
    # A session of its own: creating clients from boto3's shared default session is not thread-safe.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key). The key is taken literally (it may hold ``?`` or ``#``)."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise FetchError("an s3 URL needs a bucket and a key: s3://bucket/key", kind="refused")
    return bucket, key


def _fetch_s3(url: str, dest: BinaryIO, client, *, max_bytes: int, deadline: Deadline) -> int:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, key = parse_s3_url(url)
    where = f"s3://{bucket}/{key}"
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        size = int(head["ContentLength"])
        if size > max_bytes:
            raise too_large(where, max_bytes, size)
        extra = {"IfMatch": head["ETag"]} if head.get("ETag") else {}  # the object we sized, not a newer one
        body = client.get_object(Bucket=bucket, Key=key, **extra)["Body"]
        try:  # botocore turns urllib3's read errors into BotoCoreError subclasses
            return copy_capped(body.iter_chunks(CHUNK_BYTES), dest, max_bytes=max_bytes, deadline=deadline,
                               source=where)
        finally:
            body.close()
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
    except BotoCoreError as exc:
        said = "no AWS credentials configured" if isinstance(exc, NoCredentialsError) else type(exc).__name__
        raise FetchError(f"{where}: {said}") from exc
