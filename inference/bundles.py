"""Replicate-style LoRA bundles (`trained_model.tar`): safe extraction and what they hold.

Replicate's SDXL trainer (cog-sdxl) ships a tar with ``lora.safetensors`` (UNet LoRA in the
attention-processor layout), ``embeddings.pti`` (pivotal-tuning token embeddings, a safetensors
file with ``text_encoders_0`` / ``text_encoders_1`` rows for tokens ``<s0>``, ``<s1>``, ...) and
``special_params.json`` (prompt text -> tokens, e.g. ``{"TOK": "<s0><s1>"}``, substituted into the
prompt as the trainer's own predictor does). diffusers' advanced trainer
(train_dreambooth_lora_sdxl_advanced.py) leaves ``pytorch_lora_weights.safetensors`` and
``{output folder}_emb.safetensors`` (rows ``clip_l`` / ``clip_g`` for its tokens ``<s0>``, ``<s1>``, ...)
in its output folder: a tar of that folder is a bundle too, with both namings read.

Extraction never lets a member name choose a path: only regular files with a known base name are
copied, by reading them, into fixed names under a fresh directory. Links, devices, absolute or
``..`` paths, too many members and too many bytes (gzip bombs included) refuse the whole bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from inference.errors import ErrorCode, ServiceError
from inference.integrity import read_verified
from inference.lora_validation import check_values
from inference.safetensors_buffer import load_buffer

LORA_FILE = "lora.safetensors"
EMBEDDINGS_FILE = "embeddings.pti"
PARAMS_FILE = "special_params.json"
KNOWN_FILES = (LORA_FILE, EMBEDDINGS_FILE, PARAMS_FILE)
ROLES = {LORA_FILE: "LoRA", EMBEDDINGS_FILE: "token embeddings", PARAMS_FILE: "prompt substitutions"}
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' training scripts
ADVANCED_EMBEDDINGS_SUFFIX = "_emb.safetensors"  # train_dreambooth_lora_sdxl_advanced.py
MAX_MEMBERS = 64
MAX_PARAMS_BYTES = 64 * 1024
EMBEDDING_KEYS = (("text_encoders_0", "clip_l"), ("text_encoders_1", "clip_g"))  # per text encoder
_TOKEN_RE = re.compile(r"<s(\d+)>")
DECOMPRESSION_ERRORS = (zlib.error,)  # gzip damage past the first header; tarfile does not wrap it


def invalid(message: str) -> ServiceError:
    return ServiceError(ErrorCode.LORA_INVALID, f"bad LoRA bundle: {message}")


def looks_like_tar(path: Path) -> bool:
    """A plain (ustar) or gzip-compressed tar, judged by magic bytes rather than by the URL's suffix."""
    with open(path, "rb") as f:
        head = f.read(512)
    return head[257:262] == b"ustar" or head[:2] == b"\x1f\x8b"


def extract_bundle(archive: Path, dest: Path, max_bytes: int) -> dict[str, str]:
    """Copy the bundle's known files from `archive` into the new directory `dest`; refuse anything odd.

    Returns each copied file's sha256 (hashed while copying: the cache checks them on every read).
    Raises ServiceError(lora_invalid). `dest` must not exist; on failure the caller removes it.
    """
    dest.mkdir()
    total = 0
    found: dict[str, str] = {}
    sources: dict[str, str] = {}  # fixed name -> the member it was copied from
    full_unet = False
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError, *DECOMPRESSION_ERRORS) as exc:
        raise invalid(f"not a readable tar archive ({exc})") from exc
    with tar:
        try:
            for count, member in enumerate(_members(tar), start=1):
                if count > MAX_MEMBERS:
                    raise invalid(f"more than {MAX_MEMBERS} members")
                name = _checked_name(member)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise invalid(f"member {member.name!r} is a link or special file")
                full_unet = full_unet or PurePosixPath(name).name == "unet.safetensors"
                base = known_file(PurePosixPath(name))
                if base is None:
                    continue  # logs, samples, configs, checkpoints: not needed to apply the LoRA
                if base in found:
                    raise invalid(f"two files hold the {ROLES[base]} ({sources[base]!r} and {name!r})")
                sources[base] = name
                total += member.size
                if total > max_bytes:
                    raise invalid(f"unpacks to more than {max_bytes} bytes")
                found[base] = _copy_member(tar, member, dest / base, max_bytes)
        except (tarfile.TarError, EOFError, OSError, ValueError, *DECOMPRESSION_ERRORS) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # disk full, permissions: not the bundle's fault
            raise invalid(f"corrupt tar archive ({exc})") from exc
    if LORA_FILE not in found:
        kind = "a full fine-tune (unet.safetensors), not a LoRA" if full_unet else "nothing to load"
        raise invalid(f"no {LORA_FILE} in the archive: {kind}")
    return found


def known_file(path: PurePosixPath) -> str | None:
    """The fixed name a member is copied to, or None when it is not needed. A trainer's output folder
    tarred as it is works too: diffusers' scripts name the LoRA ``pytorch_lora_weights.safetensors``,
    the advanced trainer its embeddings ``{folder}_emb.safetensors``; ``checkpoint-N/`` is skipped."""
    if any(part.startswith("checkpoint-") for part in path.parts[:-1]):
        return None
    if path.name in KNOWN_FILES:
        return path.name
    if path.name == DIFFUSERS_LORA_FILE:
        return LORA_FILE
    if path.name.endswith(ADVANCED_EMBEDDINGS_SUFFIX):
        return EMBEDDINGS_FILE
    return None


def _members(tar: tarfile.TarFile):
    """Members as the archive is read, so a huge member list stops at MAX_MEMBERS."""
    while (member := tar.next()) is not None:
        yield member


def _checked_name(member: tarfile.TarInfo) -> str:
    name = member.name
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or "\\" in name or "\x00" in name:
        raise invalid(f"member path {name!r} points outside the archive")
    return name


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, max_bytes: int) -> str:
    """Copy one member to `target`; return its sha256."""
    source = tar.extractfile(member)
    if source is None:
        raise invalid(f"member {member.name!r} has no data")
    written = 0
    digest = hashlib.sha256()
    with source, open(target, "xb") as out:
        while chunk := source.read(1 << 20):
            written += len(chunk)
            if written > member.size or written > max_bytes:
                raise invalid(f"member {member.name!r} holds more data than its header says")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class BundleTokens:
    """Pivotal-tuning tokens of one bundle: the embeddings file, its token names and prompt substitutions."""

    embeddings: Path
    tokens: tuple[str, ...]  # the trainer's names, e.g. ("<s0>", "<s1>")
    substitutions: tuple[tuple[str, str], ...]  # special_params.json, in file order


def read_bundle_tokens(directory: Path) -> BundleTokens | None:
    """The token side of an extracted bundle, or None when it has no embeddings. Validates both files."""
    from safetensors import safe_open

    embeddings = directory / EMBEDDINGS_FILE
    if not embeddings.is_file():
        return None
    try:
        with safe_open(str(embeddings), framework="pt") as f:
            keys = set(f.keys())
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in keys}
    except Exception as exc:
        raise invalid(f"{EMBEDDINGS_FILE} is not a readable safetensors file ({str(exc)[:160]})") from exc
    rows = set()
    for names in EMBEDDING_KEYS:
        key = next((k for k in names if k in keys), None)
        if key is None:
            raise invalid(f"{EMBEDDINGS_FILE} has no {' or '.join(names)} tensor (found {sorted(keys)[:4]})")
        if len(shapes[key]) != 2 or shapes[key][0] < 1:
            raise invalid(f"{EMBEDDINGS_FILE}: {key} has shape {shapes[key]}, expected (tokens, width)")
        rows.add(shapes[key][0])
    if len(rows) != 1:
        raise invalid(f"{EMBEDDINGS_FILE}: the two text encoders have different token counts {sorted(rows)}")
    tokens = tuple(f"<s{i}>" for i in range(rows.pop()))
    return BundleTokens(embeddings, tokens, _read_substitutions(directory / PARAMS_FILE, tokens))


def _read_substitutions(path: Path, tokens: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    if not path.is_file():
        return ()
    if path.stat().st_size > MAX_PARAMS_BYTES:
        raise invalid(f"{PARAMS_FILE} is larger than {MAX_PARAMS_BYTES} bytes")
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"{PARAMS_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str) and k for k, v in params.items()):
        raise invalid(f"{PARAMS_FILE} must map prompt text to token strings")
    for value in params.values():
        unknown = [t for t in _TOKEN_RE.findall(value) if f"<s{t}>" not in tokens]
        if unknown:
            raise invalid(f"{PARAMS_FILE} uses <s{unknown[0]}>, but the embeddings hold only {len(tokens)} tokens")
    return tuple(params.items())


def load_embedding_rows(embeddings: Path, expected_sha256: str | None = None) -> list:
    """The (tokens, width) tensors for text_encoder and text_encoder_2, in that order (the file's
    sha256 checked first: `CorruptEntry` on a mismatch)."""
    tensors, _ = load_buffer(read_verified(embeddings, expected_sha256))
    try:
        check_values(tensors)
    except ServiceError as exc:
        raise invalid(f"{EMBEDDINGS_FILE}: {exc.message}") from None
    return [tensors[next(k for k in names if k in tensors)] for names in EMBEDDING_KEYS]
