"""The video generator installs `./client` alone: only `sdxl_lora_client`, no torch, no service code.

Installs the client into an empty virtual environment (pip fetches pydantic, httpx and SQLAlchemy
from the package index, as the video generator's install would) and inspects what landed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE_PACKAGES = {"api", "client", "inference", "handler", "bench", "sdxl_lora_tools"}
HEAVY = {"torch", "diffusers", "transformers", "peft", "fastapi", "uvicorn", "runpod", "boto3", "safetensors"}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("client-venv") / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # This environment's pip installs into the empty one (pip >= 22.3: --python).
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--disable-pip-version-check", str(ROOT / "client")], check=True)
    return python


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


@pytest.mark.slow
def test_installing_the_client_installs_only_sdxl_lora_client(client_venv):
    top_level = {p.name.split(".")[0].split("-")[0] for p in site_packages(client_venv).iterdir()
                 if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"}
    assert "sdxl_lora_client" in top_level
    assert not top_level & SERVICE_PACKAGES, f"service packages installed: {top_level & SERVICE_PACKAGES}"
    assert not top_level & HEAVY, f"heavy dependencies installed: {top_level & HEAVY}"
    record = next(site_packages(client_venv).glob("sdxl_lora_client-*.dist-info")) / "RECORD"
    ours = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines()}
    assert {name for name in ours if not name.endswith(".dist-info")} == {"sdxl_lora_client"}
    files = {line.split(",")[0] for line in record.read_text().splitlines()}
    assert "sdxl_lora_client/compat.toml" in files and "sdxl_lora_client/py.typed" in files


@pytest.mark.slow
def test_the_installed_client_imports_without_the_repository(client_venv, tmp_path):
    code = ("import json, sys, sdxl_lora_client as c; from sdxl_lora_client import contract; "
            "c.load_matrix(); print(json.dumps({'file': c.__file__, 'modules': sorted(sys.modules)}))")
    out = subprocess.run([str(client_venv), "-I", "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path).stdout
    loaded = json.loads(out)
    assert str(ROOT) not in loaded["file"], "imported from the installed copy, not the repository"
    assert not {m.split(".")[0] for m in loaded["modules"]} & (HEAVY | SERVICE_PACKAGES)
