"""A loopback stand-in for RunPod's job API, so the runpod SDK's real worker loop (`python -m handler`
with RUNPOD_WEBHOOK_GET_JOB set: rp_scale.JobScaler) runs in tests and benchmarks.

Routes, as the SDK (runpod 1.12) calls them:
- GET  /v2/job-take/<worker>?...            one job, or 204 after holding the poll a moment
- GET  /v2/job-take-batch/<worker>?...&batch_size=N   a list of up to N jobs, or 204
- GET  /v2/job-stop/<worker>?...            {"jobsToStop": [ids]} for jobs that worker holds, or 204
- POST /v2/job-done/<worker>/<job>?...&isStream=false   a JSON body: a result, or a progress update
                                            (`"status": "IN_PROGRESS"`, from runpod.serverless.progress_update)
- GET  /ping/<worker>?job_id=...            the heartbeat
A job may be addressed to one worker (RunPod hands a job to whichever worker is free; tests pick).
`start_worker` and `kill_worker` run one `python -m handler` against it, stopped as RunPod stops a
container.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs, urlsplit

HOLD_S = 0.5  # how long an empty job-take or job-stop poll is held open


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A worker killed mid-poll resets its connections: expected here, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RunPodStandIn:
    def __init__(self, hold_s: float = HOLD_S):
        self.hold_s = hold_s
        self._changed = threading.Condition()
        self._queue: list[tuple[dict, str | None]] = []  # (job, the worker it is for, or None: any)
        self._ids = itertools.count(1)
        self.taken: dict[str, str] = {}  # job id -> the worker that took it
        self.taken_at: dict[str, float] = {}
        self.results: dict[str, dict] = {}  # job id -> the job-done body
        self.done_at: dict[str, float] = {}
        self.progress: dict[str, list] = {}  # job id -> its progress updates, in order
        self.progress_at: dict[tuple[str, object], float] = {}  # (job id, update) -> when it first came
        self.stops: dict[str, list[str]] = {}  # worker -> job ids to stop
        self.polls: dict[str, int] = {}  # worker -> job-take polls seen (a worker polling is serving)
        self.pings: dict[str, int] = {}
        self._inputs: dict[str, dict] = {}
        self.server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    # -- for the test or benchmark ------------------------------------------------------------

    def worker_env(self, worker: str) -> dict[str, str]:
        """The environment RunPod gives a worker, pointed here (and the SDK's start-up checks off)."""
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base}/v2/job-take/$ID?gpu=standin",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base}/v2/job-done/$RUNPOD_POD_ID/$ID?gpu=standin",
            "RUNPOD_WEBHOOK_PING": f"{self.base}/ping/$RUNPOD_POD_ID?gpu=standin",
            "RUNPOD_POD_ID": worker, "RUNPOD_AI_API_KEY": "standin-key", "RUNPOD_PING_INTERVAL": "1000",
            "RUNPOD_SKIP_GPU_CHECK": "true", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }

    def submit(self, job_input: dict, worker: str | None = None) -> str:
        job = {"id": f"job-{next(self._ids)}", "input": job_input}
        with self._changed:
            self._queue.append((job, worker))
            self._changed.notify_all()
        return job["id"]

    def result(self, job_id: str, timeout: float = 120) -> dict:
        with self._changed:
            if not self._changed.wait_for(lambda: job_id in self.results, timeout):
                raise TimeoutError(f"no result for {job_id} within {timeout} s (progress: {self.progress.get(job_id)})")
            return self.results[job_id]

    def wait_for_progress(self, job_id: str, phase: str, timeout: float = 120) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: phase in self.progress.get(job_id, []), timeout):
                raise TimeoutError(f"{job_id} never reported {phase!r} (progress: {self.progress.get(job_id)})")

    def wait_for_worker(self, worker: str, timeout: float = 180, alive=lambda: True) -> None:
        """Until `worker` polls for jobs (its pipeline is loaded), or `alive()` says it died."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self.polls.get(worker):
                if not alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {worker} never polled for jobs")
                self._changed.wait(0.2)

    def stop(self, job_id: str) -> None:
        """RunPod's cancel: the worker holding the job is told on its job-stop channel."""
        with self._changed:
            self.stops.setdefault(self.taken[job_id], []).append(job_id)
            self._changed.notify_all()

    def requeue_unfinished(self, worker: str) -> list[str]:
        """What RunPod does for a worker that died: its unanswered jobs go back to the queue, for any worker."""
        with self._changed:
            lost = [job_id for job_id, who in self.taken.items() if who == worker and job_id not in self.results]
            for job_id in lost:
                del self.taken[job_id]
                self._queue.append(({"id": job_id, "input": self._inputs[job_id]}, None))
            self._changed.notify_all()
        return lost

    def __enter__(self) -> RunPodStandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the API ------------------------------------------------------------------------------

    def _take(self, worker: str, count: int) -> list[dict]:
        deadline = time.monotonic() + self.hold_s
        with self._changed:
            self.polls[worker] = self.polls.get(worker, 0) + 1
            self._changed.notify_all()
            while True:
                jobs = [job for job, target in self._queue if target in (None, worker)][:count]
                if jobs or time.monotonic() >= deadline:
                    break
                self._changed.wait(max(0.0, deadline - time.monotonic()))
            for job in jobs:
                self._queue = [(j, t) for j, t in self._queue if j is not job]
                self.taken[job["id"]] = worker
                self.taken_at[job["id"]] = time.monotonic()
                self._inputs[job["id"]] = job["input"]
            return jobs

    def _stops(self, worker: str) -> list[str]:
        with self._changed:
            self._changed.wait_for(lambda: self.stops.get(worker), self.hold_s)
            return self.stops.pop(worker, [])

    def _done(self, job_id: str, body: dict) -> None:
        with self._changed:
            if body.get("status") == "IN_PROGRESS":
                self.progress.setdefault(job_id, []).append(body.get("output"))
                self.progress_at.setdefault((job_id, body.get("output")), time.monotonic())
            else:
                self.results[job_id] = body
                self.done_at[job_id] = time.monotonic()
            self._changed.notify_all()

    def _handler_class(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                query = parse_qs(url.query)
                if parts[:2] == ["v2", "job-take"]:
                    jobs = standin._take(parts[2], 1)
                    self._json(jobs[0] if jobs else None)
                elif parts[:2] == ["v2", "job-take-batch"]:
                    jobs = standin._take(parts[2], int(query.get("batch_size", ["1"])[0]))
                    self._json(jobs or None)
                elif parts[:2] == ["v2", "job-stop"]:
                    ids = standin._stops(parts[2])
                    self._json({"jobsToStop": ids} if ids else None)
                elif parts[0] == "ping":
                    with standin._changed:
                        standin.pings[parts[1]] = standin.pings.get(parts[1], 0) + 1
                    self._json({})
                else:
                    self._json({"error": "no such route"}, 404)

            def do_POST(self):
                parts = urlsplit(self.path).path.strip("/").split("/")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if parts[:2] != ["v2", "job-done"]:
                    return self._json({"error": "no such route"}, 404)
                standin._done(parts[3], json.loads(body))
                self._json({})

            def _json(self, payload, status: int = 200) -> None:
                if payload is None:
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


ROOT = Path(__file__).resolve().parents[2]


def start_worker(env: dict[str, str], log: IO[bytes]) -> subprocess.Popen:
    """`python -m handler` in a session of its own, so that `kill_worker` takes the SDK's heartbeat
    process (a child of the worker) with it."""
    return subprocess.Popen([sys.executable, "-m", "handler"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_worker(proc: subprocess.Popen) -> None:
    """As RunPod stops a container: the worker and every process it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
