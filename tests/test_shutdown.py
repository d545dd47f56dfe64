"""Graceful shutdown of `sdxl-lora serve`: SIGTERM while one request runs and others wait.

The promise (api/app.py): the running generation finishes; every waiting request is answered,
either done or `busy`; nothing is cut off (no connection reset, no empty reply); the process exits
within the grace period plus one generation. The service runs as a real subprocess, as a
platform would stop it, with generations made slow (many steps) so that the queue is real.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes import start_serve

WAITING = 3  # requests queued behind the running one (QUEUE_MAX is set to this)


def start_service(tiny_model: Path, cache: Path, grace_s: float) -> tuple[subprocess.Popen, str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    return start_serve(tiny_model, cache.parent, {"SDXL_LORA_LORA_CACHE_DIR": str(cache), "SDXL_LORA_QUEUE_MAX": str(WAITING),
                                                 "SDXL_LORA_SHUTDOWN_GRACE_S": str(grace_s)})


def queue_depth(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith("sdxl_lora_queue_depth "):
            return float(line.split()[1])
    return -1.0


# The running request must outlast the others' arrival (0.1 s apart) by far, on a quiet machine too:
# a 64² tiny image takes ~0.01 s a step there, so it runs at 256² (~0.02 s a step, 100 steps ~2 s).
RUNNING_SIDE = 256


def body(steps: int, seed: int, side: int = 64) -> dict:
    return {"prompt": "a character portrait", "num_inference_steps": steps, "width": side, "height": side, "seed": seed}


def sigterm_with_a_queue(tiny_model: Path, tmp_path: Path, grace_s: float, steps: int, queued_steps: int):
    """Start the service, fill it (one request running with `steps`, WAITING queued with
    `queued_steps`), SIGTERM it; return the answers and how long the process took to exit."""
    proc, base, log = start_service(tiny_model, tmp_path / "cache", grace_s)
    try:
        warm = httpx.post(f"{base}/v1/generate", json=body(steps, 0, RUNNING_SIDE), timeout=300)  # also sets the recent-time estimate
        assert warm.status_code == 200, warm.text[:300]
        answers: dict[int, httpx.Response | Exception] = {}

        def call(i: int) -> None:
            try:
                running = body(steps, i, RUNNING_SIDE)
                answers[i] = httpx.post(f"{base}/v1/generate", json=body(queued_steps, i) if i else running, timeout=300)
            except Exception as exc:  # a lost request (reset, empty reply) shows up here
                answers[i] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(1 + WAITING)]
        for t in threads:
            t.start()
            time.sleep(0.1)  # the first one is the running one
        deadline = time.monotonic() + 60
        while queue_depth(base) < WAITING:
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.05)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s + 120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the service did not exit after SIGTERM:\n{log.read_text()[-3000:]}")
        exit_s = time.monotonic() - signalled
        for t in threads:
            t.join(timeout=30)
        after = None
        try:
            after = httpx.post(f"{base}/v1/generate", json=body(1, 99), timeout=10)
        except httpx.ConnectError as exc:  # nothing listens any more: refused, never half-answered
            after = exc
        return answers, exit_s, warm, after, proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_every_request_answered(answers: dict) -> tuple[list, list]:
    assert len(answers) == 1 + WAITING
    lost = {i: a for i, a in answers.items() if isinstance(a, Exception)}
    assert not lost, f"requests without an answer: {lost}"
    done = [a for a in answers.values() if a.status_code == 200]
    busy = [a for a in answers.values() if a.status_code != 200]
    for answer in busy:
        assert answer.status_code == 429, answer.text[:300]
        assert answer.json()["error"]["code"] == "busy" and "shutting down" in answer.json()["error"]["message"]
        assert int(answer.headers["retry-after"]) >= 1
    return done, busy


def test_sigterm_finishes_the_running_request_and_answers_the_queue_busy(tiny_model, tmp_path):
    """Grace 0: the running generation completes, the queue is answered busy at once, the process
    exits as soon as the running one is done (well before the queue could have been worked off)."""
    answers, exit_s, warm, after, returncode = sigterm_with_a_queue(tiny_model, tmp_path, grace_s=0, steps=100,
                                                                   queued_steps=25)
    done, busy = assert_every_request_answered(answers)
    assert len(done) == 1 and len(busy) == WAITING
    one_generation = warm.json()["timings_ms"]["total"] / 1e3
    # The queue was answered busy above, not worked off; the exit follows the running generation, at
    # its usual speed (a drain loop that spun on the event loop once made it take ~7x its warm time).
    # The bound is in generations (the warm-up is the yardstick on a loaded machine too) plus the
    # process's own stop.
    assert exit_s < one_generation * 2 + 3, (exit_s, one_generation)
    assert isinstance(after, httpx.ConnectError)
    assert returncode == -signal.SIGTERM, "uvicorn re-raises the signal it handled (exit status 143), as the README says"


def test_sigterm_with_enough_grace_works_off_the_queue(tiny_model, tmp_path):
    """A grace period that covers the queue: every request is done, then the process exits."""
    answers, exit_s, warm, after, _ = sigterm_with_a_queue(tiny_model, tmp_path, grace_s=300, steps=100, queued_steps=2)
    done, busy = assert_every_request_answered(answers)
    assert len(done) == 1 + WAITING and busy == []
    assert isinstance(after, httpx.ConnectError)
