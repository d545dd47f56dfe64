"""Reference-image decoding and output encoding."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from inference.errors import ErrorCode, ServiceError

MAX_PIXELS = 4096 * 4096  # far above SDXL's working sizes, far below a decompression bomb
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> upright RGB image whose sides are multiples of 8 (cropped by at most 7 px)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ServiceError(ErrorCode.IMAGE_INVALID, f"image is {width}x{height}: more than {max_pixels} pixels")
            image.load()
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ServiceError(ErrorCode.IMAGE_INVALID, f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:  # PIL's own message shows the buffer's repr (an object address)
        raise ServiceError(ErrorCode.IMAGE_INVALID, f"cannot decode the image: {len(data)} bytes in no image "
                           "format this service reads (PNG, JPEG, WebP, ...)") from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ServiceError(ErrorCode.IMAGE_INVALID, f"cannot decode the image: {exc}") from exc
    image = ImageOps.exif_transpose(image).convert("RGB")
    width, height = image.width // 8 * 8, image.height // 8 * 8
    if width < 8 or height < 8:
        raise ServiceError(ErrorCode.IMAGE_INVALID, f"image is {image.width}x{image.height}: too small")
    if (width, height) != image.size:
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return image


def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=95)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=95)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buffer.getvalue()
