"""LoRA files: fetched once, verified, cached on disk by LoRA id and content hash.

A download streams into `.tmp/`, is hashed on the way, checked against the expected sha256 and
parsed as safetensors (header only: nothing is ever unpickled), then renamed into place in one
step. So the cache never holds a partial or unverified file. A per-id thread lock plus a file
lock make concurrent requests for one new LoRA download it once, across threads and across
processes sharing the directory (RunPod workers on one network volume).

The LoRA id is treated as immutable: without an expected sha256, any cached file for that id
is a hit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from filelock import FileLock

from inference.errors import ErrorCode, ServiceError
from inference.fetch import FetchError, fetch_to_file, make_s3_client

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
STALE_TMP_SECONDS = 3600


@dataclass(frozen=True)
class LoraFile:
    lora_id: str
    sha256: str
    path: Path
    size: int
    source: str  # "disk" (was cached) or "download" (fetched now)


def id_slug(lora_id: str) -> str:
    """Filesystem-safe and collision-free: readable part + hash of the raw id."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", lora_id)[:60].strip("._") or "lora"
    return f"{readable}.{hashlib.sha256(lora_id.encode()).hexdigest()[:12]}"


class LoraStore:
    def __init__(self, cache_dir: Path, *, max_cache_bytes: int, max_lora_bytes: int,
                 allow_private_urls: bool = False, allow_local_paths: bool = False,
                 timeout_s: float = 60.0, s3_endpoint_url: str | None = None):
        self.cache_dir = Path(cache_dir)
        self.max_cache_bytes = max_cache_bytes
        self.max_lora_bytes = max_lora_bytes
        self.allow_private_urls = allow_private_urls
        self.allow_local_paths = allow_local_paths
        self.timeout_s = timeout_s
        self.s3_endpoint_url = s3_endpoint_url
        self._tmp = self.cache_dir / ".tmp"
        self._locks_dir = self.cache_dir / ".locks"
        self._ids_dir = self.cache_dir / ".ids"  # slug -> raw LoRA id, for listings
        for d in (self.cache_dir, self._tmp, self._locks_dir, self._ids_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._guard = threading.Lock()
        self._id_locks: dict[str, threading.Lock] = {}
        self._s3 = None
        self._remove_stale_tmp()

    @classmethod
    def from_settings(cls, settings, **overrides) -> LoraStore:
        kwargs = dict(max_cache_bytes=settings.lora_cache_max_bytes, max_lora_bytes=settings.max_lora_bytes,
                      allow_private_urls=settings.allow_private_urls, timeout_s=settings.download_timeout_s,
                      s3_endpoint_url=settings.s3_endpoint_url)
        kwargs.update(overrides)
        return cls(settings.lora_cache_dir, **kwargs)

    # -- public --------------------------------------------------------------------------------

    def fetch(self, lora_id: str, url: str, sha256: str | None = None) -> LoraFile:
        expected = sha256.lower() if sha256 else None
        slug = id_slug(lora_id)
        hit = self._cached(lora_id, slug, expected)
        if hit:
            return hit
        with self._id_lock(slug), FileLock(str(self._locks_dir / f"{slug}.lock")):
            hit = self._cached(lora_id, slug, expected)  # another thread or process may have just fetched it
            if hit:
                return hit
            lora = self._download(lora_id, slug, url, expected)
        self._evict(keep=lora.path)
        return lora

    def entries(self) -> list[LoraFile]:
        """Cached files, most recently used first."""
        files = []
        for path in self.cache_dir.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            slug, _, digest = path.stem.rpartition("-")
            try:
                lora_id = (self._ids_dir / slug).read_text()
            except OSError:
                lora_id = slug
            files.append((stat.st_mtime, LoraFile(lora_id, digest, path, stat.st_size, "disk")))
        return [f for _, f in sorted(files, key=lambda item: item[0], reverse=True)]

    # -- internals -----------------------------------------------------------------------------

    def _cached(self, lora_id: str, slug: str, expected: str | None) -> LoraFile | None:
        candidates = [self.cache_dir / f"{slug}-{expected}{SUFFIX}"] if expected else \
            sorted(self.cache_dir.glob(f"{slug}-*{SUFFIX}"), key=_mtime, reverse=True)
        for path in candidates:
            try:
                os.utime(path)  # the LRU clock; works on network volumes where atime does not
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            return LoraFile(lora_id, path.stem.rpartition("-")[2], path, size, "disk")
        return None

    def _download(self, lora_id: str, slug: str, url: str, expected: str | None) -> LoraFile:
        tmp = self._tmp / f"{slug}.{os.getpid()}.{threading.get_ident()}.part"
        started = time.perf_counter()
        try:
            with open(tmp, "wb") as out:
                hasher = _HashingWriter(out)
                self._fetch_into(url, hasher)
                out.flush()
                os.fsync(out.fileno())
            digest = hasher.hexdigest()
            if expected and digest != expected:
                raise ServiceError(ErrorCode.LORA_INVALID, f"sha256 mismatch: expected {expected}, got {digest}")
            validate_safetensors(tmp)
            final = self.cache_dir / f"{slug}-{digest}{SUFFIX}"
            (self._ids_dir / slug).write_text(lora_id)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("fetched LoRA %s (%d bytes) in %.0f ms", lora_id, hasher.size, (time.perf_counter() - started) * 1e3)
        return LoraFile(lora_id, digest, final, hasher.size, "download")

    def _fetch_into(self, url: str, dest) -> None:
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https", "s3"):
            try:
                fetch_to_file(url, dest, allow_private=self.allow_private_urls, max_bytes=self.max_lora_bytes,
                              timeout_s=self.timeout_s, s3_client_factory=self._s3_client)
            except FetchError as exc:
                raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED, f"cannot fetch the LoRA: {exc}") from exc
            return
        if parsed.scheme in ("file", "") and self.allow_local_paths:
            path = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
            try:
                if path.stat().st_size > self.max_lora_bytes:
                    raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED, f"{path} is larger than {self.max_lora_bytes} bytes")
                with open(path, "rb") as source:
                    while chunk := source.read(1 << 20):
                        dest.write(chunk)
            except OSError as exc:
                raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED, f"cannot read {path}: {exc.strerror}") from exc
            return
        raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED,
                           f"unsupported LoRA location {url[:200]!r}: use https://, http:// or s3://")

    def _evict(self, keep: Path) -> None:
        """Remove least recently used files until the cache fits its byte cap."""
        files = []
        for path in self.cache_dir.glob(f"*{SUFFIX}"):
            try:
                files.append((path.stat().st_mtime, path.stat().st_size, path))
            except FileNotFoundError:
                continue
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_cache_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            log.info("evicted %s from the LoRA disk cache", path.name)

    def _id_lock(self, slug: str) -> threading.Lock:
        with self._guard:
            return self._id_locks.setdefault(slug, threading.Lock())

    def _s3_client(self):
        if self._s3 is None:
            self._s3 = make_s3_client(self.s3_endpoint_url)
        return self._s3

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_SECONDS
        for path in self._tmp.glob("*.part"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass


class _HashingWriter:
    """A file-like sink that hashes and counts what passes through."""

    def __init__(self, out):
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._out.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def validate_safetensors(path: Path) -> None:
    """Parse the header with safetensors' own (Rust) parser; never unpickle. Raises lora_invalid."""
    from safetensors import safe_open

    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(PICKLE_MAGIC):
        raise ServiceError(ErrorCode.LORA_INVALID,
                           "not a safetensors file: looks like a pickle/zip checkpoint, which is never loaded")
    try:
        with safe_open(str(path), framework="pt") as f:
            count = len(list(f.keys()))
    except Exception as exc:  # SafetensorError, OSError, ...
        raise ServiceError(ErrorCode.LORA_INVALID, f"not a readable safetensors file: {str(exc)[:200]}") from exc
    if count == 0:
        raise ServiceError(ErrorCode.LORA_INVALID, "the safetensors file holds no tensors")
