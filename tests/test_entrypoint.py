"""The image's entrypoint (scripts/entrypoint.sh) outside Docker: as root it gives the volume's
sdxl-lora folder to the service user and runs the command as that user; a volume it cannot prepare
is said and left alone. Needs root and a user with uid 1000 (the image's `app`); skipped elsewhere."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "entrypoint.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="the entrypoint's root part needs root and setpriv")


@pytest.fixture
def app_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(1000)
    except KeyError:
        pytest.skip("no user with uid 1000 here")


@pytest.fixture
def volume():
    """A root-owned folder that uid 1000 can reach, as RunPod mounts /runpod-volume."""
    path = Path(tempfile.mkdtemp(prefix="runpod-volume-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def run(volume: Path, user: pwd.struct_passwd, command: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "RUNPOD_VOLUME": str(volume), "APP_USER": user.pw_name}
    return subprocess.run(["sh", str(SCRIPT), "sh", "-c", command], env=env, capture_output=True, text=True, timeout=60)


def test_root_prepares_the_volume_and_the_command_runs_as_the_app_user(volume, app_user):
    done = run(volume, app_user, 'id -u; echo "$HOME"; touch "$RUNPOD_VOLUME/sdxl-lora/loras/written"')
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1000", app_user.pw_dir]
    assert volume.stat().st_uid == 0  # the volume itself stays root's
    for folder in ("sdxl-lora", "sdxl-lora/loras", "sdxl-lora/idempotency", "sdxl-lora/compile"):
        assert (volume / folder).stat().st_uid == 1000
    assert (volume / "sdxl-lora/loras/written").stat().st_uid == 1000
    assert "is shared by the workers" in done.stderr


def test_a_volume_that_cannot_be_prepared_is_said_and_the_command_still_runs_unprivileged(volume, app_user):
    (volume / "sdxl-lora").write_text("not a folder")  # as a read-only or root-squashed mount refuses
    done = run(volume, app_user, "id -u")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1000"]
    assert "could not be prepared" in done.stderr


def test_without_root_the_command_runs_as_it_is(volume, app_user):
    done = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "sh", str(SCRIPT), "id", "-u"],
                          env={"PATH": os.environ["PATH"], "RUNPOD_VOLUME": str(volume), "APP_USER": app_user.pw_name},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1000"] and not (volume / "sdxl-lora").exists()
