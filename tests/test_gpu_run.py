"""The GPU run cannot rot between the sessions that have a GPU: its wheel list is complete and the
benchmark's code runs.

The carried wheels (sdxl_lora_tools/bench/gpu_wheels.txt, for this interpreter here) are installed
with --no-deps --target into an empty folder; the benchmark then runs its --dry mode in a Python
without site-packages that sees only that folder, the repository, and the packages the GPU image
holds (gpu_image_packages.txt) of those installed here. A module the list forgot fails the import.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "sdxl_lora_tools" / "bench"


def listed(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def link_distribution(dist: metadata.Distribution, into: Path) -> None:
    """The distribution's top-level modules and its .dist-info (version checks read it)."""
    site = Path(dist.locate_file(""))
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        source = site / top
        if source.exists() and not (into / top).exists() and top != "__pycache__":
            (into / top).symlink_to(source)


@pytest.fixture(scope="module")
def gpu_like_path(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("gpu-like")
    wheels, carried, image = root / "wheels", root / "carried", root / "image"
    image.mkdir()
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
                    *listed(BENCH / "gpu_wheels.txt")], check=True)
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-compile", "--target", str(carried),
                    *map(str, wheels.glob("*.whl"))], check=True)
    carried_names = {normalized(line.split("==")[0]) for line in listed(BENCH / "gpu_wheels.txt")}
    # The image's packages, as installed here, with what they need here (the image has what its own
    # versions need): whatever else the benchmark imports must come from the carried wheels.
    pending, seen = [normalized(name) for name in listed(BENCH / "gpu_image_packages.txt")], set()
    while pending:
        name = pending.pop()
        if name in seen or name in carried_names:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # on the GPU image, not installed here (torchvision, jax, ...): nothing here imports it
        link_distribution(dist, image)
        pending += [normalized(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]) for req in dist.requires or []
                    if "extra ==" not in req]
    return os.pathsep.join(map(str, (carried, image, ROOT, ROOT / "client")))


@pytest.mark.slow
def test_the_gpu_benchmark_runs_dry_against_the_carried_wheels_alone(gpu_like_path, tiny_model, tmp_path):
    shutil.copytree(tiny_model, tmp_path / ".cache" / "bench" / "tiny-sdxl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=gpu_like_path, HF_HUB_OFFLINE="1")
    probe = ("import sys, diffusers, pydantic; assert 'site-packages' not in ''.join(p for p in sys.path "
             "if 'gpu-like' not in p), sys.path; print(diffusers.__file__)")
    found = subprocess.run([sys.executable, "-S", "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-3000:]
    assert "carried" in found.stdout, "diffusers came from the carried wheels"
    run = subprocess.run([sys.executable, "-S", "-m", "sdxl_lora_tools.bench.gpu", "--dry", "--json"], env=env,
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["dry"] is True and result["startup_s"] > 0
    for key in ("cold_load_ms", "cold_locked_ms", "first_cold_locked_ms", "hotswap_ms", "resident_switch_ms",
                "naive_reload_ms",
                "base_generate_ms", "lora_generate_ms", "fused_generate_ms", "flop_floor_ms"):
        assert result[key] > 0, key
    assert set(result["switch_ms_by_resident"]) == {"2", "8", "16"}


def test_the_run_script_carries_the_wheels_and_writes_the_figures():
    script = (ROOT / "scripts" / "gpu-run.sh").read_text()
    assert "--target /tmp/site .whl/*.whl" in script and "sdxl_lora_tools.bench.gpu" in script
    assert '--out "$OUT/gpu.json"' in script
    wheels = (ROOT / "scripts" / "gpu-wheels.sh").read_text()
    assert "gpu_wheels.txt" in wheels and "--python-version 3.12" in wheels
