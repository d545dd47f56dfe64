"""`sdxl-lora compare`: reference vs. LoRA-enhanced tiles, scored, written as one PNG and a page."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_lora_tools.sheets import labelled_grid

LINE = 12  # labelled_grid's default line height


class Page(HTMLParser):
    """The tiles of index.html: (img src, caption lines) per figure, and all text."""

    def __init__(self, text: str):
        super().__init__()
        self.figures: list[tuple[str, list[str]]] = []
        self.text: list[str] = []
        self._caption: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.figures.append((dict(attrs)["src"], []))
        elif tag == "figcaption":
            self._caption = self.figures[-1][1]

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._caption = None

    def handle_data(self, data):
        self.text.append(data)
        if self._caption is not None and data.strip():
            self._caption.append(data.strip())


def noise_image(path: Path, size=(96, 64)) -> Path:
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_labelled_grid_geometry():
    red, blue = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (40, 30), "blue")
    sheet = labelled_grid([("row one", [(red, ["a"]), (blue, ["b", "second line"])]),
                           ("row two", [(blue, ["c"])])])
    row_height = LINE + 30 + 2 * LINE
    assert sheet.height == 2 * row_height
    cell = sheet.width // 2
    assert sheet.width == 2 * cell and cell >= 40, "columns as wide as the widest tile or label"
    assert (pixels(sheet.crop((0, LINE, 40, LINE + 30))) == pixels(red)).all()
    assert (pixels(sheet.crop((cell, LINE, cell + 40, LINE + 30))) == pixels(blue)).all()
    assert (pixels(sheet.crop((0, row_height + LINE, 40, row_height + LINE + 30))) == pixels(blue)).all()
    assert (pixels(sheet.crop((cell, row_height, 2 * cell, 2 * row_height))) == 255).all(), "short rows stay blank"


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_LORA_LORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDXL_LORA_IDENTITY_MODEL", raising=False)


def test_compare_writes_a_scored_sheet_and_page(tmp_path, cache_env, capsys, tiny_model, make_lora):
    from sdxl_lora_tools.cli import main
    from inference.identity import IdentityScorer, write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    reference = noise_image(tmp_path / "ref.png")
    out = tmp_path / "out"
    prompts = ["<s0> portrait <b>bold</b>", "<s0> profile"]
    argv = ["compare", "--model", str(tiny_model), "--lora", str(make_lora(seed=1)), "--image", str(reference),
            "--scales", "0.5,1", "--strengths", "0.4,0.9", "--steps", "3", "--seed", "7", "--guidance", "5",
            "--identity-model", str(clip), "--out", str(out)]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out / "compare.png") in printed and str(out / "index.html") in printed

    # The page: per prompt, the reference then 2 strengths x 2 scales, each file next to the page.
    page = Page((out / "index.html").read_text())
    settings = [(strength, scale) for strength in ("0.4", "0.9") for scale in ("0.5", "1")]
    assert len(page.figures) == len(prompts) * (1 + len(settings))
    scorer = IdentityScorer(str(clip))
    ref_image = Image.open(reference).convert("RGB")
    for row in range(len(prompts)):
        figures = page.figures[row * 5:(row + 1) * 5]
        assert figures[0] == ("reference.png", ["reference"])
        for (src, caption), (strength, scale) in zip(figures[1:], settings):
            assert src == f"p{row + 1}-str{strength}-s{scale}.png" and (out / src).is_file()
            assert caption[0] == f"s={scale} str={strength}"
            score = float(re.fullmatch(r"id (-?\d\.\d{4})", caption[1]).group(1))
            assert score == scorer.score(ref_image, [Image.open(out / src)])[0], "scored against the reference"
            assert score < 1.0
    text = "".join(page.text)
    assert prompts[0] in text and "<b>" not in (out / "index.html").read_text(), "user text is escaped"
    for value in (str(tiny_model), "7", "3", "5.0", str(clip)):
        assert value in text
    strongest = [Image.open(out / f"p1-str0.9-s{s}.png") for s in ("0.5", "1")]
    assert not (pixels(strongest[0]) == pixels(strongest[1])).all(), "the LoRA scale changes the image"

    # The sheet: one row per prompt, one tile per setting, each with its label lines under it.
    sheet = Image.open(out / "compare.png")
    row_height = LINE + 64 + 2 * LINE
    assert sheet.height == len(prompts) * row_height
    cell = sheet.width // 5
    assert sheet.width == 5 * cell and cell >= 96
    assert (pixels(sheet.crop((0, LINE, 96, LINE + 64))) == pixels(ref_image)).all()
    second_row_last = sheet.crop((4 * cell, row_height + LINE, 4 * cell + 96, row_height + LINE + 64))
    assert (pixels(second_row_last) == pixels(Image.open(out / "p2-str0.9-s1.png"))).all()


def test_compare_without_an_identity_model_has_no_score(tmp_path, cache_env, tiny_model, make_lora):
    from sdxl_lora_tools.cli import main

    out = tmp_path / "out"
    assert main(["compare", "--model", str(tiny_model), "--lora", str(make_lora(seed=1)),
                 "--image", str(noise_image(tmp_path / "ref.png", (64, 64))), "--prompt", "<s0> portrait",
                 "--scales", "0.8", "--strengths", "0.5", "--steps", "2", "--out", str(out)]) == 0
    page = Page((out / "index.html").read_text())
    assert page.figures == [("reference.png", ["reference"]), ("p1-str0.5-s0.8.png", ["s=0.8 str=0.5"])]
    assert "none (no identity score)" in "".join(page.text)
    assert Image.open(out / "compare.png").size[1] == LINE + 64 + LINE, "one label line, no score line"


@pytest.mark.parametrize("option, value", [("--strengths", "0,0.5"), ("--strengths", "1.5"), ("--scales", "a,b")])
def test_compare_refuses_bad_settings_before_loading_anything(tmp_path, option, value):
    from sdxl_lora_tools.cli import main

    with pytest.raises(SystemExit, match=re.escape(option)):
        main(["compare", "--model", str(tmp_path / "no-model"), "--lora", "x", "--image", str(tmp_path / "none.png"),
              "--prompt", "p", option, value, "--out", str(tmp_path / "out")])
