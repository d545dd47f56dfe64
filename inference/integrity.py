"""A cached file is what its sha256 says, checked as it is read into the pipeline.

The file is read whole anyway (into tensors), so hashing the same bytes costs no second read. A
mismatch (a flipped bit on disk, a partial overwrite, a cache written by something else) raises
`CorruptEntry`: the service then evicts the entry and fetches it again, instead of serving other
bytes under the sha256 the response names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class CorruptEntry(Exception):
    """A cache entry whose content is not what its name says. `lora` is set by whoever knows which
    LoRA the file belongs to (the adapter cache), so the service can evict it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.lora = None


def read_verified(path: Path, expected_sha256: str | None) -> bytes:
    """The bytes of `path`, after checking their sha256 (when one is expected).

    FileNotFoundError passes through (another worker evicted the file: the caller fetches again).
    """
    data = Path(path).read_bytes()
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise CorruptEntry(f"cached file {Path(path).name} has sha256 {actual[:12]}…, not {expected_sha256[:12]}…")
    return data
