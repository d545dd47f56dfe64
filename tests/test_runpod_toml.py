"""runpod.toml has every key, with the type, that runpodctl's project commands read.

Checked against runpod/runpodctl v2.7.2-2-g2e2df89 (commit 2e2df89fcb6a, 2026-07-23):
cmd/project/functions.go (loadProjectConfig, createEnvVars, attemptPodLaunch, startProject,
deployProject, buildProjectDockerfile) and cmd/project/tomlBuilder.go (the template it writes).
runpodctl reads these with unchecked Go type assertions (`x.(string)`, `x.(int64)`), so a missing
key or a wrong type is a panic at `project dev`/`deploy` time, not a readable error.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The configuration names of the contract (DESIGN.md, "Configuration"), prefix SDXL_LORA_.
CONTRACT_ENV = {
    "MODEL", "DEVICE", "DTYPE", "LORA_CACHE_DIR", "LORA_CACHE_MAX_BYTES", "MAX_RESIDENT_ADAPTERS",
    "MAX_LORA_BYTES", "ALLOW_PRIVATE_URLS", "API_KEY", "S3_BUCKET", "S3_ENDPOINT_URL", "S3_PREFIX",
    "QUEUE_MAX", "REQUEST_TIMEOUT_S", "VAE",
}
RUNPOD_BASE = re.compile(r"^runpod/base:(\d+\.\d+\.\d+)-cuda(\d)(\d)(\d)(\d?)-ubuntu(2204|2404)$")
TORCH_INDEX = re.compile(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)/?")


@pytest.fixture(scope="module")
def config() -> dict:
    with open(ROOT / "runpod.toml", "rb") as f:
        return tomllib.load(f)


def test_top_level_and_project_keys_have_the_types_runpodctl_asserts(config):
    assert isinstance(config["name"], str) and config["name"]
    project = config["project"]
    # uuid: `.(string)` in createEnvVars/startProject/deployProject; names the pod, the endpoint
    # and a folder on the volume, so keep it path- and name-safe.
    assert isinstance(project["uuid"], str) and re.fullmatch(r"[0-9a-f]{8}", project["uuid"]), project.get("uuid")
    for key in ("base_image", "volume_mount_path", "ports"):
        assert isinstance(project[key], str), key
    for key in ("gpu_count", "container_disk_size_gb"):  # `.(int64)`: a TOML integer, not "1" or 1.0
        assert type(project[key]) is int and project[key] >= 1, key
    assert project["gpu_types"] and all(isinstance(gpu, str) for gpu in project["gpu_types"])
    # The service looks for the network volume (LoRA cache, RunPod's model cache) at this path.
    assert project["volume_mount_path"] == "/runpod-volume"


def test_base_image_is_a_runpod_base_cuda_tag(config):
    # Tags as runpod/containers publishes them, e.g. runpod/base:1.0.2-cuda1281-ubuntu2204
    # (official-templates/base/docker-bake.hcl); "0.6.3-cuda12.8.1" is not one.
    assert RUNPOD_BASE.match(config["project"]["base_image"]), config["project"]["base_image"]


def test_ports_expose_ssh_and_the_dev_api_port(config):
    ports = [p.strip() for p in config["project"]["ports"].split(",")]  # runpodctl strips spaces
    assert all(re.fullmatch(r"\d{1,5}/(http|tcp)", p) for p in ports), ports
    assert "22/tcp" in ports  # project dev/deploy reach the pod over SSH
    # project dev serves the handler's API on 8080 only when 8080/http is there and 7270/http is
    # not; 7270 is the base image's nginx port.
    assert "8080/http" in ports and "7270/http" not in ports


def test_env_vars_are_string_contract_settings(config):
    env = config["project"]["env_vars"]
    assert env, "env_vars"
    for key, value in env.items():
        assert isinstance(value, str), f"{key}: runpodctl asserts every value is a string"
        assert key.startswith("SDXL_LORA_") and key.removeprefix("SDXL_LORA_") in CONTRACT_ENV, key
    assert env["SDXL_LORA_DEVICE"] == "cuda"  # production never falls back to CPU silently


def test_env_vars_are_fields_the_service_reads(config):
    from inference.settings import Settings

    for key in config["project"]["env_vars"]:
        assert key.removeprefix("SDXL_LORA_").lower() in Settings.model_fields, key


def test_endpoint_section(config):
    endpoint = config["endpoint"]
    # deployProject reads these with checked assertions and defaults; a wrong type is silently ignored.
    assert type(endpoint["active_workers"]) is int and endpoint["active_workers"] >= 0
    assert type(endpoint["max_workers"]) is int and endpoint["max_workers"] >= max(1, endpoint["active_workers"])
    assert type(endpoint["flashboot"]) is bool
    assert type(endpoint.get("idle_timeout", 5)) is int
    refs = endpoint.get("model_refs", [])
    assert all(isinstance(ref, str) for ref in refs)
    model = config["project"]["env_vars"].get("SDXL_LORA_MODEL")
    if refs and model:
        assert model in refs  # RunPod's model cache serves the model the workers load


def test_runtime_paths_exist(config):
    runtime = config["runtime"]
    assert runtime["python_version"] == "3.11"  # runpodctl runs python3.11 -m venv / virtualenv
    handler = ROOT / runtime["handler_path"]
    assert handler.is_file(), handler
    # runpodctl runs it as a script (`python -u <handler_path>`), not with -m.
    assert 'if __name__ == "__main__":' in handler.read_text()
    requirements = ROOT / runtime["requirements_path"]
    assert requirements.is_file(), requirements
    lines = [line.split("#")[0].strip() for line in requirements.read_text().splitlines()]
    # The local client satisfies the service's sdxl-lora-client requirement; the runpod extra is there.
    assert any(re.fullmatch(r"(-e\s+)?\./client", line) for line in lines), lines
    assert any(re.fullmatch(r"(-e\s+)?\.\[[a-z,]*\brunpod\b[a-z,]*\]", line) for line in lines), lines
    for line in lines:
        if line.startswith(("-c ", "-r ")):
            assert (requirements.parent / line.split(None, 1)[1]).is_file(), line


def test_one_cuda_build_everywhere(config):
    """The dev pod's CUDA runtime, the torch it installs and the image's default torch agree."""
    base = RUNPOD_BASE.match(config["project"]["base_image"])
    assert base, config["project"]["base_image"]
    base_cuda = (int(base.group(2) + base.group(3)), int(base.group(4)))  # 1281 -> (12, 8)
    requirements = (ROOT / config["runtime"]["requirements_path"]).read_text()
    index = TORCH_INDEX.search(requirements)
    assert index, "requirements_path pins no PyTorch CUDA index"
    assert (int(index.group(1)), int(index.group(2))) == base_cuda, (index.group(0), base.group(0))
    dockerfile = (ROOT / "Dockerfile.gpu").read_text()
    default = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", dockerfile, re.M)
    assert default and TORCH_INDEX.fullmatch(default.group(1)), "Dockerfile.gpu: ARG TORCH_INDEX_URL"
    assert TORCH_INDEX.fullmatch(default.group(1)).groups() == index.groups()
    assert re.search(r"^\s*ENV SDXL_LORA_DEVICE=cuda\b", dockerfile, re.M)
