"""Where preprocessing runs: the FastAPI service or a RunPod serverless endpoint.

Both take an `api.schema.GenerateRequest` and return a `GenerateResponse`, or raise BackendError
(with the service's error code when it gave one, and whether another attempt could succeed).
"""

from __future__ import annotations

import json
import time

import httpx

from api.schema import GenerateRequest, GenerateResponse

# Codes for which the same request could succeed later; the rest fail the same way every time.
RETRYABLE_CODES = {"busy", "out_of_memory", "upload_failed", "internal"}


class BackendError(Exception):
    def __init__(self, message: str, code: str = "unavailable", retryable: bool = True):
        super().__init__(message)
        self.code = code
        self.retryable = retryable


def _error_from_body(body) -> BackendError | None:
    """`{"error": {...}}` (FastAPI) or `{"error": "<json string>"}` (RunPod) -> BackendError."""
    error = body.get("error") if isinstance(body, dict) else None
    if error is None:
        return None
    if isinstance(error, str):
        try:
            error = json.loads(error)
        except ValueError:
            return BackendError(error[:500], "internal", True)
    code = str(error.get("code", "internal")) if isinstance(error, dict) else "internal"
    message = str(error.get("message", error)) if isinstance(error, dict) else str(error)
    return BackendError(f"{code}: {message}", code, code in RETRYABLE_CODES)


class ServiceBackend:
    """The FastAPI service (`sdxl-lora serve`)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 300.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport)

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        try:
            response = self._http.post("/v1/generate", json=request.model_dump(mode="json", exclude_none=True))
        except httpx.HTTPError as exc:
            raise BackendError(f"service unreachable: {exc}") from exc
        if response.status_code == 200:
            return GenerateResponse.model_validate(response.json())
        try:
            error = _error_from_body(response.json())
        except ValueError:
            error = None
        raise error or BackendError(f"service answered {response.status_code}", "internal", response.status_code >= 500)

    def close(self) -> None:
        self._http.close()


class RunPodBackend:
    """A RunPod serverless endpoint: `/runsync`, falling back to `/status` polling while queued.

    `base_url` defaults to RunPod's API; for the runpod SDK's local server (`python -m handler
    --rp_serve_api`) pass its address and no endpoint id.
    """

    def __init__(self, endpoint_id: str | None, api_key: str | None, base_url: str = "https://api.runpod.ai/v2",
                 timeout_s: float = 300.0, poll_interval_s: float = 1.0, transport: httpx.BaseTransport | None = None):
        root = base_url.rstrip("/") + (f"/{endpoint_id}" if endpoint_id else "")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=root, headers=headers, timeout=timeout_s, transport=transport)
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        deadline = time.monotonic() + self.timeout_s
        body = self._call("POST", "/runsync", json={"input": request.model_dump(mode="json", exclude_none=True)})
        while body.get("status") in ("IN_QUEUE", "IN_PROGRESS"):
            if time.monotonic() > deadline:
                raise BackendError(f"RunPod job {body.get('id')} still {body.get('status')} after {self.timeout_s:.0f} s")
            time.sleep(self.poll_interval_s)
            body = self._status(body["id"])
        if body.get("status") == "COMPLETED":
            return GenerateResponse.model_validate(body["output"])
        raise _error_from_body(body) or BackendError(f"RunPod job ended {body.get('status')}", "internal")

    def _status(self, job_id: str) -> dict:
        try:
            return self._call("GET", f"/status/{job_id}")
        except BackendError as exc:
            if exc.code != "http_405":
                raise
            return self._call("POST", f"/status/{job_id}")  # the SDK's local server only has POST

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendError(f"RunPod unreachable: {exc}") from exc
        if response.status_code == 405:
            raise BackendError("method not allowed", "http_405", False)
        if response.status_code in (401, 403):
            raise BackendError("RunPod rejected the API key", "unauthorized", False)
        if response.status_code >= 400:
            raise BackendError(f"RunPod answered {response.status_code}: {response.text[:300]}", "internal",
                               response.status_code >= 500 or response.status_code == 429)
        return response.json()

    def close(self) -> None:
        self._http.close()
