"""LoRA files: fetched once, verified, cached on disk by content.

A download streams into ``cache_dir/.tmp/``, is hashed on the way, checked against the expected
sha256 when one is given, and parsed as safetensors (the header, by safetensors' own Rust
parser: nothing is ever unpickled, `torch.load` is never called), then fsynced and renamed into
``cache_dir`` in one step (a bundle's directory too). So the cache never holds a partial or
unverified file, and every failure path removes its temp file.

Layout of ``cache_dir``:

- ``{sha256}.safetensors``: a LoRA file, named by its content: one file per content, whichever and
  however many ids name it. A Replicate-style ``.tar`` bundle is unpacked (see `inference.bundles`)
  into ``{sha256}.bundle/`` (sha256 of the tar).
- ``.ids/{slug}.json``: one record per LoRA id (the slug: a filesystem-safe form of the id plus a
  hash of it): the id, the content it was last fetched as, and the URL it came from (a hash of the
  whole URL to compare, and the URL without its query string to read: presigned URLs carry
  credentials there). A record goes with the last entry it names.
- ``.locks/{slug}.lock``: held while that id is fetched, removed when the fetch ends.
- ``.tmp/``: downloads and unpackings under way.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

from inference.bundles import LORA_FILE as LORA_FILE_IN_BUNDLE
from inference.bundles import BundleTokens, extract_bundle, looks_like_tar, read_bundle_tokens
from inference.errors import ErrorCode, ServiceError
from inference.fetch import FetchError, fetch_to_file, make_s3_client, read_local
from inference.file_lock import RemovableFileLock

if TYPE_CHECKING:
    from inference.settings import Settings

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
BUNDLE_SUFFIX = ".bundle"
RECORD_SUFFIX = ".json"
CHECKSUMS_FILE = "checksums.json"  # in a bundle's directory: each extracted file's sha256
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
ID_HASH_HEX = 24  # 96 bits of sha256(raw id) in every slug
LOCK_WAIT_MARGIN_S = 60.0
_ENTRY_RE = re.compile(r"(?P<sha>[0-9a-f]{64})(?P<kind>\.safetensors|\.bundle)")
# Entries of the layout before content addressing ({slug}-{sha256}...), taken over at start.
_OLD_ENTRY_RE = re.compile(r"[A-Za-z0-9._]+\.[0-9a-f]{%d}-(?P<sha>[0-9a-f]{64})(?P<kind>\.safetensors|\.bundle)"
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


@dataclass(frozen=True)
class IdRecord:
    """What the cache remembers of a LoRA id: the content it was fetched as, and from where."""

    id: str
    sha256: str
    url_sha256: str  # compared: a changed URL means the id is fetched again
    url: str  # without query string or fragment: for people reading the cache

    @classmethod
    def of(cls, lora_id: str, url: str, sha256: str) -> IdRecord:
        return cls(lora_id, sha256, _url_key(url), _redact(url))

    @classmethod
    def read(cls, path: Path) -> IdRecord | None:
        """The record in `path`; None when there is none, or it is unreadable (then it is swept)."""
        try:
            record = cls(**json.loads(path.read_text(encoding="utf-8", errors="surrogatepass")))
        except (OSError, ValueError, TypeError):
            return None
        return record if _SHA_RE.fullmatch(str(record.sha256)) else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=True)


def id_slug(lora_id: str) -> str:
    """A filesystem-safe, collision-free name for a LoRA id: a readable part plus a hash of the raw id.

    The readable part holds only ``[A-Za-z0-9._]`` (never ``-``, which ends the slug in temp file
    names), so a slug never prefixes another id's temp files.
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
        self._make_dirs()
        for d in self._dirs():
            tempfile.TemporaryFile(dir=d).close()  # writable? (PermissionError now, not at the first download)
        self._guard = threading.Lock()
        self._id_locks: dict[str, list] = {}  # slug -> [lock, number of threads using it]
        self._s3 = None
        self._take_over_old_layout()
        self._sweep_leftovers()
        self._forget_ids_of_missing_entries()

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
        wanted = _Wanted(lora_id, url, normalize_sha256(sha256))
        self._check_source(url)  # the same answer whether or not the id happens to be cached
        hit = self._lookup(wanted)
        if hit:
            return hit
        try:
            lora = self._fetch_once(wanted)
        except FileNotFoundError:
            log.warning("files of the LoRA cache %s vanished while %r was fetched; fetching it once more",
                        str(self.cache_dir), lora_id)
            lora = self._fetch_once(wanted)
        self._evict(keep=lora.entry)
        return lora

    def entries(self) -> list[LoraFile]:
        """What the cache holds, most recently used first (source ``"disk"``): one item per id and
        entry, and one with id ``""`` for an entry no id names any more."""
        ids: dict[str, list[str]] = {}
        for record in self._records():
            ids.setdefault(record.sha256, []).append(record.id)
        found = []
        for path in self._entry_paths():
            sha = _ENTRY_RE.fullmatch(path.name)["sha"]
            try:
                used = path.stat().st_mtime_ns
                found += [(used, path.name, lora_id, self._load_entry(path, lora_id))
                          for lora_id in sorted(ids.get(sha, [""]))]
            except (FileNotFoundError, ServiceError):  # evicted meanwhile
                continue
        found.sort(key=lambda item: (-item[0], item[1], item[2]))
        return [lora for *_, lora in found]

    def discard(self, lora: LoraFile) -> None:
        """Remove `lora`'s entry, and the ids naming it, from the cache: it was refused by the
        pipeline, or its content is not what its name says. A later fetch downloads it again."""
        self._remove_entry(lora.entry)
        self._forget_ids_of_missing_entries()
        log.info("removed %s from the LoRA disk cache", lora.entry.name)

    def partials(self) -> tuple[int, int]:
        """(count, bytes) of partial downloads and unpackings now in the temp folder: they count
        against `max_cache_bytes` while they exist."""
        sizes = [_entry_size(path) for path in _listing(self._tmp_dir)]
        return len(sizes), sum(sizes)

    # -- lookup --------------------------------------------------------------------------------

    def _lookup(self, wanted: _Wanted) -> LoraFile | None:
        """The cached entry `wanted` names: the expected content, else the id's record's content
        when the record names the same URL. Brings the id's record up to date on a hit."""
        record = IdRecord.read(self._record_path(wanted.slug))
        if wanted.expected:
            sha = wanted.expected
        elif record is not None and record.id == wanted.lora_id and record.url_sha256 == _url_key(wanted.url):
            sha = record.sha256
        else:
            return None
        path = self._entry_path(sha)
        try:
            os.utime(path)  # the LRU clock
            lora = self._load_entry(path, wanted.lora_id)
        except FileNotFoundError:  # never there, or evicted a moment ago
            return None
        current = IdRecord.of(wanted.lora_id, wanted.url, sha)
        if record != current:
            try:
                self._write_record(current)
            except OSError:  # the record only saves a later download: never fail a hit for it
                log.debug("could not update the record of %r", wanted.lora_id, exc_info=True)
        return lora

    def _entry_path(self, sha: str) -> Path:
        """The entry of content `sha`: its file, else its bundle directory (which may not exist either)."""
        file = self.cache_dir / f"{sha}{SUFFIX}"
        return file if file.exists() else self.cache_dir / f"{sha}{BUNDLE_SUFFIX}"

    def _entry_paths(self) -> Iterator[Path]:
        for path in _listing(self.cache_dir):
            if _ENTRY_RE.fullmatch(path.name):
                yield path

    def _load_entry(self, path: Path, lora_id: str, source: str = "disk") -> LoraFile:
        sha = _ENTRY_RE.fullmatch(path.name)["sha"]
        if path.name.endswith(BUNDLE_SUFFIX):
            size = sum(p.stat().st_size for p in path.iterdir() if p.name != CHECKSUMS_FILE)
            return LoraFile(lora_id, sha, path / LORA_FILE_IN_BUNDLE, size, source, read_bundle_tokens(path),
                            _read_checksums(path))
        return LoraFile(lora_id, sha, path, path.stat().st_size, source, checksums={path.name: sha})

    # -- id records ----------------------------------------------------------------------------

    def _record_path(self, slug: str) -> Path:
        return self._ids_dir / f"{slug}{RECORD_SUFFIX}"

    def _records(self) -> Iterator[IdRecord]:
        for path in _listing(self._ids_dir):
            record = IdRecord.read(path)
            if record is not None:
                yield record

    def _write_record(self, record: IdRecord) -> None:
        slug = id_slug(record.id)
        fd, name = tempfile.mkstemp(dir=self._tmp_dir, prefix=f"{slug}-", suffix=RECORD_SUFFIX)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record.to_json())
            os.replace(name, self._record_path(slug))
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise

    def _forget_ids_of_missing_entries(self) -> None:
        """Remove the records whose entry is gone (evicted, discarded), and unreadable ones. A record
        being rewritten meanwhile may go too: that id is then fetched again once, nothing worse."""
        for path in _listing(self._ids_dir):
            record = IdRecord.read(path)
            if record is None or not self._entry_path(record.sha256).exists():
                path.unlink(missing_ok=True)

    # -- eviction and leftovers ----------------------------------------------------------------

    def _evict(self, keep: Path) -> None:
        """Remove least recently used entries until the cache fits `max_cache_bytes`; never `keep`."""
        entries = []
        for path in self._entry_paths():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime_ns, path.name, _entry_size(path), path))
        total = sum(size for _, _, size, _ in entries) + self.partials()[1]  # downloads under way take room too
        evicted = False
        for _, _, size, path in sorted(entries):
            if total <= self.max_cache_bytes:
                break
            if path == keep:
                continue
            self._remove_entry(path)
            total -= size
            evicted = True
            log.info("evicted %s (%d bytes) from the LoRA disk cache", path.name, size)
        if evicted:
            self._forget_ids_of_missing_entries()

    def _remove_entry(self, path: Path) -> None:
        """Unlink a file; a bundle directory is first renamed away, so it vanishes in one step."""
        try:
            if path.is_dir():
                self._make_dirs()
                trash = Path(tempfile.mkdtemp(dir=self._tmp_dir, suffix=".trash"))
                os.replace(path, trash / path.name)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                path.unlink()
        except FileNotFoundError:  # another process evicted it first
            pass

    def _take_over_old_layout(self) -> None:
        """Rename entries of the earlier ``{slug}-{sha256}`` layout to their content's name (their
        ids' records are gone: an id without sha256 is fetched once more)."""
        for path in _listing(self.cache_dir):
            old = _OLD_ENTRY_RE.fullmatch(path.name)
            if old:
                try:
                    os.replace(path, self.cache_dir / f"{old['sha']}{old['kind']}")
                except OSError:  # that content is there already (a bundle directory)
                    self._remove_entry(path)

    def _sweep_leftovers(self) -> None:
        """Remove what a killed process left: a partial download, a half-unpacked bundle, a
        half-deleted one, its free lock files. Each temp file of ours is named after its id's slug
        and written under that id's file lock, so one whose lock another process holds (a live
        download on a shared volume) is left alone."""
        for path in _listing(self._tmp_dir):
            slug = path.name.split("-", 1)[0] if "-" in path.name else None
            lock = RemovableFileLock(self._locks_dir / f"{slug}.lock") if slug else None
            if lock is not None and not lock.acquire(timeout=0):
                continue  # being written right now
            try:
                _remove_path(path)
                log.info("removed %s, left in the LoRA cache's temp folder by an earlier process", path.name)
            finally:
                if lock is not None:
                    lock.release()
        for path in _listing(self._locks_dir):
            lock = RemovableFileLock(path)
            if lock.acquire(timeout=0):
                lock.release()

    # -- folders and locks ---------------------------------------------------------------------

    def _dirs(self) -> tuple[Path, ...]:
        return self.cache_dir, self._tmp_dir, self._locks_dir, self._ids_dir

    def _make_dirs(self) -> None:
        """(Re-)create the cache directory and its folders: an emptied or remounted volume heals here."""
        for d in self._dirs():
            d.mkdir(parents=True, exist_ok=True)

    def _lock_wait_s(self) -> float:
        if self.deadline_s is not None:
            download = self.deadline_s
        else:
            from inference.fetch import MIN_AVERAGE_BYTES_PER_S

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
        lock = RemovableFileLock(self._locks_dir / f"{slug}.lock")
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
        self._make_dirs()
        with self._id_lock(wanted.slug), self._file_lock(wanted.slug):
            return self._lookup(wanted) or self._download(wanted)

    def _download(self, wanted: _Wanted) -> LoraFile:
        started = time.perf_counter()
        fd, name = tempfile.mkstemp(dir=self._tmp_dir, prefix=f"{wanted.slug}-", suffix=".part")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                sink = _HashingWriter(out)
                self._read_source(wanted.url, sink)
                out.flush()
                os.fsync(out.fileno())
            digest = sink.hexdigest()
            if wanted.expected and digest != wanted.expected:
                raise ServiceError(ErrorCode.LORA_INVALID,
                                   f"sha256 mismatch: expected {wanted.expected}, got {digest}")
            if looks_like_tar(tmp):
                final = self.cache_dir / f"{digest}{BUNDLE_SUFFIX}"
                self._install_bundle(tmp, final, wanted.slug)
            else:
                validate_safetensors(tmp)
                final = self.cache_dir / f"{digest}{SUFFIX}"
                os.replace(tmp, final)  # the same content under another id: the same name, atomically
            self._write_record(IdRecord.of(wanted.lora_id, wanted.url, digest))
            _fsync_dir(self.cache_dir)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            log.error("the LoRA cache volume %s is full while fetching %r: lower SDXL_LORA_LORA_CACHE_MAX_BYTES "
                      "below the volume's size, or grow the volume", str(self.cache_dir), wanted.lora_id)
            raise ServiceError(ErrorCode.INTERNAL, "the LoRA cache volume is full (no space left on device)") from exc
        finally:
            tmp.unlink(missing_ok=True)  # gone already unless it failed, or was a bundle's tar
        log.info("fetched LoRA %r from %r: %d bytes in %.0f ms", wanted.lora_id, _redact(wanted.url), sink.size,
                 (time.perf_counter() - started) * 1e3)
        return self._load_entry(final, wanted.lora_id, "download")

    def _install_bundle(self, archive: Path, final: Path, slug: str) -> None:
        """Unpack and check a bundle in a temp directory, then rename the directory into place
        (unless the same content is there already: that one stays)."""
        staging = Path(tempfile.mkdtemp(dir=self._tmp_dir, prefix=f"{slug}-", suffix=".unpack"))
        try:
            checksums = extract_bundle(archive, staging / final.name, max_bytes=self.max_lora_bytes)
            validate_safetensors(staging / final.name / LORA_FILE_IN_BUNDLE)
            read_bundle_tokens(staging / final.name)
            (staging / final.name / CHECKSUMS_FILE).write_text(json.dumps(checksums, sort_keys=True))
            try:
                os.replace(staging / final.name, final)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
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


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def _listing(directory: Path) -> list[Path]:
    """What `directory` holds; nothing when it is gone (it is re-created before the next download)."""
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


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
