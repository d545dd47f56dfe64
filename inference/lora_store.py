"""LoRA files: fetched once, verified, cached on disk by content.

A download streams into the cache's ``.tmp/``, is hashed on the way, checked against the expected
sha256 when one is given, and parsed as safetensors (the header, by safetensors' own Rust
parser: nothing is ever unpickled, `torch.load` is never called), then fsynced and renamed into
the cache directory in one step (a bundle's directory too). So the cache never holds a partial or
unverified file, and every failure path removes its temp file. The files and folders are
`inference.cache_layout`'s; the URL rules and the readers `inference.sources`'.

**Identity.** Weights are identified by content. With an expected sha256, the entry of that
content is a hit, whatever the id and the URL. Without one, an id's entry is a hit only while the
id is asked for with the URL its record names: an id pointed at another URL is fetched again,
never served the old file (the old file stays as long as the LRU keeps it: another id, or a request
with its sha256, may still want it). A URL that changes with every request (a freshly presigned
one) is so fetched every time: give the sha256 too.

A hit bumps the entry's mtime: that is the LRU clock (atime is unreliable, network volumes
included). After each download the least recently used entries are evicted until the cache is
within `max_cache_bytes`; the entry being returned is never evicted, so one file larger than the
cap is still served (and is then the only one kept).

Concurrent `fetch` calls for the same id download it once: a per-id thread lock within the
process, then a file lock in ``.locks/`` across processes sharing the directory (RunPod workers on
one network volume), and the cache is checked again once both are held. Different ids download
in parallel (two ids of the same content too; the second rename finds the first's entry).

The cache directory and its folders are re-created when they disappear while the store serves (a
network volume remounted, an operator's ``rm``): before every download, and a fetch whose files
vanished under it runs once more. What the pipeline holds resident does not depend on the disk.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from inference.bundles import LORA_FILE as LORA_FILE_IN_BUNDLE
from inference.bundles import extract_bundle, looks_like_tar, read_bundle_tokens
from inference.cache_layout import (ENTRY_RE, CacheLayout, IdRecord, fsync_dir, id_slug, url_key,
                                    write_checksums)
from inference.errors import ErrorCode, ServiceError
from inference.fetch import MIN_AVERAGE_BYTES_PER_S
from inference.file_lock import RemovableFileLock
from inference.integrity import validate_safetensors
from inference.lora_file import BUNDLE_SUFFIX, SUFFIX, LoraFile, normalize_sha256
from inference.sources import SharedS3Client, check_lora_source, read_lora_source, redact

if TYPE_CHECKING:
    from inference.settings import Settings

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOCK_WAIT_MARGIN_S = 60.0


@dataclass(frozen=True)
class _Wanted:
    """One fetch's question: this id, from this URL, with this content if `expected` is set."""

    lora_id: str
    url: str
    expected: str | None

    @property
    def slug(self) -> str:
        return id_slug(self.lora_id)


class LoraStore:
    """Download, verify and cache LoRA ``.safetensors`` files (see the module docstring).

    `allow_private_urls` lets http(s) URLs reach private and loopback addresses (tests, same-VPC
    hosts). `allow_local_paths` accepts ``file://`` URLs and plain paths: the local CLI sets it,
    the network service must not. `timeout_s` bounds connecting and each wait for data;
    `deadline_s` the whole download (default: see `inference.sources.fetch_to_file`). `s3` is the
    service's one S3 client (default: one of the store's own, for `s3_endpoint_url`).
    """

    def __init__(self, cache_dir: Path, *, max_cache_bytes: int, max_lora_bytes: int,
                 allow_private_urls: bool = False, allow_local_paths: bool = False,
                 timeout_s: float = 60.0, s3_endpoint_url: str | None = None, deadline_s: float | None = None,
                 s3: SharedS3Client | None = None):
        self.cache_dir = Path(cache_dir)
        self.max_cache_bytes = max_cache_bytes
        self.max_lora_bytes = max_lora_bytes
        self.allow_private_urls = allow_private_urls
        self.allow_local_paths = allow_local_paths
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.s3 = s3 or SharedS3Client(s3_endpoint_url, timeout_s=timeout_s)
        self.layout = CacheLayout(self.cache_dir)
        self.layout.make_dirs()
        self.layout.check_writable()
        self._guard = threading.Lock()
        self._id_locks: dict[str, list] = {}  # slug -> [lock, number of threads using it]
        self.layout.sweep_leftovers()
        self.layout.forget_ids_of_missing_entries()

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> LoraStore:
        """A store configured from `Settings`; keyword overrides win (e.g. ``allow_local_paths=True``)."""
        kwargs = dict(cache_dir=settings.lora_cache_dir, max_cache_bytes=settings.lora_cache_max_bytes,
                      max_lora_bytes=settings.max_lora_bytes, allow_private_urls=settings.allow_private_urls,
                      timeout_s=settings.download_timeout_s, s3_endpoint_url=settings.s3_endpoint_url)
        kwargs.update(overrides)
        return cls(kwargs.pop("cache_dir"), **kwargs)

    @property
    def s3_endpoint_url(self) -> str | None:
        return self.s3.endpoint_url

    # -- public --------------------------------------------------------------------------------

    def fetch(self, lora_id: str, url: str, sha256: str | None = None) -> LoraFile:
        """The verified local file for `lora_id`: from the cache, else downloaded from `url` now.

        Raises ServiceError: ``lora_download_failed`` when the file cannot be fetched (unsupported
        or refused URL, HTTP error, timeout, too large, connection closed early), ``lora_invalid``
        when it is not a readable safetensors file or its sha256 differs from `sha256`, and
        ``invalid_request`` for a malformed `sha256`.
        """
        wanted = _Wanted(lora_id, url, normalize_sha256(sha256))
        # the same answer whether or not the id happens to be cached
        check_lora_source(url, allow_local_paths=self.allow_local_paths)
        hit = self._lookup(wanted)
        if hit:
            return hit
        try:
            lora = self._fetch_once(wanted)
        except FileNotFoundError:
            log.warning("files of the LoRA cache %s vanished while %r was fetched; fetching it once more",
                        str(self.cache_dir), lora_id)
            lora = self._fetch_once(wanted)
        self.layout.evict(self.max_cache_bytes, keep=lora.entry)
        return lora

    def entries(self) -> list[LoraFile]:
        """What the cache holds, most recently used first (source ``"disk"``): one item per id and
        entry, and one with id ``""`` for an entry no id names any more."""
        ids: dict[str, list[str]] = {}
        for record in self.layout.records():
            ids.setdefault(record.sha256, []).append(record.id)
        found = []
        for path in self.layout.entry_paths():
            sha = ENTRY_RE.fullmatch(path.name)["sha"]
            try:
                used = path.stat().st_mtime_ns
                found += [(used, path.name, lora_id, self.layout.load_entry(path, lora_id))
                          for lora_id in sorted(ids.get(sha, [""]))]
            except (FileNotFoundError, ServiceError):  # evicted meanwhile
                continue
        found.sort(key=lambda item: (-item[0], item[1], item[2]))
        return [lora for *_, lora in found]

    def discard(self, lora: LoraFile) -> None:
        """Remove `lora`'s entry, and the ids naming it, from the cache: it was refused by the
        pipeline, or its content is not what its name says. A later fetch downloads it again."""
        self.layout.remove_entry(lora.entry)
        self.layout.forget_ids_of_missing_entries()
        log.info("removed %s from the LoRA disk cache", lora.entry.name)

    def partials(self) -> tuple[int, int]:
        """(count, bytes) of partial downloads and unpackings now in the temp folder: they count
        against `max_cache_bytes` while they exist."""
        return self.layout.partials()

    # -- lookup --------------------------------------------------------------------------------

    def _lookup(self, wanted: _Wanted) -> LoraFile | None:
        """The cached entry `wanted` names: the expected content, else the id's record's content
        when the record names the same URL. Brings the id's record up to date on a hit."""
        record = IdRecord.read(self.layout.record_path(wanted.slug))
        if wanted.expected:
            sha = wanted.expected
        elif record is not None and record.id == wanted.lora_id and record.url_sha256 == url_key(wanted.url):
            sha = record.sha256
        else:
            return None
        path = self.layout.entry_path(sha)
        try:
            os.utime(path)  # the LRU clock
            lora = self.layout.load_entry(path, wanted.lora_id)
        except FileNotFoundError:  # never there, or evicted a moment ago
            return None
        current = IdRecord.of(wanted.lora_id, wanted.url, sha)
        if record != current:
            try:
                self.layout.write_record(current)
            except OSError:  # the record only saves a later download: never fail a hit for it
                log.debug("could not update the record of %r", wanted.lora_id, exc_info=True)
        return lora

    # -- locks ---------------------------------------------------------------------------------

    def _lock_wait_s(self) -> float:
        if self.deadline_s is not None:
            download = self.deadline_s
        else:
            download = self.timeout_s + self.max_lora_bytes / MIN_AVERAGE_BYTES_PER_S
        return download + LOCK_WAIT_MARGIN_S

    @contextmanager
    def _id_lock(self, slug: str):
        with self._guard:
            entry = self._id_locks.setdefault(slug, [threading.Lock(), 0])
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
                    del self._id_locks[slug]

    @contextmanager
    def _file_lock(self, slug: str):
        lock = RemovableFileLock(self.layout.lock_path(slug))
        if not lock.acquire(timeout=self._lock_wait_s()):
            raise ServiceError(ErrorCode.LORA_DOWNLOAD_FAILED,
                               "timed out waiting for another worker that is downloading this LoRA")
        try:
            yield
        finally:
            lock.release()

    # -- download ------------------------------------------------------------------------------

    def _fetch_once(self, wanted: _Wanted) -> LoraFile:
        """Under the id's locks: the cache again (another thread or process may have fetched it
        meanwhile), else a download."""
        self.layout.make_dirs()
        with self._id_lock(wanted.slug), self._file_lock(wanted.slug):
            return self._lookup(wanted) or self._download(wanted)

    def _download(self, wanted: _Wanted) -> LoraFile:
        started = time.perf_counter()
        fd, name = tempfile.mkstemp(dir=self.layout.tmp_dir, prefix=f"{wanted.slug}-", suffix=".part")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                sink = _HashingWriter(out)
                read_lora_source(wanted.url, sink, allow_private=self.allow_private_urls,
                                 max_bytes=self.max_lora_bytes, timeout_s=self.timeout_s,
                                 deadline_s=self.deadline_s, s3=self.s3)
                out.flush()
                os.fsync(out.fileno())
            final = self._install(tmp, sink.hexdigest(), wanted)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            log.error("the LoRA cache volume %s is full while fetching %r: lower SDXL_LORA_LORA_CACHE_MAX_BYTES "
                      "below the volume's size, or grow the volume", str(self.cache_dir), wanted.lora_id)
            raise ServiceError(ErrorCode.INTERNAL, "the LoRA cache volume is full (no space left on device)") from exc
        finally:
            tmp.unlink(missing_ok=True)  # gone already unless it failed, or was a bundle's tar
        log.info("fetched LoRA %r from %r: %d bytes in %.0f ms", wanted.lora_id, redact(wanted.url), sink.size,
                 (time.perf_counter() - started) * 1e3)
        return self.layout.load_entry(final, wanted.lora_id, "download")

    def _install(self, tmp: Path, digest: str, wanted: _Wanted) -> Path:
        """Check the downloaded `tmp` and move it into the cache under its content's name."""
        if wanted.expected and digest != wanted.expected:
            raise ServiceError(ErrorCode.LORA_INVALID, f"sha256 mismatch: expected {wanted.expected}, got {digest}")
        if looks_like_tar(tmp):
            final = self.cache_dir / f"{digest}{BUNDLE_SUFFIX}"
            self._install_bundle(tmp, final, wanted.slug)
        else:
            validate_safetensors(tmp)
            final = self.cache_dir / f"{digest}{SUFFIX}"
            os.replace(tmp, final)  # the same content under another id: the same name, atomically
        self.layout.write_record(IdRecord.of(wanted.lora_id, wanted.url, digest))
        fsync_dir(self.cache_dir)
        return final

    def _install_bundle(self, archive: Path, final: Path, slug: str) -> None:
        """Unpack and check a bundle in a temp directory, then rename the directory into place
        (unless the same content is there already: that one stays)."""
        staging = Path(tempfile.mkdtemp(dir=self.layout.tmp_dir, prefix=f"{slug}-", suffix=".unpack"))
        try:
            checksums = extract_bundle(archive, staging / final.name, max_bytes=self.max_lora_bytes)
            validate_safetensors(staging / final.name / LORA_FILE_IN_BUNDLE)
            read_bundle_tokens(staging / final.name)
            write_checksums(staging / final.name, checksums)
            try:
                os.replace(staging / final.name, final)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


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
