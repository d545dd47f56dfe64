"""Contact sheets for people to look at: the quality tools' output, not the service's."""

from __future__ import annotations

from PIL import Image, ImageDraw


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
