"""The RunPod serverless handler around the shared InferenceService.

Job input is validated by the same pydantic schema as the FastAPI body (not rp_validator, which
skips a field's constraints when it has a default). Errors go back as RunPod carries them: a JSON
string under `error` (the SDK's local /runsync answers 500 to a non-string error); a `busy` one's
message ends with "retry after N s", RunPod's stand-in for the Retry-After header.

The handler is async, so the SDK runs RUNPOD_CONCURRENCY jobs at once on its event loop: each job's
work runs in a thread, the renders one at a time through the engine's lock, so the next job's
fetch, verification and preparation run while this one renders. RunPod's stop signal (the SDK
cancels that job's task) sets that job's cancel event: its generation stops at the next step, and
the other job runs on.

An input's `idempotency_key` (beside the request's fields) makes a repeat within
IDEMPOTENCY_TTL_S return the first answer without rendering, on any worker of the fleet
(inference/idempotency.py). `"idempotency_key": null` is `invalid_request`: a caller that sends the
field means a key, and a null one most likely lost it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable

from pydantic import ValidationError

from sdxl_lora_client.contract import GenerateRequest, PrefetchRequest
from inference.backpressure import ServiceTimes, with_retry_after
from inference.deadline import Deadline
from inference.errors import ErrorCode, ServiceError, validation_message
from inference.idempotency import check_key
from inference.idempotency_stores import store_from_settings

log = logging.getLogger("sdxl_lora.handler")


def error_output(code: ErrorCode, message: str) -> dict:
    return {"error": json.dumps({"code": code.value, "message": message})}


class Jobs:
    """One worker's jobs: the service, its idempotency store, and how many jobs it holds now."""

    def __init__(self, service, progress_update: Callable[[dict, str], None] | None):
        self.service = service
        self.progress_update = progress_update
        self.idempotency = store_from_settings(service.settings)
        self.service_times = ServiceTimes()
        self.held = 0  # jobs in hand: a busy answer's Retry-After is the time they take

    def run(self, job: dict, cancel: threading.Event) -> dict:
        """One job, start to answer, in a thread of its own (blocking calls only)."""
        job_input = job.get("input") or {}
        prefetch = isinstance(job_input, dict) and "prefetch" in job_input
        if prefetch and set(job_input) != {"prefetch"}:
            return error_output(ErrorCode.INVALID_REQUEST, "a prefetch job's input holds `prefetch` and nothing else")
        keyed = not prefetch and isinstance(job_input, dict) and "idempotency_key" in job_input
        if keyed:
            job_input = dict(job_input)
            key = job_input.pop("idempotency_key")
        try:
            if prefetch:
                request = PrefetchRequest.model_validate(job_input["prefetch"])
            else:
                request = GenerateRequest.model_validate(job_input)
        except ValidationError as exc:
            return error_output(ErrorCode.INVALID_REQUEST, validation_message(exc.errors(), drop_loc=(), whole="input"))
        deadline = Deadline(self.service.settings.request_timeout_s)
        try:
            if prefetch:
                return self.service.prefetch(request, deadline).model_dump(mode="json", exclude_none=True)
            render = self._renderer(job, request, deadline, cancel)
            if not keyed:
                return render().model_dump(mode="json", exclude_none=True)
            response, replayed = self.idempotency.answer_replayed(check_key(key), request, render, deadline)
            if replayed:
                log.info("job %r answered from the idempotency store, not rendered", job.get("id"))
            return response.model_dump(mode="json", exclude_none=True)
        except ServiceError as exc:
            log.warning("job %r failed: %s %r", job.get("id"), exc.code.value, exc.message)
            if exc.code == ErrorCode.BUSY:
                retry_after = self.service_times.retry_after_s(self.held)
                return error_output(exc.code, with_retry_after(exc.message, retry_after))
            return error_output(exc.code, exc.message)
        except Exception as exc:  # the worker must keep serving whatever one job does
            log.exception("job %r failed unexpectedly", job.get("id"))
            return error_output(ErrorCode.INTERNAL, f"internal error ({type(exc).__name__})")

    def _renderer(self, job: dict, request: GenerateRequest, deadline: Deadline, cancel: threading.Event):
        report = (lambda phase: self.progress_update(job, phase)) if self.progress_update else None

        def render():
            response = self.service.generate(request, progress=report, deadline=deadline, cancel=cancel)
            # The time the job held the pipeline: its inference, not its fetch (which overlaps).
            self.service_times.observe((response.timings_ms.adapter + response.timings_ms.inference) / 1e3)
            log.info("job %r rendered %d image(s)", job.get("id"), len(response.images))
            return response

        return render


def make_handler(service, progress_update: Callable[[dict, str], None] | None = None) -> Callable[[dict], Awaitable[dict]]:
    """A RunPod handler bound to a loaded service. Progress goes to RunPod only when deployed there."""
    if progress_update is None and os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        from runpod.serverless import progress_update
    jobs = Jobs(service, progress_update)

    async def handler(job: dict) -> dict:
        cancel = threading.Event()
        jobs.held += 1
        try:
            return await asyncio.to_thread(jobs.run, job, cancel)
        except asyncio.CancelledError:  # RunPod's stop signal for this job (or the worker's end)
            log.info("job %r stopped: its generation ends at the next step", job.get("id"))
            cancel.set()
            raise
        finally:
            jobs.held -= 1

    return handler
