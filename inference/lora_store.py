"""LoRA files: fetched once, verified, cached on disk by LoRA id and content hash.

A download streams into ``cache_dir/.tmp/``, is hashed on the way, checked against the expected
sha256 when one is given, and parsed as safetensors (the header, by safetensors' own Rust
parser: nothing is ever unpickled, `torch.load` is never called), then fsynced and renamed into
``cache_dir`` in one step (a bundle's directory too). So the cache never holds a partial or unverified file, and every
failure path removes its temp file.

Files are named ``{slug}-{sha256}.safetensors``; a Replicate-style ``.tar`` bundle is unpacked
(see `inference.bundles`) into a directory ``{slug}-{sha256}.bundle/`` (sha256 of the tar). The
slug is a filesystem-safe form of the LoRA id plus a hash of the raw id (ids may hold ``/`` or anything else; two ids never share a slug).
The raw id is remembered in ``.ids/{slug}`` for listings.

**The LoRA id is treated as immutable.** With an expected sha256, only the file with that hash
is a hit. Without one, any cached file for that id is a hit, whatever the URL now says: a new
version of a LoRA needs a new id (or its sha256).

A hit bumps the file's mtime: that is the LRU clock (atime is unreliable, network volumes
included). After each download the least recently used files are evicted until the cache is
within `max_cache_bytes`; the file being returned is never evicted, so one file larger than the
cap is still served (and is then the only one kept).

Concurrent `fetch` calls for the same new LoRA download it once: a per-slug thread lock within
the process, then a `filelock.FileLock` in ``.locks/`` across processes sharing the directory
(RunPod workers on one network volume), and the cache is checked again once both are held.
Different LoRAs download in parallel.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

from inference.bundles import LORA_FILE as LORA_FILE_IN_BUNDLE
from inference.bundles import BundleTokens, extract_bundle, looks_like_tar, read_bundle_tokens
from inference.errors import ErrorCode, ServiceError
from inference.fetch import FetchError, fetch_to_file, make_s3_client, read_local

if TYPE_CHECKING:
    from inference.settings import Settings

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
BUNDLE_SUFFIX = ".bundle"
CHECKSUMS_FILE = "checksums.json"  # in a bundle's directory: each extracted file's sha256
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
ID_HASH_HEX = 24  # 96 bits of sha256(raw id) in every slug
LOCK_WAIT_MARGIN_S = 60.0
_FILE_RE = re.compile(r"(?P<slug>[A-Za-z0-9._]+\.[0-9a-f]{%d})-(?P<sha>[0-9a-f]{64})(?P<kind>\.safetensors|\.bundle)"
                      % ID_HASH_HEX)
_SHA_RE = re.compile(r"[0-9a-f]{64}")
REMOTE_SCHEMES = ("https", "http", "s3")


@dataclass(frozen=True)
class LoraFile:
    lora_id: str
    sha256: str
    path: Path
    size: int
    source: str  # "disk" (was cached) or "download" (fetched now)
    tokens: BundleTokens | None = None  # pivotal-tuning embeddings of a Replicate bundle
    checksums: dict[str, str] = field(default_factory=dict, compare=False)  # file name -> sha256

    @property
    def entry(self) -> Path:
        """What the cache holds for this LoRA: the file, or a bundle's directory."""
        return self.path.parent if self.path.parent.name.endswith(BUNDLE_SUFFIX) else self.path

    def expected_sha256(self, path: Path) -> str:
        """What `path` (this LoRA's file, or a file of its bundle) must hash to when it is read.
        "" (which nothing hashes to) for a file with no recorded checksum: a bundle cached before
        checksums were kept is fetched again rather than trusted."""
        return self.checksums.get(Path(path).name, "")


def id_slug(lora_id: str) -> str:
    """A filesystem-safe, collision-free name for a LoRA id: a readable part plus a hash of the raw id.

    The readable part holds only ``[A-Za-z0-9._]`` (never ``-``, which separates slug and sha256
    in file names), so a slug never prefixes another id's file name.
    """
    readable = re.sub(r"[^A-Za-z0-9._]+", "_", lora_id).strip("._")[:48] or "lora"
    digest = hashlib.sha256(lora_id.encode("utf-8", "surrogatepass")).hexdigest()[:ID_HASH_HEX]
    return f"{readable}.{digest}"


def normalize_sha256(sha256: str | None) -> str | None:
    """Lower-case hex, or None. Anything but 64 hex digits is refused (it also names a file)."""
    if sha256 is None or sha256 == "":
        return None
    value = sha256.strip().lower()
    value = value.removeprefix("sha256:")
    if not _SHA_RE.fullmatch(value):
        raise ServiceError(ErrorCode.INVALID_REQUEST, "sha256 must be 64 hexadecimal characters")
    return value


class LoraStore:
    """Download, verify and cache LoRA ``.safetensors`` files (see the module docstring).

    `allow_private_urls` lets http(s) URLs reach private and loopback addresses (tests, same-VPC
    hosts). `allow_local_paths` accepts ``file://`` URLs and plain paths: the local CLI sets it,
    the network service must not. `timeout_s` bounds connecting and each wait for data;
    `deadline_s` the whole download (default: see `inference.fetch.fetch_to_file`).
    """

    def __init__(self, cache_dir: Path, *, max_cache_bytes: int, max_lora_bytes: int,
                 allow_private_urls: bool = False, allow_local_paths: bool = False,
                 timeout_s: float = 60.0, s3_endpoint_url: str | None = None, deadline_s: float | None = None):
        self.cache_dir = Path(cache_dir)
        self.max_cache_bytes = max_cache_bytes
        self.max_lora_bytes = max_lora_bytes
        self.allow_private_urls = allow_private_urls
        self.allow_local_paths = allow_local_paths
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.s3_endpoint_url = s3_endpoint_url
        self._tmp_dir = self.cache_dir / ".tmp"
        self._locks_dir = self.cache_dir / ".locks"
        self._ids_dir = self.cache_dir / ".ids"
        for d in (self.cache_dir, self._tmp_dir, self._locks_dir, self._ids_dir):
            d.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=d).close()  # writable? (PermissionError now, not at the first download)
        self._guard = threading.Lock()
        self._slug_locks: dict[str, list] = {}  # slug -> [lock, number of threads using it]
        self._s3 = None
        self._sweep_partials()

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> LoraStore:
        """A store configured from `Settings`; keyword overrides win (e.g. ``allow_local_paths=True``)."""
        kwargs = dict(cache_dir=settings.lora_cache_dir, max_cache_bytes=settings.lora_cache_max_bytes,
                      max_lora_bytes=settings.max_lora_bytes, allow_private_urls=settings.allow_private_urls,
                      timeout_s=settings.download_timeout_s, s3_endpoint_url=settings.s3_endpoint_url)
        kwargs.update(overrides)
        return cls(kwargs.pop("cache_dir"), **kwargs)

    # -- public --------------------------------------------------------------------------------

    def fetch(self, lora_id: str, url: str, sha256: str | None = None) -> LoraFile:
        """The verified local file for `lora_id`: from the cache, else downloaded from `url` now.

        Raises ServiceError: ``lora_download_failed`` when the file cannot be fetched (unsupported
        or refused URL, HTTP error, timeout, too large, connection closed early), ``lora_invalid``
        when it is not a readable safetensors file or its sha256 differs from `sha256`, and
        ``invalid_request`` for a malformed `sha256`.
        """
        expected = normalize_sha256(sha256)
        self._check_source(url)  # the same answer whether or not the id happens to be cached
        slug = id_slug(lora_id)
        hit = self._lookup(lora_id, slug, expected)
        if hit:
            return hit
        with self._slug_lock(slug), self._file_lock(slug):
            hit = self._lookup(lora_id, slug, expected)  # another thread or process may have fetched it meanwhile
            if hit:
                return hit
            lora = self._download(lora_id, slug, url, expected)
        self._evict(keep=lora.entry)
        return lora

    def entries(self) -> list[LoraFile]:
        """The files in the cache now, most recently used first (source ``"disk"``)."""
        found = []
        for path in self._cache_files():
            try:
                lora = self._load_entry(path, self._raw_id(_FILE_RE.fullmatch(path.name)["slug"]))
                found.append((path.stat().st_mtime_ns, path.name, lora))
            except (FileNotFoundError, ServiceError):  # evicted meanwhile
                continue
        found.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [lora for _, _, lora in found]

    # -- cache ---------------------------------------------------------------------------------

    def _cache_files(self) -> Iterator[Path]:
        for path in self.cache_dir.iterdir():
            if _FILE_RE.fullmatch(path.name):
                yield path

    def _lookup(self, lora_id: str, slug: str, expected: str | None) -> LoraFile | None:
        if expected:
            candidates = [self.cache_dir / f"{slug}-{expected}{suffix}" for suffix in (SUFFIX, BUNDLE_SUFFIX)]
        else:
            candidates = [p for p in self._cache_files() if _FILE_RE.fullmatch(p.name)["slug"] == slug]
            candidates.sort(key=_mtime_ns, reverse=True)
        for path in candidates:
            try:
                os.utime(path)  # the LRU clock
                return self._load_entry(path, lora_id)
            except FileNotFoundError:  # never there, or evicted a moment ago
                continue
        return None

    def _load_entry(self, path: Path, lora_id: str, source: str = "disk") -> LoraFile:
        sha = _FILE_RE.fullmatch(path.name)["sha"]
        if path.name.endswith(BUNDLE_SUFFIX):
            size = sum(p.stat().st_size for p in path.iterdir() if p.name != CHECKSUMS_FILE)
            return LoraFile(lora_id, sha, path / LORA_FILE_IN_BUNDLE, size, source, read_bundle_tokens(path),
                            _read_checksums(path))
        return LoraFile(lora_id, sha, path, path.stat().st_size, source, checksums={path.name: sha})

    def _evict(self, keep: Path) -> None:
        """Remove least recently used files until the cache fits `max_cache_bytes`; never `keep`."""
        files = []
        for path in self._cache_files():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime_ns, path.name, _entry_size(path), path))
        total = sum(size for _, _, size, _ in files) + self.partials()[1]  # downloads under way take room too
        for _, _, size, path in sorted(files):
            if total <= self.max_cache_bytes:
                break
            if path == keep:
                continue
            self._remove_entry(path)
            total -= size
            log.info("evicted %s (%d bytes) from the LoRA disk cache", path.name, size)

    def discard(self, lora: LoraFile) -> None:
        """Remove `lora`'s entry from the cache: it was refused by the pipeline, or its content is not
        what its name says. A later fetch downloads it again."""
        self._remove_entry(lora.entry)
        log.info("removed %s from the LoRA disk cache", lora.entry.name)

    def _remove_entry(self, path: Path) -> None:
        """Unlink a file; a bundle directory is first renamed away, so it vanishes in one step."""
        try:
            if path.is_dir():
                trash = Path(tempfile.mkdtemp(dir=self._tmp_dir, suffix=".trash"))
                os.replace(path, trash / path.name)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                path.unlink()
        except FileNotFoundError:  # another process evicted it first
            pass

    def _raw_id(self, slug: str) -> str:
        try:
            return (self._ids_dir / slug).read_text(encoding="utf-8", errors="surrogatepass")
        except OSError:
            return slug

    def _remember_id(self, slug: str, lora_id: str) -> None:
        target = self._ids_dir / slug
        if self._raw_id(slug) == lora_id:
            return
        fd, name = tempfile.mkstemp(dir=self._tmp_dir, prefix=f"{slug}-", suffix=".id")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(lora_id)
            os.replace(name, target)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise

    def _sweep_partials(self) -> None:
        """Remove what a killed process left in the temp folder: a partial download, a half-unpacked
        bundle, a half-deleted one. Each of ours is named after its LoRA's slug and written under
        that slug's file lock, so an entry whose lock another process holds (a live download on a
        shared volume) is left alone."""
        from filelock import FileLock, Timeout

        for path in self._tmp_dir.iterdir():
            slug = path.name.split("-", 1)[0] if "-" in path.name else None
            lock = FileLock(str(self._locks_dir / f"{slug}.lock"), timeout=0) if slug else None
            try:
                if lock is not None:
                    lock.acquire()
            except Timeout:
                continue  # being written right now
            try:
                _remove_path(path)
                log.info("removed %s, left in the LoRA cache's temp folder by an earlier process", path.name)
            finally:
                if lock is not None:
                    lock.release()

    def partials(self) -> tuple[int, int]:
        """(count, bytes) of partial downloads and unpackings now in the temp folder: they count
        against `max_cache_bytes` while they exist."""
        sizes = [_entry_size(path) for path in self._tmp_dir.iterdir()]
        return len(sizes), sum(sizes)

    # -- locks ---------------------------------------------------------------------------------

    def _lock_wait_s(self) -> float:
        if self.deadline_s is not None:
            download = self.deadline_s
        else:
            from inference.fetch import MIN_AVERAGE_BYTES_PER_S

            download = self.timeout_s + self.max_lora_bytes / MIN_AVERAGE_BYTES_PER_S
        return download + LOCK_WAIT_MARGIN_S

    @contextmanager
    def _slug_lock(self, slug: str):
        with self._guard:
            entry = self._slug_locks.setdefault(slug, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=self._lock_wait_s()):
                raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED,
                                   "timed out waiting for another request that is downloading this LoRA")
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._slug_locks[slug]

    @contextmanager
    def _file_lock(self, slug: str):
        from filelock import FileLock, Timeout

        lock = FileLock(str(self._locks_dir / f"{slug}.lock"), timeout=self._lock_wait_s())
        try:
            lock.acquire()
        except Timeout as exc:
            raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED,
                               "timed out waiting for another worker that is downloading this LoRA") from exc
        try:
            yield
        finally:
            lock.release()

    # -- download ------------------------------------------------------------------------------

    def _download(self, lora_id: str, slug: str, url: str, expected: str | None) -> LoraFile:
        started = time.perf_counter()
        fd, name = tempfile.mkstemp(dir=self._tmp_dir, prefix=f"{slug}-", suffix=".part")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                sink = _HashingWriter(out)
                self._read_source(url, sink)
                out.flush()
                os.fsync(out.fileno())
            digest = sink.hexdigest()
            if expected and digest != expected:
                raise ServiceError(ErrorCode.LORA_INVALID, f"sha256 mismatch: expected {expected}, got {digest}")
            if looks_like_tar(tmp):
                final = self.cache_dir / f"{slug}-{digest}{BUNDLE_SUFFIX}"
                self._install_bundle(tmp, final, slug, lora_id)
            else:
                validate_safetensors(tmp)
                final = self.cache_dir / f"{slug}-{digest}{SUFFIX}"
                self._remember_id(slug, lora_id)
                os.replace(tmp, final)
            _fsync_dir(self.cache_dir)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            log.error("the LoRA cache volume %s is full while fetching %r: lower SDXL_LORA_LORA_CACHE_MAX_BYTES "
                      "below the volume's size, or grow the volume", self.cache_dir, lora_id)
            raise ServiceError(ErrorCode.INTERNAL, "the LoRA cache volume is full (no space left on device)") from exc
        finally:
            tmp.unlink(missing_ok=True)  # gone already unless it failed, or was a bundle's tar
        log.info("fetched LoRA %r from %s: %d bytes in %.0f ms", lora_id, _redact(url), sink.size,
                 (time.perf_counter() - started) * 1e3)
        return self._load_entry(final, lora_id, "download")

    def _install_bundle(self, archive: Path, final: Path, slug: str, lora_id: str) -> None:
        """Unpack and check a bundle in a temp directory, then rename the directory into place."""
        staging = Path(tempfile.mkdtemp(dir=self._tmp_dir, prefix=f"{slug}-", suffix=".unpack"))
        try:
            checksums = extract_bundle(archive, staging / final.name, max_bytes=self.max_lora_bytes)
            validate_safetensors(staging / final.name / LORA_FILE_IN_BUNDLE)
            read_bundle_tokens(staging / final.name)
            (staging / final.name / CHECKSUMS_FILE).write_text(json.dumps(checksums, sort_keys=True))
            self._remember_id(slug, lora_id)
            os.replace(staging / final.name, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _check_source(self, url: str) -> None:
        scheme = urlsplit(url).scheme.lower()
        if scheme in REMOTE_SCHEMES:
            return
        if _is_local(url):
            if self.allow_local_paths:
                return
            raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED,
                               f"local files are not accepted here ({_redact(url)!r}): "
                               "use an https://, http:// or s3:// URL")
        raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED,
                           f"unsupported LoRA URL {_redact(url)!r}: use https://, http:// or s3://"
                           + (" (or a local path)" if self.allow_local_paths else ""))

    def _read_source(self, url: str, dest: BinaryIO) -> None:
        try:
            if _is_local(url):
                read_local(url, dest, max_bytes=self.max_lora_bytes)
            else:
                fetch_to_file(url, dest, allow_private=self.allow_private_urls, max_bytes=self.max_lora_bytes,
                              timeout_s=self.timeout_s, deadline_s=self.deadline_s, s3_client_factory=self._s3_client)
        except FetchError as exc:
            raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED, f"cannot fetch the LoRA: {exc.message}") from exc

    def _s3_client(self):
        with self._guard:
            if self._s3 is None:
                self._s3 = make_s3_client(self.s3_endpoint_url, timeout_s=self.timeout_s)
            return self._s3


# -- validation ------------------------------------------------------------------------------------


def validate_safetensors(path: Path) -> int:
    """Parse `path` as safetensors (header and offsets, by the Rust parser) and count its tensors.

    Nothing is unpickled. Raises ServiceError(lora_invalid) with what the file looks like instead.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            count = len(list(f.keys()))
    except Exception as exc:  # safetensors' SafetensorError, OSError, ...
        raise ServiceError(ErrorCode.LORA_INVALID, _explain_unreadable(path, exc)) from exc
    if count == 0:
        raise ServiceError(ErrorCode.LORA_INVALID, "the safetensors file holds no tensors")
    return count


def _explain_unreadable(path: Path, exc: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "not a safetensors file: the file is empty"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") or head.startswith(b"PK\x03\x04"):
        return ("not a safetensors file: looks like a pickle checkpoint (.ckpt/.pt/.bin), which is never loaded; "
                "convert it to .safetensors")
    if head.lstrip()[:1] == b"<":
        return ("not a safetensors file: looks like an HTML page rather than the file itself "
                "(for Hugging Face, use a .../resolve/... URL, not .../blob/...)")
    reason = str(exc).removeprefix("Error while deserializing header: ").strip()[:160]
    return f"not a readable safetensors file (truncated or corrupt: {reason})"


# -- helpers ---------------------------------------------------------------------------------------


class _HashingWriter:
    """A binary sink that hashes and counts what it passes on."""

    def __init__(self, out: BinaryIO):
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._out.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _is_local(url: str) -> bool:
    scheme = urlsplit(url).scheme.lower()
    return scheme == "file" or (scheme == "" and bool(url))


def _redact(url: str) -> str:
    """The URL without query string or fragment (presigned URLs carry credentials there), shortened."""
    if urlsplit(url).scheme.lower() == "s3":
        return url[:200]
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path
    return shown if len(shown) <= 200 else shown[:199] + "…"


def _entry_size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _read_checksums(bundle: Path) -> dict[str, str]:
    """A bundle's recorded file checksums; none for a damaged record (its files then fail to verify)."""
    try:
        checksums = json.loads((bundle / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return checksums if isinstance(checksums, dict) else {}


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem lets a directory be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
