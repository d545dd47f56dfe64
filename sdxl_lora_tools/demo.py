"""`sdxl-lora demo`: the whole path on a machine with no GPU and no network.

A tiny synthetic SDXL, a character LoRA as Replicate's trainer ships it (trained_model.tar with
pivotal-tuning tokens for "TOK") and a tiny CLIP for the identity score (built once, cached), a
file server on loopback that plays the LoRA bucket and the reference-image host, the FastAPI
service on a free loopback port, and one video job through the client's LoraApplicator with a
SQLite ledger.
"""

from __future__ import annotations

import base64
import hashlib
import io
import secrets
import time
from pathlib import Path

CACHE = Path(".cache/demo")


def character_reference(path: Path) -> None:
    """A stand-in character portrait: a face-like figure on a plain background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (228, 221, 206))
    draw = ImageDraw.Draw(image)
    draw.ellipse((16, 8, 48, 44), fill=(222, 184, 150))  # face
    draw.rectangle((12, 44, 52, 64), fill=(60, 80, 140))  # shoulders
    draw.ellipse((24, 20, 28, 24), fill=(40, 40, 40))
    draw.ellipse((36, 20, 40, 24), fill=(40, 40, 40))
    draw.arc((26, 28, 38, 36), 20, 160, fill=(120, 50, 50))
    draw.pieslice((14, 4, 50, 24), 180, 360, fill=(90, 60, 30))  # hair
    image.save(path)


def run_demo(out_dir: Path) -> Path:
    from api.app import create_app
    from sdxl_lora_tools.local_servers import LocalFileServer, LocalServer
    from inference.identity import write_tiny_clip
    from inference.settings import Settings
    from inference.synthetic import write_lora, write_model

    started = time.perf_counter()
    model, files, clip = CACHE / "tiny-sdxl", CACHE / "files", CACHE / "identity-clip"
    files.mkdir(parents=True, exist_ok=True)
    if not (model / "model_index.json").exists():
        write_model(model, size="tiny", seed=0)
    if not (files / "trained_model.tar").exists():
        write_lora(model, files / "trained_model.tar", rank=8, fmt="replicate", seed=1)
    if not (clip / "config.json").exists():
        write_tiny_clip(clip)
    character_reference(files / "reference.png")
    print(f"[1/4] synthetic tiny SDXL, Replicate-style character LoRA bundle and identity CLIP ready "
          f"({time.perf_counter() - started:.1f} s, {CACHE})")

    out_dir.mkdir(parents=True, exist_ok=True)
    # A key for this run only: the demo exercises the bearer check as a deployment would.
    settings = Settings(model=str(model), device="cpu", allow_private_urls=True, lora_cache_dir=out_dir / "lora-cache",
                        identity_model=str(clip), api_key=secrets.token_urlsafe(16))
    with LocalFileServer(files) as files_url, LocalServer(create_app(settings), wait_ready=True) as base:
        return _run_job(base, settings.api_key, files, files_url, out_dir)


def _run_job(base: str, api_key: str, files: Path, files_url: str, out_dir: Path) -> Path:
    from PIL import Image

    from sdxl_lora_client import ClipPrompt, EnhanceOptions, LoraApplicator, ServiceBackend, SqlStore
    from sdxl_lora_tools.sheets import contact_sheet

    print(f"[2/4] service up at {base} (LoRAs and reference served from {files_url})")

    db = out_dir / "video.db"
    db.unlink(missing_ok=True)
    store = SqlStore(f"sqlite:///{db}")
    # The sha256 pins the bytes: without it, a bundle rebuilt at the same URL under the same id would
    # be served from out/demo/lora-cache as first downloaded (the cache compares URLs, not what they serve).
    bundle_sha256 = hashlib.sha256((files / "trained_model.tar").read_bytes()).hexdigest()
    store.put_lora("demo-character", status="completed", url=f"{files_url}/trained_model.tar", trigger="TOK",
                   sha256=bundle_sha256)
    store.create_job("demo-job")
    clip = ClipPrompt("clip-1", "a person waves at the camera", [f"{files_url}/reference.png"],
                      [f"{files_url}/scene.png"])
    backend = ServiceBackend(base, api_key=api_key)
    options = EnhanceOptions(num_inference_steps=8, strength=0.6, min_identity_score=0.5)
    job_started = time.perf_counter()
    with LoraApplicator(store, backend, options=options) as applicator:  # closes the backend too
        result = applicator.apply("demo-job", [clip], video_model="kling_v21", lora_model_id="demo-character")
    job_s = time.perf_counter() - job_started
    [outcome] = result.outcomes
    print(f"[3/4] job through LoraApplicator: path={result.path} in {job_s * 1e3:.0f} ms; clip {outcome.clip_id}: "
          f"{outcome.status}{f' ({outcome.reason})' if outcome.reason else ''}, {outcome.attempts} attempt(s), "
          f"${outcome.cost}" + (f"; warnings: {result.warnings}" if result.warnings else ""))

    original = Image.open(files / "reference.png").convert("RGB")
    tiles = [(original, "original")]
    if outcome.status == "enhanced":
        enhanced = Image.open(io.BytesIO(base64.b64decode(outcome.image.base64))).convert("RGB")
        tiles.append((enhanced, "enhanced"))
    sheet_path = out_dir / "reference_vs_enhanced.png"
    contact_sheet(tiles).resize((len(tiles) * 256, 256 + 56), Image.Resampling.NEAREST).save(sheet_path)

    for row in store.job_costs("demo-job"):
        details = row["details"] or {}
        timings = details.get("timings_ms", {})
        print(f"      cost: {row['stage']}/{row['api_name']} clip={row['clip_id']} ${row['cost']:.6f} "
              f"(lora source: {details.get('lora_source')}; identity score {details.get('identity_score')} "
              f"vs minimum {options.min_identity_score}; service ms: "
              + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ")")
    print(f"      job total_cost: ${store.total_cost('demo-job'):.6f}")
    print(f"[4/4] wrote {sheet_path} (original | enhanced); ledger in {db}")
    return sheet_path
