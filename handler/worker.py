"""The RunPod serverless handler around the shared InferenceService.

Job input is validated by the same pydantic schema as the FastAPI body (not rp_validator, which
skips a field's constraints when it has a default). Errors go back as RunPod carries them: a JSON
string under `error` (the SDK's local /runsync answers 500 to a non-string error).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

from pydantic import ValidationError

from sdxl_lora_client.contract import GenerateRequest, PrefetchRequest
from inference.errors import ErrorCode, ServiceError

log = logging.getLogger("sdxl_lora.handler")


def error_output(code: ErrorCode, message: str) -> dict:
    return {"error": json.dumps({"code": code.value, "message": message})}


def validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors())


def make_handler(service, progress_update: Callable[[dict, str], None] | None = None) -> Callable[[dict], dict]:
    """A RunPod handler bound to a loaded service. Progress goes to RunPod only when deployed there."""
    if progress_update is None and os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        from runpod.serverless import progress_update

    def handler(job: dict) -> dict:
        job_input = job.get("input") or {}
        prefetch = isinstance(job_input, dict) and "prefetch" in job_input
        if prefetch and set(job_input) != {"prefetch"}:
            return error_output(ErrorCode.INVALID_REQUEST, "a prefetch job's input holds `prefetch` and nothing else")
        try:
            if prefetch:
                request = PrefetchRequest.model_validate(job_input["prefetch"])
            else:
                request = GenerateRequest.model_validate(job_input)
        except ValidationError as exc:
            return error_output(ErrorCode.INVALID_REQUEST, validation_message(exc))
        report = (lambda phase: progress_update(job, phase)) if progress_update else None
        try:
            if prefetch:
                return service.prefetch(request).model_dump(mode="json", exclude_none=True)
            return service.generate(request, progress=report).model_dump(mode="json", exclude_none=True)
        except ServiceError as exc:
            log.warning("job %s failed: %s %s", job.get("id"), exc.code.value, exc.message)
            return error_output(exc.code, exc.message)
        except Exception as exc:  # the worker must keep serving whatever one job does
            log.exception("job %s failed unexpectedly", job.get("id"))
            return error_output(ErrorCode.INTERNAL, f"internal error ({type(exc).__name__})")

    return handler
# code change
