"""A cached file is what its sha256 says, checked as it is read into the pipeline.

The file is read once, into one buffer, and hashed chunk by chunk as the chunks land (still in the
CPU's cache): each chunk is hashed in a second thread while the next one is read (both release
the GIL), so with a core free the hash hides behind the read. Its tensors are then views of that
same buffer (`inference.safetensors_buffer`), so verifying costs no second read and no second copy. A mismatch (a flipped bit on disk, a partial
overwrite, a cache written by something else) raises `CorruptEntry`: the service then evicts the
entry and fetches it again, instead of serving other bytes under the sha256 the response names.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CHUNK_BYTES = 4 << 20  # read and hashed at a time: fits the CPU's last-level cache


class CorruptEntry(Exception):
    """A cache entry whose content is not what its name says. `lora` is set by whoever knows which
    LoRA the file belongs to (the adapter cache), so the service can evict it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.lora = None


def read_verified(path: Path, expected_sha256: str | None, pin_memory: bool = False) -> torch.Tensor:
    """The bytes of `path` as one uint8 tensor (in page-locked memory with `pin_memory`, so tensors
    viewed from it copy to a GPU at full speed), after checking their sha256 when one is expected.

    FileNotFoundError passes through (another worker evicted the file: the caller fetches again).
    """
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        size = os.fstat(f.fileno()).st_size
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory)
        view = memoryview(buffer.numpy())
        digest = hashlib.sha256()
        done = 0
        hashing = None  # the previous chunk's hash, running while this chunk is read
        while done < size:
            got = f.readinto(view[done:done + CHUNK_BYTES])
            if not got:  # shrank while being read: what was read cannot hash to the expected value
                break
            if hashing is not None:
                hashing.result()  # in order: one chunk at a time
            hashing = hasher.submit(digest.update, view[done:done + got])
            done += got
        if hashing is not None:
            hashing.result()
    if expected_sha256 is not None:
        actual = digest.hexdigest()
        if done != size or actual != expected_sha256:
            raise CorruptEntry(f"cached file {Path(path).name} has sha256 {actual[:12]}…, "
                               f"not {expected_sha256[:12]}…")
    return buffer[:done]
