"""Where the fleet's idempotency records live: a folder of the shared volume, or S3. Each backend
offers the same small set of writes, and says how atomic each one is.

- `create`: only if the name is free. Volume: a hard link of a fully written temporary file, which
  fails when the name exists (atomic on local filesystems and on NFS, the classic NFS lock); without
  hard links, O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+). S3: PutObject with
  `If-None-Match: *` (412 when the key exists; AWS S3 since 2024, MinIO, moto >= 5.0.15).
- `replace` and `delete_if`: only if the record is still the version read. S3: `If-Match` on the
  ETag, atomic. Volume: the file's identity is compared just before the rename or unlink; a
  filesystem offers no compare-and-swap, so a write landing in that microsecond still wins.
- `write` and `delete`: unconditional.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

Versioned = tuple[bytes, str]  # a record's bytes and the version they were read at


class VolumeBackend:
    """Records as files in one folder of the shared volume."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def create(self, name: str, data: bytes) -> bool:
        path = self.directory / name
        temporary = self._write_temporary(data)
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here: an exclusive create, written in place
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            return True
        finally:
            temporary.unlink(missing_ok=True)

    def read(self, name: str) -> bytes | None:
        found = self.read_versioned(name)
        return found[0] if found is not None else None

    def read_versioned(self, name: str) -> Versioned | None:
        try:
            with open(self.directory / name, "rb") as file:
                return file.read(), self._version(os.fstat(file.fileno()))
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        os.replace(self._write_temporary(data), self.directory / name)

    def replace(self, name: str, data: bytes, version: str) -> bool:
        temporary = self._write_temporary(data)
        if self._current_version(name) != version:
            temporary.unlink()
            return False
        os.replace(temporary, self.directory / name)
        return True

    def delete(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def delete_if(self, name: str, version: str) -> bool:
        if self._current_version(name) != version:
            return False
        (self.directory / name).unlink(missing_ok=True)
        return True

    def listing(self) -> list[tuple[str, int, float]]:
        """(name, bytes, modified) of each record and marker."""
        found = []
        for item in os.scandir(self.directory):
            if item.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                stat = item.stat()
                found.append((item.name, stat.st_size, stat.st_mtime))
        return found

    def _write_temporary(self, data: bytes) -> Path:
        temporary = self.directory / f".tmp-{uuid.uuid4().hex}"
        temporary.write_bytes(data)
        return temporary

    def _current_version(self, name: str) -> str | None:
        try:
            return self._version(os.stat(self.directory / name))
        except FileNotFoundError:
            return None

    @staticmethod
    def _version(stat: os.stat_result) -> str:
        """Every write is a new file renamed into place, so a new inode and modification time."""
        return f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}"


class S3Backend:
    """Records as objects under `<S3_PREFIX>idempotency/` in S3_BUCKET."""

    def __init__(self, client, bucket: str, prefix: str):
        self.client, self.bucket, self.prefix = client, bucket, prefix

    def create(self, name: str, data: bytes) -> bool:
        return self._conditional(self.client.put_object, name, Body=data, IfNoneMatch="*")

    def read(self, name: str) -> bytes | None:
        found = self.read_versioned(name)
        return found[0] if found is not None else None

    def read_versioned(self, name: str) -> Versioned | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)
        except self.client.exceptions.NoSuchKey:
            return None
        return answer["Body"].read(), answer["ETag"]

    def write(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def replace(self, name: str, data: bytes, version: str) -> bool:
        return self._conditional(self.client.put_object, name, Body=data, IfMatch=version)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def delete_if(self, name: str, version: str) -> bool:
        return self._conditional(self.client.delete_object, name, IfMatch=version)

    def listing(self) -> list[tuple[str, int, float]]:
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                found.append((item["Key"][len(self.prefix):], item["Size"], item["LastModified"].timestamp()))
        return found

    def _conditional(self, operation, name: str, **arguments) -> bool:
        """False when the condition does not hold: 412, 409 (a concurrent conditional write of the
        same key is in flight) or 404 (`If-Match` on a key that is gone)."""
        from botocore.exceptions import ClientError

        try:
            operation(Bucket=self.bucket, Key=self.prefix + name, **arguments)
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (404, 409, 412):
                return False
            raise
