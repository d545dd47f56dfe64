"""A LoRA as the disk cache hands it out: which id, which content, which file.

A value type, kept apart from the cache that makes it: the GPU side (adapters, preparation,
bundle tokens, the pipeline) only reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from inference.errors import ErrorCode, ServiceError

if TYPE_CHECKING:
    from inference.bundles import BundleTokens

SUFFIX = ".safetensors"
BUNDLE_SUFFIX = ".bundle"
SHA256_RE = re.compile(r"[0-9a-f]{64}")


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


def normalize_sha256(sha256: str | None) -> str | None:
    """Lower-case hex, or None. Anything but 64 hex digits is refused (it also names a file)."""
    if sha256 is None or sha256 == "":
        return None
    value = sha256.strip().lower()
    value = value.removeprefix("sha256:")
    if not SHA256_RE.fullmatch(value):
        raise ServiceError(ErrorCode.INVALID_REQUEST, "sha256 must be 64 hexadecimal characters")
    return value
