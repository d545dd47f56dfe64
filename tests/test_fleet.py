"""The fleet on the runpod SDK's real worker loop: `python -m handler` processes fed by a loopback
stand-in of RunPod's job API, sharing one LoRA cache folder and one S3 (moto's server) for their
idempotency store, as RunPod workers share the network volume and a bucket. w1 and w2 hold one job
at a time; c2 holds two (RUNPOD_CONCURRENCY=2), checked against w1's images."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from sdxl_lora_tools.bench.runpod_standin import RunPodStandIn, kill_worker, start_worker
from tests.servers import DUMMY_AWS_ENV, FileServer, S3Server, slow_ok

ROOT = Path(__file__).resolve().parents[1]
LEASE_S = 2.0
BUCKET = "fleet"


class Worker:
    """One `python -m handler` process on the stand-in; its log is read to count renders."""

    def __init__(self, name: str, env: dict, log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = start_worker(env, out)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def rendered(self, job_id: str) -> bool:
        return f"job {job_id!r} rendered" in self.text()

    def replayed(self, job_id: str) -> bool:
        return f"job {job_id!r} answered from the idempotency store" in self.text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill_worker(self.proc)


class Fleet:
    def __init__(self, standin: RunPodStandIn, env: dict, log_dir: Path):
        self.standin, self.env, self.log_dir = standin, env, log_dir
        self.workers: list[Worker] = []

    def start(self, *names: str, extra_env: dict | None = None) -> list[Worker]:
        started = [Worker(name, {**self.env, **(extra_env or {}), **self.standin.worker_env(name)}, self.log_dir)
                   for name in names]
        self.workers += started
        for worker in started:
            try:
                self.standin.wait_for_worker(worker.name, alive=lambda: worker.proc.poll() is None)
            except RuntimeError:
                raise RuntimeError(worker.text()[-3000:]) from None
        return started

    def run(self, job_input: dict, worker: Worker | None = None) -> tuple[str, dict]:
        job_id = self.standin.submit(job_input, worker.name if worker else None)
        return job_id, self.standin.result(job_id)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, make_lora):
    root = tmp_path_factory.mktemp("fleet-loras")
    for seed in (11, 12):
        (root / f"char-{seed}.safetensors").write_bytes(make_lora(seed=seed).read_bytes())
    with FileServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model):
    shared = tmp_path_factory.mktemp("fleet-volume")  # the network volume: /runpod-volume/sdxl-lora
    with S3Server() as s3, RunPodStandIn() as standin:
        s3.client().create_bucket(Bucket=BUCKET)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "SDXL_LORA_", "AWS_"))}
        env.update(DUMMY_AWS_ENV, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'client'}", OMP_NUM_THREADS="1",
                   SDXL_LORA_MODEL=str(tiny_model), SDXL_LORA_DEVICE="cpu", SDXL_LORA_ALLOW_PRIVATE_URLS="true",
                   SDXL_LORA_LORA_CACHE_DIR=str(shared / "loras"), SDXL_LORA_S3_BUCKET=BUCKET,
                   SDXL_LORA_S3_ENDPOINT_URL=s3.endpoint, SDXL_LORA_IDEMPOTENCY_LEASE_S=str(LEASE_S),
                   SDXL_LORA_RUNPOD_CONCURRENCY="1", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        fleet = Fleet(standin, env, tmp_path_factory.mktemp("fleet-logs"))
        try:
            fleet.start("w1", "w2")
            yield fleet
        finally:
            for worker in fleet.workers:
                worker.stop()


def generate(**extra) -> dict:
    return {"prompt": "a character portrait", "num_inference_steps": 2, "width": 64, "height": 64, **extra}


def test_a_prefetch_on_one_worker_is_a_disk_hit_on_another(fleet, loras):
    w1, w2 = fleet.workers[:2]
    url = loras.url("char-11.safetensors")
    _, prefetched = fleet.run({"prefetch": {"loras": [{"id": "char-11", "url": url}]}}, w1)
    assert prefetched["output"]["loras"][0]["status"] == "cached", prefetched
    _, answer = fleet.run(generate(loras=[{"id": "char-11", "url": url}]), w2)
    assert answer["output"]["loras"][0]["source"] == "disk", answer
    assert loras.hits["/char-11.safetensors"] == 1


def test_a_key_answered_by_one_worker_is_answered_by_another_byte_for_byte(fleet):
    w1, w2 = fleet.workers[:2]
    first_id, first = fleet.run(generate(idempotency_key="clip-1/../x"), w1)  # no seed: a render picks a new one
    again_id, again = fleet.run(generate(idempotency_key="clip-1/../x"), w2)
    assert "output" in first and again == first
    assert w1.rendered(first_id) and w2.replayed(again_id) and not w2.rendered(again_id)
    _, other = fleet.run(generate(prompt="another body", idempotency_key="clip-1/../x"), w2)
    assert '"invalid_request"' in other["error"]


def test_twins_of_one_key_on_two_workers_render_once(fleet):
    w1, w2 = fleet.workers[:2]
    key = "twin/%2e%2e/" + "x" * 180
    ids = [fleet.standin.submit(generate(idempotency_key=key), worker.name) for worker in (w1, w2)]
    answers = [fleet.standin.result(job_id) for job_id in ids]
    assert "output" in answers[0] and answers[0] == answers[1]
    renders = [worker.rendered(job_id) for worker, job_id in zip((w1, w2), ids)]
    assert sorted(renders) == [False, True]


def test_a_killed_workers_key_is_rendered_by_the_next_within_its_lease(fleet):
    survivor = fleet.workers[0]
    [victim] = fleet.start("w3")
    slow = generate(num_inference_steps=40, idempotency_key="killed-mid-render")
    job_id = fleet.standin.submit(slow, victim.name)
    fleet.standin.wait_for_progress(job_id, "generate")
    kill_worker(victim.proc)
    killed_at = time.monotonic()
    assert fleet.standin.requeue_unfinished(victim.name) == [job_id]  # RunPod's retry, on whichever worker

    answer = fleet.standin.result(job_id)
    assert answer["output"]["images"], answer
    assert fleet.standin.taken[job_id] in {w.name for w in fleet.workers[:2]}
    render_s = answer["output"]["timings_ms"]["total"] / 1e3
    assert fleet.standin.done_at[job_id] - killed_at <= LEASE_S + render_s + 5.0
    taker = next(w for w in fleet.workers if w.name == fleet.standin.taken[job_id])
    assert taker.rendered(job_id) and "taken over" in taker.text()
    assert survivor.proc.poll() is None


def process_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, KeyError):
            if entry.name.isdigit() and process_status(int(entry.name))["PPid"] == str(pid):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_the_sdks_heartbeat_is_a_fresh_interpreter_not_a_copy_of_the_worker(fleet):
    worker = fleet.workers[0]
    spawned = [pid for pid in children(worker.proc.pid)
               if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(spawned) == 1, "the runpod SDK's heartbeat process is not spawned"
    rss_kb = {pid: int(process_status(pid)["VmRSS"].split()[0]) for pid in (worker.proc.pid, spawned[0])}
    assert rss_kb[spawned[0]] < 150_000 < rss_kb[worker.proc.pid]  # no torch, no model: a ping sender
    # A forked heartbeat would hold (a copy-on-write snapshot of) the worker's whole memory.


def test_sigterm_with_a_job_in_hand_answers_it_before_the_worker_exits(fleet):
    [worker] = fleet.start("w4")
    job_id = fleet.standin.submit(generate(num_inference_steps=20, seed=3), worker.name)
    fleet.standin.wait_for_progress(job_id, "generate")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(120) == 0
    answer = fleet.standin.result(job_id, timeout=0)  # answered before the exit, never lost
    assert answer["output"]["images"], answer


# -- several jobs per worker (RUNPOD_CONCURRENCY=2) ----------------------------------------------

DOWNLOAD_S = 3.0  # job B's LoRA download: about job A's render


@pytest.fixture(scope="module")
def pairs(fleet):
    """A live worker that holds two jobs at once (w1 and w2 hold one); a new one when the last was stopped."""
    started: list[Worker] = []

    def live() -> Worker:
        if not started or started[-1].proc.poll() is not None:
            started.extend(fleet.start(f"c2-{len(started)}", extra_env={"SDXL_LORA_RUNPOD_CONCURRENCY": "2"}))
        return started[-1]

    return live


def inference_window(standin: RunPodStandIn, job_id: str) -> tuple[float, float]:
    """When the job's render ran, by the stand-in's clock: its inference time, ending where its
    encoding and upload began (the job's answer came in less those)."""
    timings = standin.results[job_id]["output"]["timings_ms"]
    end = standin.done_at[job_id] - (timings["encode"] + timings["upload"]) / 1e3
    return end - (timings["adapter"] + timings["inference"]) / 1e3, end


def test_at_concurrency_2_the_next_jobs_download_overlaps_this_render(fleet, pairs, loras):
    standin, reference, pair = fleet.standin, fleet.workers[0], pairs()
    downloads: list[float] = []

    def slow_download(handler, body):
        downloads.append(time.monotonic())
        slow_ok(DOWNLOAD_S)(handler, body)

    loras.behave["/char-12.safetensors"] = slow_download
    with_lora = generate(seed=5, loras=[{"id": "char-12", "url": loras.url("char-12.safetensors")}])
    a = standin.submit(generate(num_inference_steps=30, seed=1), pair.name)
    b = standin.submit(with_lora, pair.name)
    answers = [standin.result(a), standin.result(b)]
    assert all("output" in answer for answer in answers), answers

    a_start, a_end = inference_window(standin, a)
    b_start, b_end = inference_window(standin, b)
    assert len(downloads) == 1 and downloads[0] < a_end  # B's download ran while A rendered
    assert min(a_end, b_end) - max(a_start, b_start) < 0.5  # the two renders never ran at once
    _, alone = fleet.run(with_lora, reference)  # a worker that holds one job at a time
    assert alone["output"]["images"] == answers[1]["output"]["images"]


def test_at_concurrency_2_a_timed_out_job_leaves_the_other_intact(fleet):
    standin, reference = fleet.standin, fleet.workers[0]
    [worker] = fleet.start("t2", extra_env={"SDXL_LORA_RUNPOD_CONCURRENCY": "2", "SDXL_LORA_REQUEST_TIMEOUT_S": "6"})
    slow = standin.submit(generate(num_inference_steps=100, width=512, height=512, seed=2), worker.name)
    standin.wait_for_progress(slow, "generate")
    time.sleep(3.0)  # the other job is taken late enough that its own 6 s outlast the slow one's
    other = generate(seed=6, prompt="the other job")
    kept = standin.submit(other, worker.name)
    assert "timeout" in standin.result(slow)["error"]
    answer = standin.result(kept)
    _, alone = fleet.run(other, reference)
    assert answer["output"]["images"] == alone["output"]["images"]
    assert worker.proc.poll() is None


def test_at_concurrency_2_a_stopped_job_leaves_the_other_intact_and_sigterm_drains_both(fleet, pairs):
    standin, reference, pair = fleet.standin, fleet.workers[0], pairs()
    other = generate(seed=6, prompt="the other job")
    stopped = standin.submit(generate(num_inference_steps=60, seed=2), pair.name)
    kept = standin.submit(other, pair.name)
    standin.wait_for_progress(stopped, "generate")
    standin.stop(stopped)  # RunPod's cancel, on the worker's job-stop channel
    answer = standin.result(kept)
    _, alone = fleet.run(other, reference)
    assert answer["output"]["images"] == alone["output"]["images"]
    _, next_one = fleet.run(generate(seed=7), pair)
    assert "output" in next_one and stopped not in standin.results
    assert f"job {stopped!r} stopped" in pair.text() and "generation stopped" in pair.text()

    in_hand = [standin.submit(generate(num_inference_steps=20, seed=seed), pair.name) for seed in (8, 9)]
    standin.wait_for_progress(in_hand[0], "generate")
    standin.wait_for_progress(in_hand[1], "generate")
    pair.proc.send_signal(signal.SIGTERM)
    assert pair.proc.wait(120) == 0
    assert all(standin.result(job_id, timeout=0)["output"]["images"] for job_id in in_hand)
