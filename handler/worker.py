"""The RunPod serverless handler around the shared InferenceService.

Job input is validated by the same pydantic schema as the FastAPI body (not rp_validator, which
skips a field's constraints when it has a default). Errors go back as RunPod carries them: a JSON
string under `error` (the SDK's local /runsync answers 500 to a non-string error); a `busy` one's
message ends with "retry after N s", RunPod's stand-in for the Retry-After header.

An input's `idempotency_key` (beside the request's fields) makes a repeat within
IDEMPOTENCY_TTL_S return the first answer without rendering, on any worker of the fleet
(inference/idempotency.py). `"idempotency_key": null` is `invalid_request`: a caller that sends the
field means a key, and a null one most likely lost it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

from pydantic import ValidationError

from sdxl_lora_client.contract import GenerateRequest, PrefetchRequest
from inference.backpressure import ServiceTimes, with_retry_after
from inference.deadline import Deadline
from inference.errors import ErrorCode, ServiceError
from inference.idempotency import IdempotencyStore, check_key

log = logging.getLogger("sdxl_lora.handler")


def error_output(code: ErrorCode, message: str) -> dict:
    return {"error": json.dumps({"code": code.value, "message": message})}


def validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors())


def make_handler(service, progress_update: Callable[[dict, str], None] | None = None) -> Callable[[dict], dict]:
    """A RunPod handler bound to a loaded service. Progress goes to RunPod only when deployed there."""
    if progress_update is None and os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        from runpod.serverless import progress_update
    idempotency = IdempotencyStore.from_settings(service.settings)
    service_times = ServiceTimes()  # jobs run one at a time: a busy job waits for about one

    def handler(job: dict) -> dict:
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
            return error_output(ErrorCode.INVALID_REQUEST, validation_message(exc))
        report = (lambda phase: progress_update(job, phase)) if progress_update else None
        deadline = Deadline(service.settings.request_timeout_s)

        def render():
            response = service.generate(request, progress=report, deadline=deadline)
            service_times.observe(response.timings_ms.total / 1e3)
            log.info("job %r rendered %d image(s)", job.get("id"), len(response.images))
            return response

        try:
            if prefetch:
                return service.prefetch(request).model_dump(mode="json", exclude_none=True)
            if not keyed:
                return render().model_dump(mode="json", exclude_none=True)
            response, replayed = idempotency.answer_replayed(check_key(key), request, render, deadline)
            if replayed:
                log.info("job %r answered from the idempotency store, not rendered", job.get("id"))
            return response.model_dump(mode="json", exclude_none=True)
        except ServiceError as exc:
            log.warning("job %r failed: %s %r", job.get("id"), exc.code.value, exc.message)
            if exc.code == ErrorCode.BUSY:
                return error_output(exc.code, with_retry_after(exc.message, service_times.retry_after_s(1)))
            return error_output(exc.code, exc.message)
        except Exception as exc:  # the worker must keep serving whatever one job does
            log.exception("job %r failed unexpectedly", job.get("id"))
            return error_output(ErrorCode.INTERNAL, f"internal error ({type(exc).__name__})")

    return handler
