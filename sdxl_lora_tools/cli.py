"""`sdxl-lora`: the command line. Heavy modules are imported inside each command, so the
client-only install can still run the commands that need nothing more."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except Exception as exc:
        from inference.errors import ServiceError

        if isinstance(exc, ServiceError):
            print(f"error [{exc.code.value}]: {exc.message}", file=sys.stderr)
            return 2
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-lora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("synth-model", help="write a random-weight SDXL pipeline (diffusers layout)")
    p.add_argument("dir", type=Path)
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth_model)

    p = commands.add_parser("synth-lora", help="write a random LoRA that fits a model")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--format", dest="fmt", choices=["diffusers", "kohya", "replicate"], default="diffusers",
                   help="replicate: a trained_model.tar bundle (UNet LoRA, <s0><s1> embeddings, special_params.json)")
    p.add_argument("--text-encoders", action="store_true", help="also target both CLIP text encoders")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth_lora)

    p = commands.add_parser("generate", help="one local generation, for quality checks")
    p.add_argument("--model", required=True, help="Hugging Face model id or local directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--lora", action="append", default=[], metavar="SRC[@SCALE]",
                   help="LoRA file path or URL (http(s)://, s3://), optionally @scale; repeatable")
    p.add_argument("--image", type=Path, help="reference image: img2img")
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--grid", help="comma-separated LoRA scales: one labelled tile each, scale 0 (no LoRA) first")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("compare", help="quality check: reference vs. LoRA-enhanced images, scored, as PNG + HTML")
    p.add_argument("--model", required=True, help="Hugging Face model id or local directory")
    p.add_argument("--lora", required=True, metavar="SRC", help="LoRA file path or URL (.safetensors or Replicate .tar)")
    p.add_argument("--image", required=True, type=Path, help="the original character reference")
    p.add_argument("--prompt", action="append", required=True, help="repeatable: one row per prompt")
    p.add_argument("--scales", default="0.6,0.8,1.0", help="comma-separated LoRA scales")
    p.add_argument("--strengths", default="0.4,0.6", help="comma-separated img2img strengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--identity-model", help="CLIP model id or directory for the identity score "
                                             "(default: SDXL_LORA_IDENTITY_MODEL)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, type=Path, help="directory: compare.png and index.html")
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("serve", help="the FastAPI service")
    p.add_argument("--model", help="Hugging Face model id or local directory (default: SDXL_LORA_MODEL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("bench", help="benchmarks against the per-request-reload baseline (see bench/)",
                            add_help=False)
    p.add_argument("which", choices=["adapters", "replay", "overhead", "soak", "gpu", "clips", "compile", "jobs", "queue",
                                     "prefetch", "worker", "idempotency"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (--help for them)")
    p.set_defaults(func=cmd_bench)

    p = commands.add_parser("compat", help="the video-model compatibility matrix (client side; no GPU extras)")
    p.add_argument("--probe", action="store_true", help="read each model's input schema from the Replicate API")
    p.add_argument("--file", help="matrix file (default: the packaged one, or SDXL_LORA_COMPAT_FILE)")
    p.add_argument("--token", help="Replicate API token (default: REPLICATE_API_TOKEN)")
    p.add_argument("--replicate-url", default="https://api.replicate.com")
    p.set_defaults(func=cmd_compat)

    p = commands.add_parser("demo", help="the whole path on this machine: synthetic model and LoRA, no GPU, no network")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.set_defaults(func=cmd_demo)
    return parser


def cmd_synth_model(args) -> None:
    from inference.synthetic import write_model

    started = time.perf_counter()
    write_model(args.dir, size=args.size, seed=args.seed)
    print(f"wrote {args.size} synthetic SDXL to {args.dir} in {time.perf_counter() - started:.1f} s")


def cmd_synth_lora(args) -> None:
    from inference.synthetic import write_lora

    write_lora(args.model, args.out, rank=args.rank, fmt=args.fmt, text_encoders=args.text_encoders, seed=args.seed)
    print(f"wrote {args.fmt} LoRA (rank {args.rank}) to {args.out}")


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`SRC@SCALE` -> (SRC, SCALE); a trailing `@...` that is not a number belongs to SRC."""
    source, sep, scale = text.rpartition("@")
    if sep:
        try:
            return source, float(scale)
        except ValueError:
            pass
    return text, 1.0


def cmd_generate(args) -> None:
    from inference.images import decode_image
    from sdxl_lora_tools.sheets import contact_sheet
    from inference.lora_store import LoraStore
    from inference.pipeline import Engine, GenerationJob
    from inference.settings import Settings

    settings = Settings()
    store = LoraStore.from_settings(settings, allow_local_paths=True)
    loras = []
    for text in args.lora:
        source, scale = parse_lora_arg(text)
        lora_id = "cli-" + hashlib.sha256(source.encode()).hexdigest()[:16]
        loras.append((store.fetch(lora_id, source), scale))
    engine = Engine(args.model, device=args.device or settings.device, dtype=settings.dtype,
                    max_resident_adapters=max(settings.max_resident_adapters, len(loras)))
    job = GenerationJob(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, strength=args.strength,
        image=decode_image(args.image.read_bytes()) if args.image else None,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.grid:
        job.loras = loras
        result = engine.generate(job)
        result.images[0].save(args.out)
        print(f"wrote {args.out} (seed {job.seed}, adapters {result.adapter_ms:.0f} ms, inference {result.inference_ms:.0f} ms)")
        return
    if not loras:
        raise SystemExit("--grid needs at least one --lora")
    scales = sorted({0.0, *(float(s) for s in args.grid.split(","))})
    tiles = []
    for scale in scales:
        job.loras = [(lora, base * scale) for lora, base in loras] if scale else []
        result = engine.generate(job)
        tiles.append((result.images[0], f"scale {scale:g}"))
    contact_sheet(tiles).save(args.out)
    print(f"wrote {args.out}: {len(tiles)} tiles, scales {', '.join(f'{s:g}' for s in scales)}, seed {job.seed}")


def cmd_compare(args) -> None:
    from sdxl_lora_tools.compare import run_compare

    run_compare(args)


def cmd_serve(args) -> None:
    import uvicorn

    from api.app import create_app
    from inference.settings import Settings

    settings = Settings(**({"model": args.model} if args.model else {}))
    logging.getLogger("sdxl_lora").setLevel(logging.INFO)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


def cmd_bench(args) -> None:
    import importlib

    importlib.import_module(f"sdxl_lora_tools.bench.{args.which}").main(args.rest)


def cmd_compat(args) -> int:
    import os

    from sdxl_lora_client.compat import load_matrix

    matrix = load_matrix(args.file)
    print(f"{'model':18} {'replicate model':32} {'image field':18} {'LoRA field':26} direct  checked")
    for entry in matrix.values():
        print(f"{entry.name:18} {entry.replicate_model:32} {entry.image_field:18} {entry.lora_field or '-':26} "
              f"{'yes' if entry.direct_lora_supported else 'no':7} {entry.checked}")
    if not args.probe:
        return 0
    from sdxl_lora_client.replicate import ReplicateClient, ReplicateError, lora_like_inputs

    token = args.token or os.environ.get("REPLICATE_API_TOKEN")
    if not token:
        print("--probe needs --token or REPLICATE_API_TOKEN", file=sys.stderr)
        return 2
    client = ReplicateClient(token, base_url=args.replicate_url)
    print("\nprobe (latest version's input schema; no prediction is run):")
    for entry in matrix.values():
        try:
            inputs = client.input_schema(entry.replicate_model)
        except ReplicateError as exc:
            print(f"{entry.name:18} error: {exc}")
            continue
        found = lora_like_inputs(inputs)
        agrees = bool(found) == entry.direct_lora_supported
        print(f"{entry.name:18} LoRA-like inputs: {', '.join(found) or 'none':50} "
              f"image field present: {'yes' if entry.image_field in inputs else 'NO'}  "
              f"{'matches matrix' if agrees else 'DIFFERS from matrix'}")
    return 0


def cmd_demo(args) -> None:
    from sdxl_lora_tools.demo import run_demo

    run_demo(args.out)


if __name__ == "__main__":
    sys.exit(main())
