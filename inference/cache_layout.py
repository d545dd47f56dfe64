"""The LoRA cache directory on disk: what lives where, and the housekeeping that keeps it whole.

Layout of the cache directory:

- ``{sha256}.safetensors``: a LoRA file, named by its content: one file per content, whichever and
  however many ids name it. A Replicate-style ``.tar`` bundle is unpacked (see `inference.bundles`)
  into ``{sha256}.bundle/`` (sha256 of the tar).
- ``.ids/{slug}.json``: one record per LoRA id (the slug: a filesystem-safe form of the id plus a
  hash of it): the id, the content it was last fetched as, and the URL it came from (a hash of the
  whole URL to compare, and the URL without its query string to read: presigned URLs carry
  credentials there). A record goes with the last entry it names.
- ``.locks/{slug}.lock``: held while that id is fetched, removed when the fetch ends.
- ``.tmp/``: downloads and unpackings under way.

The policy (what is a hit, when to download) is `inference.lora_store.LoraStore`'s; this module
only knows the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from inference.bundles import LORA_FILE as LORA_FILE_IN_BUNDLE
from inference.bundles import read_bundle_tokens
from inference.file_lock import RemovableFileLock
from inference.lora_file import BUNDLE_SUFFIX, SHA256_RE, SUFFIX, LoraFile
from inference.sources import redact

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
CHECKSUMS_FILE = "checksums.json"  # in a bundle's directory: each extracted file's sha256
ID_HASH_HEX = 24  # 96 bits of sha256(raw id) in every slug
ENTRY_RE = re.compile(r"(?P<sha>[0-9a-f]{64})(?P<kind>\.safetensors|\.bundle)")


@dataclass(frozen=True)
class IdRecord:
    """What the cache remembers of a LoRA id: the content it was fetched as, and from where."""

    id: str
    sha256: str
    url_sha256: str  # compared: a changed URL means the id is fetched again
    url: str  # without query string or fragment: for people reading the cache

    @classmethod
    def of(cls, lora_id: str, url: str, sha256: str) -> IdRecord:
        return cls(lora_id, sha256, url_key(url), redact(url))

    @classmethod
    def read(cls, path: Path) -> IdRecord | None:
        """The record in `path`; None when there is none, or it is unreadable (then it is swept)."""
        try:
            record = cls(**json.loads(path.read_text(encoding="utf-8", errors="surrogatepass")))
        except (OSError, ValueError, TypeError):
            return None
        return record if SHA256_RE.fullmatch(str(record.sha256)) else None

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


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


class CacheLayout:
    """The files of one cache directory: entries, id records, temp files and lock files."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_dir = self.root / ".tmp"
        self.locks_dir = self.root / ".locks"
        self.ids_dir = self.root / ".ids"

    def make_dirs(self) -> None:
        """(Re-)create the cache directory and its folders: an emptied or remounted volume heals here."""
        for d in self._dirs():
            d.mkdir(parents=True, exist_ok=True)

    def check_writable(self) -> None:
        """PermissionError (or another OSError) now, not at the first download."""
        for d in self._dirs():
            tempfile.TemporaryFile(dir=d).close()

    def _dirs(self) -> tuple[Path, ...]:
        return self.root, self.tmp_dir, self.locks_dir, self.ids_dir

    def lock_path(self, slug: str) -> Path:
        return self.locks_dir / f"{slug}.lock"

    # -- entries -------------------------------------------------------------------------------

    def entry_path(self, sha: str) -> Path:
        """The entry of content `sha`: its file, else its bundle directory (which may not exist either)."""
        file = self.root / f"{sha}{SUFFIX}"
        return file if file.exists() else self.root / f"{sha}{BUNDLE_SUFFIX}"

    def entry_paths(self) -> Iterator[Path]:
        for path in listing(self.root):
            if ENTRY_RE.fullmatch(path.name):
                yield path

    def load_entry(self, path: Path, lora_id: str, source: str = "disk") -> LoraFile:
        sha = ENTRY_RE.fullmatch(path.name)["sha"]
        if path.name.endswith(BUNDLE_SUFFIX):
            size = sum(p.stat().st_size for p in path.iterdir() if p.name != CHECKSUMS_FILE)
            return LoraFile(lora_id, sha, path / LORA_FILE_IN_BUNDLE, size, source, read_bundle_tokens(path),
                            _read_checksums(path))
        return LoraFile(lora_id, sha, path, path.stat().st_size, source, checksums={path.name: sha})

    def remove_entry(self, path: Path) -> None:
        """Unlink a file; a bundle directory is first renamed away, so it vanishes in one step."""
        try:
            if path.is_dir():
                self.make_dirs()
                trash = Path(tempfile.mkdtemp(dir=self.tmp_dir, suffix=".trash"))
                os.replace(path, trash / path.name)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                path.unlink()
        except FileNotFoundError:  # another process evicted it first
            pass

    def partials(self) -> tuple[int, int]:
        """(count, bytes) of partial downloads and unpackings now in the temp folder."""
        sizes = [entry_size(path) for path in listing(self.tmp_dir)]
        return len(sizes), sum(sizes)

    def evict(self, max_bytes: int, keep: Path) -> None:
        """Remove least recently used entries until the cache (downloads under way included) fits
        `max_bytes`; never `keep`."""
        entries = []
        for path in self.entry_paths():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime_ns, path.name, entry_size(path), path))
        total = sum(size for _, _, size, _ in entries) + self.partials()[1]
        evicted = False
        for _, _, size, path in sorted(entries):
            if total <= max_bytes:
                break
            if path == keep:
                continue
            self.remove_entry(path)
            total -= size
            evicted = True
            log.info("evicted %s (%d bytes) from the LoRA disk cache", path.name, size)
        if evicted:
            self.forget_ids_of_missing_entries()

    # -- id records ----------------------------------------------------------------------------

    def record_path(self, slug: str) -> Path:
        return self.ids_dir / f"{slug}{RECORD_SUFFIX}"

    def records(self) -> Iterator[IdRecord]:
        for path in listing(self.ids_dir):
            record = IdRecord.read(path)
            if record is not None:
                yield record

    def write_record(self, record: IdRecord) -> None:
        slug = id_slug(record.id)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"{slug}-", suffix=RECORD_SUFFIX)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record.to_json())
            os.replace(name, self.record_path(slug))
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise

    def forget_ids_of_missing_entries(self) -> None:
        """Remove the records whose entry is gone (evicted, discarded), and unreadable ones. A record
        being rewritten meanwhile may go too: that id is then fetched again once, nothing worse."""
        for path in listing(self.ids_dir):
            record = IdRecord.read(path)
            if record is None or not self.entry_path(record.sha256).exists():
                path.unlink(missing_ok=True)

    # -- leftovers -----------------------------------------------------------------------------

    def sweep_leftovers(self) -> None:
        """Remove what a killed process left: a partial download, a half-unpacked bundle, a
        half-deleted one, its free lock files. Each temp file of ours is named after its id's slug
        and written under that id's file lock, so one whose lock another process holds (a live
        download on a shared volume) is left alone."""
        for path in listing(self.tmp_dir):
            slug = path.name.split("-", 1)[0] if "-" in path.name else None
            lock = RemovableFileLock(self.lock_path(slug)) if slug else None
            if lock is not None and not lock.acquire(timeout=0):
                continue  # being written right now
            try:
                _remove_path(path)
                log.info("removed %s, left in the LoRA cache's temp folder by an earlier process", path.name)
            finally:
                if lock is not None:
                    lock.release()
        for path in listing(self.locks_dir):
            lock = RemovableFileLock(path)
            if lock.acquire(timeout=0):
                lock.release()


def write_checksums(bundle: Path, checksums: dict[str, str]) -> None:
    (bundle / CHECKSUMS_FILE).write_text(json.dumps(checksums, sort_keys=True))


def _read_checksums(bundle: Path) -> dict[str, str]:
    """A bundle's recorded file checksums; none for a damaged record (its files then fail to verify)."""
    try:
        checksums = json.loads((bundle / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return checksums if isinstance(checksums, dict) else {}


def entry_size(path: Path) -> int:
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


def listing(directory: Path) -> list[Path]:
    """What `directory` holds; nothing when it is gone (it is re-created before the next download)."""
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


def fsync_dir(directory: Path) -> None:
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
