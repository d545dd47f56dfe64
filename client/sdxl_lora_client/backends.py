"""Where preprocessing runs: the FastAPI service or a RunPod serverless endpoint.

Both take a `contract.GenerateRequest` and return a `GenerateResponse` (`generate`, or the
coroutine `agenerate`), or raise BackendError (with the service's error code when it gave one,
and whether another attempt could succeed).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from sdxl_lora_client.contract import ErrorCode, GenerateRequest, GenerateResponse

# Codes for which the same request could succeed later; the rest fail the same way every time.
# `timeout` is retried: the client's requests are one image of a fixed size, so running past the
# service's deadline means a loaded GPU or a slow first download, not a request too big to ever fit.
RETRYABLE_CODES = frozenset({ErrorCode.BUSY, ErrorCode.OUT_OF_MEMORY, ErrorCode.UPLOAD_FAILED, ErrorCode.TIMEOUT,
                             ErrorCode.INTERNAL})


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


class _Http:
    """One backend's HTTP: a client for threads and one for asyncio (opened on first use, on the
    caller's event loop), with the same base URL, headers and timeout; transport errors become
    retryable BackendErrors naming the backend."""

    def __init__(self, name: str, base_url: str, api_key: str | None, timeout_s: float,
                 transport: httpx.BaseTransport | None, async_transport: httpx.AsyncBaseTransport | None):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.name = name
        self._options = dict(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self._sync = httpx.Client(transport=transport, **self._options)
        self._async_transport = async_transport
        self._async: httpx.AsyncClient | None = None

    def send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self._sync.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.name} unreachable: {exc}") from exc

    async def asend(self, method: str, path: str, **kwargs) -> httpx.Response:
        if self._async is None:
            self._async = httpx.AsyncClient(transport=self._async_transport, **self._options)
        try:
            return await self._async.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.name} unreachable: {exc}") from exc

    def close(self) -> None:
        self._sync.close()

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None


class ServiceBackend:
    """The FastAPI service (`sdxl-lora serve`): `generate` for threads, `agenerate` for asyncio,
    sharing one request body and one answer parser."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 300.0,
                 transport: httpx.BaseTransport | None = None, async_transport: httpx.AsyncBaseTransport | None = None):
        self._http = _Http("service", base_url, api_key, timeout_s, transport, async_transport)

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        return _service_answer(self._http.send("POST", "/v1/generate", json=_body(request)))

    async def agenerate(self, request: GenerateRequest) -> GenerateResponse:
        return _service_answer(await self._http.asend("POST", "/v1/generate", json=_body(request)))

    def close(self) -> None:
        self._http.close()

    async def aclose(self) -> None:
        await self._http.aclose()


def _body(request: GenerateRequest) -> dict:
    return request.model_dump(mode="json", exclude_none=True)


def _service_answer(response: httpx.Response) -> GenerateResponse:
    if response.status_code == 200:
        return GenerateResponse.model_validate(response.json())
    try:
        error = _error_from_body(response.json())
    except ValueError:
        error = None
    raise error or BackendError(f"service answered {response.status_code}", "internal", response.status_code >= 500)


class RunPodBackend:
    """A RunPod serverless endpoint: `/runsync`, then `/status` polling while the job is queued.

    `base_url` defaults to RunPod's API; for the runpod SDK's local server (`python -m handler
    --rp_serve_api`) pass its address and no endpoint id. `generate` and `agenerate` share the
    request, the status handling and the answer parser; only the transport differs.
    """

    def __init__(self, endpoint_id: str | None, api_key: str | None, base_url: str = "https://api.runpod.ai/v2",
                 timeout_s: float = 300.0, poll_interval_s: float = 1.0, transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None):
        root = base_url.rstrip("/") + (f"/{endpoint_id}" if endpoint_id else "")
        self._http = _Http("RunPod", root, api_key, timeout_s, transport, async_transport)
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        deadline = time.monotonic() + self.timeout_s
        body = _runpod_answer(self._http.send("POST", "/runsync", json={"input": _body(request)}))
        while _still_running(body, deadline, self.timeout_s):
            time.sleep(self.poll_interval_s)
            response = self._http.send("GET", f"/status/{body['id']}")
            if response.status_code == 405:  # the SDK's local server only has POST /status
                response = self._http.send("POST", f"/status/{body['id']}")
            body = _runpod_answer(response)
        return _runpod_output(body)

    async def agenerate(self, request: GenerateRequest) -> GenerateResponse:
        deadline = time.monotonic() + self.timeout_s
        body = _runpod_answer(await self._http.asend("POST", "/runsync", json={"input": _body(request)}))
        while _still_running(body, deadline, self.timeout_s):
            await asyncio.sleep(self.poll_interval_s)
            response = await self._http.asend("GET", f"/status/{body['id']}")
            if response.status_code == 405:
                response = await self._http.asend("POST", f"/status/{body['id']}")
            body = _runpod_answer(response)
        return _runpod_output(body)

    def close(self) -> None:
        self._http.close()

    async def aclose(self) -> None:
        await self._http.aclose()


def _runpod_answer(response: httpx.Response) -> dict:
    """The JSON of a RunPod API answer; HTTP-level failures as BackendError."""
    if response.status_code in (401, 403):
        raise BackendError("RunPod rejected the API key", "unauthorized", False)
    if response.status_code >= 400:
        raise BackendError(f"RunPod answered {response.status_code}: {response.text[:300]}", "internal",
                           response.status_code >= 500 or response.status_code == 429)
    try:
        return response.json()
    except ValueError as exc:
        raise BackendError(f"RunPod answered something that is not JSON: {response.text[:200]!r}") from exc


def _still_running(body: dict, deadline: float, timeout_s: float) -> bool:
    if body.get("status") not in ("IN_QUEUE", "IN_PROGRESS"):
        return False
    if time.monotonic() > deadline:
        raise BackendError(f"RunPod job {body.get('id')} still {body.get('status')} after {timeout_s:.0f} s")
    return True


def _runpod_output(body: dict) -> GenerateResponse:
    if body.get("status") == "COMPLETED":
        return GenerateResponse.model_validate(body["output"])
    raise _error_from_body(body) or BackendError(f"RunPod job ended {body.get('status')}", "internal")
