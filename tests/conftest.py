"""Shared fixtures: one tiny synthetic SDXL and a few LoRAs for it, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from inference.synthetic import write_model

    return write_model(tmp_path_factory.mktemp("model") / "tiny-sdxl", size="tiny", seed=0)


@pytest.fixture(scope="module")
def engine(tiny_model):
    """One engine per test module, room for two resident adapters (modules that need another
    shape define their own `engine`)."""
    from inference.pipeline import Engine

    return Engine(str(tiny_model), device="cpu", max_resident_adapters=2)


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="session")
def make_lora(tiny_model, lora_dir):
    """make_lora(seed=1, fmt="diffusers", rank=4, text_encoders=False) -> path (cached per arguments)."""
    from inference.synthetic import write_lora

    def make(seed: int = 1, fmt: str = "diffusers", rank: int = 4, text_encoders: bool = False) -> Path:
        suffix = ".tar" if fmt == "replicate" else ".safetensors"
        path = lora_dir / f"lora-s{seed}-r{rank}-{fmt}{'-te' if text_encoders else ''}{suffix}"
        if not path.exists():
            write_lora(tiny_model, path, rank=rank, fmt=fmt, text_encoders=text_encoders, seed=seed)
        return path

    return make
