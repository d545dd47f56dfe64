"""`sdxl-lora compare`: judge a LoRA on a GPU box before a video job depends on it.

For each prompt, one row: the original character reference, then the img2img result at every
strength x LoRA scale, all from the same seed, each with its identity score (CLIP similarity to
the reference, see `inference.identity`) when an identity model is given. Written as one sheet
(`compare.png`) and a small self-contained page (`index.html`, every tile a PNG next to it).
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

REFERENCE_FILE = "reference.png"


@dataclass
class Tile:
    image: Image.Image
    file: str  # PNG in the output directory
    caption: str  # "reference" or "s=0.6 str=0.4"
    score: float | None = None  # identity score against the reference

    def lines(self) -> list[str]:
        return [self.caption] + ([f"id {self.score:.4f}"] if self.score is not None else [])


def parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise SystemExit(f"{option}: no values given")
    return values


def run_compare(args) -> None:
    """The `compare` command (arguments: see `sdxl_lora_tools.cli.build_parser`)."""
    from inference.images import decode_image
    from sdxl_lora_tools.sheets import labelled_grid
    from inference.lora_store import LoraStore
    from inference.pipeline import Engine, GenerationJob
    from inference.settings import Settings

    scales = parse_floats(args.scales, "--scales")
    strengths = parse_floats(args.strengths, "--strengths")
    if not all(0.0 < s <= 1.0 for s in strengths):
        raise SystemExit(f"--strengths: each must be in (0, 1], got {args.strengths!r}")
    settings = Settings()
    reference = decode_image(args.image.read_bytes())
    store = LoraStore.from_settings(settings, allow_local_paths=True)
    lora = store.fetch("cli-" + hashlib.sha256(args.lora.encode()).hexdigest()[:16], args.lora)
    engine = Engine(args.model, device=args.device or settings.device, dtype=settings.dtype,
                    max_resident_adapters=settings.max_resident_adapters)
    identity_model = args.identity_model or settings.identity_model
    scorer = None
    if identity_model:
        from inference.identity import IdentityScorer

        scorer = IdentityScorer(identity_model, device=engine.device, dtype=engine.dtype)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    reference.save(out / REFERENCE_FILE)
    rows: list[tuple[str, list[Tile]]] = []
    for number, prompt in enumerate(args.prompt, start=1):
        tiles = [Tile(reference, REFERENCE_FILE, "reference")]
        for strength in strengths:
            for scale in scales:
                job = GenerationJob(prompt=prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                    seed=args.seed, image=reference, strength=strength,
                                    loras=[(lora, scale)] if scale else [])
                image = engine.generate(job).images[0]
                tile = Tile(image, f"p{number}-str{strength:g}-s{scale:g}.png", f"s={scale:g} str={strength:g}")
                image.save(out / tile.file)
                tiles.append(tile)
        if scorer is not None:
            for tile, score in zip(tiles[1:], scorer.score(reference, [t.image for t in tiles[1:]])):
                tile.score = score
        rows.append((prompt, tiles))

    labelled_grid([(f"{n}. {prompt}", [(t.image, t.lines()) for t in tiles])
                   for n, (prompt, tiles) in enumerate(rows, start=1)]).save(out / "compare.png")
    params = {
        "model": args.model, "LoRA": args.lora, "LoRA sha256": lora.sha256, "reference": str(args.image),
        "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
        "scales": ", ".join(f"{s:g}" for s in scales), "strengths": ", ".join(f"{s:g}" for s in strengths),
        "identity model": identity_model or "none (no identity score)",
    }
    (out / "index.html").write_text(render_html(rows, params), encoding="utf-8")
    print(f"wrote {out / 'compare.png'} ({len(rows)} prompts x {len(rows[0][1])} tiles) and {out / 'index.html'}")


def render_html(rows: list[tuple[str, list[Tile]]], params: dict) -> str:
    """One table row per prompt, every tile captioned with its settings and identity score."""
    e = html.escape
    param_rows = "\n".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in params.items())
    header = "".join(f"<th>{e(t.caption)}</th>" for t in rows[0][1])
    body = []
    for prompt, tiles in rows:
        cells = "".join(
            f'<td><figure><img src="{e(t.file)}" alt="{e(t.caption)}">'
            f"<figcaption>{'<br>'.join(e(line) for line in t.lines())}</figcaption></figure></td>"
            for t in tiles)
        body.append(f'<tr><td class="prompt">{e(prompt)}</td>{cells}</tr>')
    rows_html = "\n".join(body)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>LoRA compare</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; }}
td.prompt {{ max-width: 16em; }}
figure {{ margin: 0; text-align: center; }}
img {{ display: block; max-width: 256px; height: auto; }}
</style>
</head>
<body>
<h1>LoRA compare</h1>
<table class="params">
{param_rows}
</table>
<p>s = LoRA scale, str = img2img strength, id = identity score (cosine similarity of CLIP image
embeddings to the reference; 1 = identical). The whole sheet: <a href="compare.png">compare.png</a>.</p>
<table class="tiles">
<tr><th>prompt</th>{header}</tr>
{rows_html}
</table>
</body>
</html>
"""
