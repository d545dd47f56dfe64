"""Reference-image decoding: orientation, colour mode, sizes, and refusals."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from inference.errors import ErrorCode, ServiceError
from inference.images import decode_image, encode_image


def png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (80, 48), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(png_bytes(image, format="JPEG", exif=exif.tobytes()))
    assert decoded.size == (48, 80)


def test_converted_to_rgb_and_cropped_to_a_multiple_of_8():
    decoded = decode_image(png_bytes(Image.new("RGBA", (70, 45), (1, 2, 3, 4))))
    assert decoded.mode == "RGB" and decoded.size == (64, 40)


def declared_size_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, needle", [
    (declared_size_png(30000, 30000), "pixels"),
    (b"\x89PNG\r\n\x1a\n garbage", "cannot decode"),
    (b"", "cannot decode"),
    (png_bytes(Image.new("RGB", (5, 5))), "too small"),
])
def test_refused_images_are_image_invalid(data, needle):
    with pytest.raises(ServiceError) as err:
        decode_image(data)
    assert err.value.code == ErrorCode.IMAGE_INVALID and needle in err.value.message


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_encode_formats(fmt, magic):
    assert encode_image(Image.new("RGB", (16, 16)), fmt).startswith(magic)


@pytest.mark.parametrize("data", [b"\0\0\0", b"GIF89a", b"RIFF", b"\xff\xd8\xff\xe0\0\x10", b"<svg/>"])
def test_messages_never_show_object_reprs(data):
    """PIL says "cannot identify image file <_io.BytesIO object at 0x7fe2…>": an address in an answer."""
    with pytest.raises(ServiceError) as err:
        decode_image(data)
    assert err.value.code == ErrorCode.IMAGE_INVALID and "object at 0x" not in err.value.message
    assert err.value.message.startswith("cannot decode the image")
