"""The tensors of a safetensors file already in memory, as views of its buffer: no copy.

`safetensors.torch.load` takes `bytes` and copies every tensor out of them; the adapter cache has
the file in one (possibly pinned) uint8 buffer, read and hashed in one pass, and keeps it: each
tensor is a view of it. The header is checked as safetensors' own parser checks it (it already
parsed this exact file, sha256 for sha256, when it entered the cache): a JSON header inside the
file, known dtypes, and tensors that tile the data area exactly, in order, without gaps or overlap.
"""

from __future__ import annotations

import json
import math

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def load_buffer(buffer: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, `__metadata__`) of the safetensors file held in `buffer` (1-D uint8, little-endian
    host). ValueError, saying what is wrong, for anything that is not a well-formed file."""
    data = buffer.numpy()
    if data.size < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(data[:8].tobytes(), "little")
    if length > min(MAX_HEADER_BYTES, data.size - 8):
        raise ValueError(f"header length {length} runs past the end of the file")
    try:
        header = json.loads(data[8:8 + length].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map names to strings")
    start = 8 + length
    entries = sorted(((_entry(name, info), name) for name, info in header.items()), key=lambda e: e[0][2])
    tensors = {}
    expected_begin = 0
    for (dtype, shape, begin, end), name in entries:
        if begin != expected_begin:
            raise ValueError(f"tensor {name!r} does not start where the previous one ends")
        if start + end > data.size:
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = _view(buffer[start + begin:start + end], dtype, shape)
        expected_begin = end
    if start + expected_begin != data.size:
        raise ValueError("the tensors do not cover the file's data exactly (truncated, or bytes appended)")
    return tensors, metadata


def _entry(name: str, info) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown or missing dtype")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    dtype = DTYPES[info["dtype"]]
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not hold shape {shape} of {dtype}")
    return dtype, shape, offsets[0], offsets[1]


def _view(raw: torch.Tensor, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """`raw` bytes as a tensor of `dtype` and `shape`; copied only when misaligned for `dtype`."""
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).view(shape)
