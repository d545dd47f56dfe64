"""The UNet compiled once, at start: compile, warm-up, the fleet's compile cache, and the recompile count.

With SDXL_LORA_COMPILE=on the engine's UNet holds no PEFT layer (`inference.unet_patcher`), so its
graph depends only on the latent's shape: a size, and the batch (2 with classifier-free guidance, 1
without). The warm-up renders each SDXL_LORA_COMPILE_WARMUP size both ways before the engine exists
(and so before /readyz answers 200); after it, a request compiles only at a size not warmed, once.
`sdxl_lora_recompiles_total` counts those compiles.

Compiling the full UNet with inductor takes minutes on a cold worker. The compiled artifacts
(`torch.compiler.save_cache_artifacts`, inductor's and AOTAutograd's caches in one blob) are kept in a
folder the fleet shares (beside the LoRA cache on the network volume), one file per torch version,
device, model, dtype, backend and warm-up sizes, loaded at start: a worker that finds it skips
inductor's code generation and only traces.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# New sizes compile once each, two batch shapes per size; torch's default limit (8 graphs per
# function) would send a worker that serves many sizes back to eager for good.
RECOMPILE_LIMIT = 64


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024x1024, 832x1216' -> [(1024, 1024), (832, 1216)] (width, height; multiples of 8)."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        width, _, height = item.lower().partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) % 8 or int(height) % 8:
            raise ValueError(f"COMPILE_WARMUP: {item!r} is not WIDTHxHEIGHT in multiples of 8")
        sizes.append((int(width), int(height)))
    return sizes


class CompileCounter:
    """Graphs dynamo compiled in this process, through torch's compile callbacks; the count after
    `warmed()` is the recompiles. Compiles loaded from the cache still trace, so they count too."""

    def __init__(self) -> None:
        self.compiled = 0
        self.at_warm_up: int | None = None
        self._lock = threading.Lock()
        torch._dynamo.callback.on_compile_end(self._on_compile_end)

    def _on_compile_end(self, args) -> None:
        if args.callback_trigger == torch._dynamo.callback.CallbackTrigger.DYNAMO:
            with self._lock:
                self.compiled += 1

    def warmed(self) -> None:
        self.at_warm_up = self.compiled

    @property
    def recompiles(self) -> int:
        return 0 if self.at_warm_up is None else self.compiled - self.at_warm_up


class CompileCache:
    """One file of compile artifacts per configuration, in a folder the fleet shares."""

    def __init__(self, folder: Path | str | None, key_parts: dict[str, str]):
        self.folder = Path(folder) if folder is not None else None
        digest = hashlib.sha256(repr(sorted(key_parts.items())).encode()).hexdigest()[:24]
        self.path = self.folder / f"unet-{digest}.bin" if self.folder is not None else None
        self.key_parts = key_parts

    def load(self) -> bool:
        if self.path is None or not self.path.is_file():
            return False
        try:
            torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as exc:  # a stale or torn file costs a cold compile, never the worker
            log.warning("compile cache %s not loaded (%s: %s); compiling from scratch", self.path, type(exc).__name__, exc)
            return False
        log.info("compile cache loaded from %s", self.path)
        return True

    def save(self) -> bool:
        """Write this process's artifacts (tmp file + rename: readers see a whole file or none)."""
        artifacts = torch.compiler.save_cache_artifacts()
        if self.path is None or not artifacts or not artifacts[0]:
            if self.path is not None:  # e.g. a backend with no artifacts (eager), or inductor bypassed its caches
                log.warning("no compile artifacts to save to %s", self.path)
            return False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(artifacts[0])
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("compile cache not saved to %s: %s", self.path, exc)
            return False
        log.info("compile cache saved to %s (%d bytes)", self.path, len(artifacts[0]))
        return True


def cache_key(model: str, device: torch.device, dtype: torch.dtype, backend: str, sizes: list[tuple[int, int]]) -> dict:
    """What decides the compiled code: a different value anywhere is a different file."""
    if device.type == "cuda":
        index = device.index or 0
        name = f"{torch.cuda.get_device_name(index)} sm{''.join(map(str, torch.cuda.get_device_capability(index)))}"
    else:
        name = device.type
    return {"torch": torch.__version__, "device": name, "model": model, "dtype": str(dtype), "backend": backend,
            "sizes": ",".join(f"{w}x{h}" for w, h in sizes)}


def _contiguous_inputs(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Every tensor the UNet gets (one level into dicts: added_cond_kwargs) in the standard layout."""
    def fix(value):
        if isinstance(value, torch.Tensor):
            return value.contiguous()
        if isinstance(value, dict):
            return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        return value

    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}


class CompiledUnet:
    """The engine's UNet compiled in place and warmed up; `recompiles` for the metrics."""

    def __init__(self, unet: torch.nn.Module, backend: str, mode: str | None = None):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.counter = CompileCounter()
        # The module stays the pipelines' own (txt2img and img2img share it); only its forward is
        # compiled, so this hook runs before dynamo's guards: img2img's latents come from the VAE's
        # encoder in another memory layout (channels-last on the CPU), which would be a second graph.
        unet.register_forward_pre_hook(_contiguous_inputs, with_kwargs=True)
        unet.forward = torch.compile(unet.forward, backend=backend, mode=mode, dynamic=False)  # one graph per shape
        self.backend = backend
        self.sizes: list[tuple[int, int]] = []
        self.cache_loaded = False
        self.warm_up_seconds = 0.0

    @property
    def recompiles(self) -> int:
        return self.counter.recompiles

    def warm_up(self, render: Callable[[int, int, float], object], sizes: list[tuple[int, int]],
                cache: CompileCache | None = None) -> None:
        """`render(width, height, guidance_scale)` once per size with and without guidance (batch 2
        and 1), the compile cache loaded first and saved after."""
        started = time.perf_counter()
        self.cache_loaded = cache.load() if cache is not None else False
        for width, height in sizes:
            for guidance_scale in (7.0, 1.0):
                render(width, height, guidance_scale)
        if cache is not None and not self.cache_loaded:
            cache.save()
        self.sizes = list(sizes)
        self.warm_up_seconds = time.perf_counter() - started
        self.counter.warmed()
        log.info("UNet compiled (%s) for %s in %.1f s (compile cache %s)", self.backend,
                 ", ".join(f"{w}x{h}" for w, h in sizes), self.warm_up_seconds, "hit" if self.cache_loaded else "miss")
