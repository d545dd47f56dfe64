"""What an encoded image is and how big, read with the standard library alone (the client may not
import Pillow): PNG (every chunk's CRC, and the pixel data inflated to its exact size), JPEG (the
frame header, and an end marker) and WebP (VP8, VP8L and VP8X headers).

Enough to tell an image from an HTML page, a truncated download or bytes labelled with another
type, without decoding pixels the client never looks at.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

__all__ = ["ImageInfo", "NotAnImage", "read_image_info"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> samples per pixel
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); not DHT (C4), JPG (C8), DAC (CC)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
MAX_INFLATED = 512 * 1024 * 1024  # a decompression bomb is not an image either


class NotAnImage(ValueError):
    """The bytes are not a whole PNG, JPEG or WebP image."""


@dataclass(frozen=True)
class ImageInfo:
    mime: str
    width: int
    height: int


def read_image_info(data: bytes) -> ImageInfo:
    """The image's type and size; NotAnImage when the bytes are not one."""
    if data.startswith(PNG_SIGNATURE):
        return _png(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    raise NotAnImage(f"not a PNG, JPEG or WebP image (starts {data[:16]!r})")


def _png(data: bytes) -> ImageInfo:
    chunks = list(_png_chunks(data))
    if not chunks or chunks[0][0] != b"IHDR" or chunks[-1][0] != b"IEND":
        raise NotAnImage("a PNG must start with IHDR and end with IEND")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if width == 0 or height == 0 or colour not in _PNG_SAMPLES:
        raise NotAnImage(f"PNG header: {width}x{height}, colour type {colour}")
    inflater = zlib.decompressobj()
    try:
        pixels = inflater.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"), MAX_INFLATED)
    except zlib.error as exc:
        raise NotAnImage(f"PNG pixel data does not inflate: {exc}") from None
    if not inflater.eof:
        raise NotAnImage("PNG pixel data is truncated")
    if interlace == 0:
        row = 1 + (width * _PNG_SAMPLES[colour] * depth + 7) // 8
        if len(pixels) != row * height:
            raise NotAnImage(f"PNG pixel data is {len(pixels)} bytes, not {row * height} for {width}x{height}")
    return ImageInfo("image/png", width, height)


def _png_chunks(data: bytes):
    offset = len(PNG_SIGNATURE)
    while offset < len(data):
        if offset + 12 > len(data):
            raise NotAnImage("PNG truncated in a chunk header")
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        crc = data[offset + 8 + length:offset + 12 + length]
        if len(body) != length or len(crc) != 4 or struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise NotAnImage(f"PNG chunk {kind!r} is truncated or its CRC is wrong")
        yield kind, body
        offset += 12 + length
        if kind == b"IEND":
            if offset != len(data):
                raise NotAnImage("bytes after the PNG's IEND")
            return


def _jpeg(data: bytes) -> ImageInfo:
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise NotAnImage("JPEG without its end marker (truncated?)")
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise NotAnImage(f"JPEG marker expected at byte {offset}")
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        (length,) = struct.unpack(">H", data[offset + 2:offset + 4])
        if marker in _JPEG_SOF:
            if offset + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[offset + 5:offset + 9])
            if width == 0 or height == 0:
                raise NotAnImage(f"JPEG frame of {width}x{height}")
            return ImageInfo("image/jpeg", width, height)
        offset += 2 + length
    raise NotAnImage("JPEG without a frame header")


def _webp(data: bytes) -> ImageInfo:
    (riff_size,) = struct.unpack("<I", data[4:8])
    if riff_size + 8 != len(data):
        raise NotAnImage(f"WebP's RIFF size {riff_size + 8} is not its length {len(data)}")
    kind, chunk = data[12:16], data[20:]
    if kind == b"VP8 " and len(chunk) >= 10 and chunk[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", chunk[6:10])
        return _sized("image/webp", width & 0x3FFF, height & 0x3FFF)
    if kind == b"VP8L" and len(chunk) >= 5 and chunk[0] == 0x2F:
        bits = int.from_bytes(chunk[1:5], "little")
        return _sized("image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8X" and len(chunk) >= 10:
        return _sized("image/webp", int.from_bytes(chunk[4:7], "little") + 1,
                      int.from_bytes(chunk[7:10], "little") + 1)
    raise NotAnImage(f"WebP with an unknown or broken {kind!r} chunk")


def _sized(mime: str, width: int, height: int) -> ImageInfo:
    if width == 0 or height == 0:
        raise NotAnImage(f"{mime} of {width}x{height}")
    return ImageInfo(mime, width, height)
