"""Reference-image decoding, output encoding and contact sheets."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageDraw, ImageOps

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


def contact_sheet(tiles: list[tuple[Image.Image, str]], columns: int | None = None, label_height: int = 14) -> Image.Image:
    """Tiles side by side (wrapping after `columns`), each with its label printed underneath."""
    columns = columns or len(tiles)
    width = max(tile.width for tile, _ in tiles)
    height = max(tile.height for tile, _ in tiles) + label_height
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (tile, label) in enumerate(tiles):
        x, y = (index % columns) * width, (index // columns) * height
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + tile.height + 1), label, fill="black")
    return sheet


def labelled_grid(rows: list[tuple[str, list[tuple[Image.Image, list[str]]]]], line_height: int = 12) -> Image.Image:
    """Rows of tiles, each row under its title and each tile over its label lines: a comparison
    sheet (one row per prompt, one column per setting). A column is as wide as the widest tile or
    label line, so labels stay readable under small tiles and never run into the next tile."""
    cells = [cell for _, row in rows for cell in row]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max((measure.textlength(line) for _, label in cells for line in label), default=0)
    cell_width = max(max(tile.width for tile, _ in cells), int(label_width) + 4)
    tile_height = max(tile.height for tile, _ in cells)
    row_height = line_height + tile_height + line_height * max(len(label) for _, label in cells)
    columns = max(len(row) for _, row in rows)
    sheet = Image.new("RGB", (columns * cell_width, len(rows) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, row) in enumerate(rows):
        top = r * row_height
        draw.text((2, top + 1), title, fill="black")
        for c, (tile, label) in enumerate(row):
            x = c * cell_width
            sheet.paste(tile, (x, top + line_height))
            for i, line in enumerate(label):
                draw.text((x + 2, top + line_height + tile_height + 1 + i * line_height), line, fill="black")
    return sheet
