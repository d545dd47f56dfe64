"""A LoRA file is what it claims to be: a parseable safetensors file when it enters the cache
(`validate_safetensors`), and what its sha256 says each time it is read into the pipeline.

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

from inference.errors import ErrorCode, ServiceError

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


def verify_on_disk(path: Path, expected_sha256: str) -> None:
    """Hash `path` from disk a chunk at a time (memory: one chunk, whatever the file's size): a
    prefetch checks a cached file without reading it into memory. CorruptEntry when it differs;
    FileNotFoundError passes through."""
    with open(path, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected_sha256:
        raise CorruptEntry(f"cached file {Path(path).name} has sha256 {actual[:12]}…, not {expected_sha256[:12]}…")


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
