"""Where preprocessing runs: the FastAPI service or a RunPod serverless endpoint.

Both take a `contract.GenerateRequest` and return a `GenerateResponse` (`generate` from threads,
the coroutine `agenerate` from any event loop), or raise `BackendError` with the service's error
code when it gave one (a client code otherwise), whether another attempt could succeed, and the
wait a `busy` answer asked for. An answer that is not a valid response with an image (an HTML
page from a proxy, `{"ok": true}`, no images) is `invalid_answer`, never a parser's exception.

Both also put LoRAs into the service's cache ahead of a job (`prefetch` / `aprefetch`), and are
context managers that close their connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
from pydantic import ValidationError

from sdxl_lora_client.contract import ErrorCode, GenerateRequest, GenerateResponse, PrefetchRequest, PrefetchResponse
from sdxl_lora_client.errors import BackendError, ClientCode
from sdxl_lora_client.http import LoopClients
from sdxl_lora_client.retry import retry_after_s

__all__ = ["BackendError", "RETRYABLE_CODES", "RunPodBackend", "ServiceBackend", "idempotency_header"]

# Codes for which the same request could succeed later; the rest fail the same way every time.
# `timeout` is retried: the client's requests are one image of a fixed size, so running past the
# service's deadline means a loaded GPU or a slow first download, not a request too big to ever fit.
RETRYABLE_CODES = frozenset({ErrorCode.BUSY, ErrorCode.OUT_OF_MEMORY, ErrorCode.UPLOAD_FAILED, ErrorCode.TIMEOUT,
                             ErrorCode.INTERNAL, ClientCode.BACKEND_UNAVAILABLE, ClientCode.INVALID_ANSWER})


# One attempt's bound: 4 attempts of it and the 2 + 4 + 8 s waits (494 s) fit the applicator's
# 600 s job deadline. A slower answer is not lost: the retry's idempotency key gets it.
DEFAULT_TIMEOUT_S = 120.0


def idempotency_header(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


class _Backend:
    """What both backends share: their HTTP clients and the context-manager protocol."""

    def __init__(self, name: str, base_url: str, api_key: str | None, timeout_s: float,
                 transport: httpx.BaseTransport | None, async_transport: httpx.AsyncBaseTransport | None):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.name = name
        self._http = LoopClients(transport, async_transport, base_url=base_url.rstrip("/"), headers=headers,
                                 timeout=timeout_s)

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return self._http.sync.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.name} unreachable: {exc!r}") from exc

    async def _asend(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            return await self._http.current().request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.name} unreachable: {exc!r}") from exc

    def close(self) -> None:
        """Close the connections of threads' calls."""
        self._http.close()

    async def aclose(self) -> None:
        """Close the running event loop's connections."""
        await self._http.aclose()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
        self.close()


class ServiceBackend(_Backend):
    """The FastAPI service (`sdxl-lora serve`): POST /v1/generate, POST /v1/loras/prefetch."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None, async_transport: httpx.AsyncBaseTransport | None = None):
        super().__init__("service", base_url, api_key, timeout_s, transport, async_transport)

    @classmethod
    def from_env(cls, **kwargs) -> ServiceBackend:
        """From `SDXL_LORA_SERVICE_URL` (required) and `SDXL_LORA_API_KEY` (optional)."""
        url = os.environ.get("SDXL_LORA_SERVICE_URL")
        if not url:
            raise BackendError("SDXL_LORA_SERVICE_URL is not set", ClientCode.BACKEND_UNAVAILABLE, False)
        return cls(url, api_key=os.environ.get("SDXL_LORA_API_KEY") or None, **kwargs)

    def generate(self, request: GenerateRequest, idempotency_key: str | None = None) -> GenerateResponse:
        response = self._send("POST", "/v1/generate", json=_body(request), headers=idempotency_header(idempotency_key))
        return _generated(_service_json(response))

    async def agenerate(self, request: GenerateRequest, idempotency_key: str | None = None) -> GenerateResponse:
        response = await self._asend("POST", "/v1/generate", json=_body(request),
                                     headers=idempotency_header(idempotency_key))
        return _generated(_service_json(response))

    def prefetch(self, request: PrefetchRequest) -> PrefetchResponse:
        return _prefetched(_service_json(self._send("POST", "/v1/loras/prefetch", json=_body(request))))

    async def aprefetch(self, request: PrefetchRequest) -> PrefetchResponse:
        return _prefetched(_service_json(await self._asend("POST", "/v1/loras/prefetch", json=_body(request))))


def _body(request: GenerateRequest | PrefetchRequest) -> dict:
    return request.model_dump(mode="json", exclude_none=True)


def _service_json(response: httpx.Response):
    """The JSON of a 200; any other status as the BackendError the service's error body names."""
    if response.status_code == 200:
        return _json_of(response, "service")
    try:
        error = _error_from_body(response.json())
    except ValueError:
        error = None
    if error is None:
        code = ErrorCode.BUSY if response.status_code == 429 else (
            ErrorCode.UNAUTHORIZED if response.status_code in (401, 403) else ErrorCode.INTERNAL)
        error = BackendError(f"service answered {response.status_code}", code,
                             response.status_code >= 500 or code == ErrorCode.BUSY)
    if error.code == ErrorCode.BUSY:
        error.retry_after_s = retry_after_s(response.headers.get("retry-after"), str(error))
    raise error


def _json_of(response: httpx.Response, who: str):
    try:
        return response.json()
    except ValueError:
        raise BackendError(f"{who} answered {response.status_code} with something that is not JSON: "
                           f"{response.text[:120]!r}", ClientCode.INVALID_ANSWER) from None


def _generated(body) -> GenerateResponse:
    """A response with at least one image, or `invalid_answer`."""
    try:
        response = GenerateResponse.model_validate(body)
    except ValidationError as exc:
        raise BackendError(f"the answer is not a generate response: {_first_error(exc)}",
                           ClientCode.INVALID_ANSWER) from None
    if not response.images:
        raise BackendError("the answer holds no image", ClientCode.INVALID_ANSWER)
    return response


def _prefetched(body) -> PrefetchResponse:
    try:
        return PrefetchResponse.model_validate(body)
    except ValidationError as exc:
        raise BackendError(f"the answer is not a prefetch response: {_first_error(exc)}",
                           ClientCode.INVALID_ANSWER) from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(map(str, error['loc'])) or 'body'}: {error['msg']}"


def _error_from_body(body) -> BackendError | None:
    """`{"error": {...}}` (FastAPI) or `{"error": "<json string>"}` (RunPod) -> BackendError."""
    error = body.get("error") if isinstance(body, dict) else None
    if error is None:
        return None
    if isinstance(error, str):
        try:
            error = json.loads(error)
        except ValueError:
            return BackendError(error[:500], ErrorCode.INTERNAL, True)
    code = str(error.get("code", "internal")) if isinstance(error, dict) else "internal"
    message = str(error.get("message", error)) if isinstance(error, dict) else str(error)
    retry_after = retry_after_s(None, message) if code == ErrorCode.BUSY else None
    return BackendError(f"{code}: {message}", code, code in RETRYABLE_CODES, retry_after)


class RunPodBackend(_Backend):
    """A RunPod serverless endpoint: `/runsync`, then `/status` polling while the job is queued;
    a cancelled `agenerate` cancels the RunPod job it started.

    `base_url` defaults to RunPod's API; for the runpod SDK's local server (`python -m handler
    --rp_serve_api`) pass its address and no endpoint id.
    """

    def __init__(self, endpoint_id: str | None, api_key: str | None, base_url: str = "https://api.runpod.ai/v2",
                 timeout_s: float = DEFAULT_TIMEOUT_S, poll_interval_s: float = 1.0,
                 transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None):
        root = base_url.rstrip("/") + (f"/{endpoint_id}" if endpoint_id else "")
        super().__init__("RunPod", root, api_key, timeout_s, transport, async_transport)
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s

    @classmethod
    def from_env(cls, **kwargs) -> RunPodBackend:
        """From `RUNPOD_ENDPOINT_ID` and `RUNPOD_API_KEY` (both required)."""
        endpoint, key = os.environ.get("RUNPOD_ENDPOINT_ID"), os.environ.get("RUNPOD_API_KEY")
        if not endpoint or not key:
            raise BackendError("RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY must both be set",
                               ClientCode.BACKEND_UNAVAILABLE, False)
        return cls(endpoint, key, **kwargs)

    def generate(self, request: GenerateRequest, idempotency_key: str | None = None) -> GenerateResponse:
        return _generated(self._run({"input": _generate_input(request, idempotency_key)}))

    async def agenerate(self, request: GenerateRequest, idempotency_key: str | None = None) -> GenerateResponse:
        return _generated(await self._arun({"input": _generate_input(request, idempotency_key)}))

    def prefetch(self, request: PrefetchRequest) -> PrefetchResponse:
        return _prefetched(self._run({"input": {"prefetch": _body(request)}}))

    async def aprefetch(self, request: PrefetchRequest) -> PrefetchResponse:
        return _prefetched(await self._arun({"input": {"prefetch": _body(request)}}))

    def _run(self, job: dict):
        deadline = time.monotonic() + self.timeout_s
        body = _runpod_answer(self._send("POST", "/runsync", json=job))
        while _still_running(body, deadline, self.timeout_s):
            time.sleep(self.poll_interval_s)
            response = self._send("GET", f"/status/{body['id']}")
            if response.status_code == 405:  # the SDK's local server only has POST /status
                response = self._send("POST", f"/status/{body['id']}")
            body = _runpod_answer(response)
        return _runpod_output(body)

    async def _arun(self, job: dict):
        deadline = time.monotonic() + self.timeout_s
        body = _runpod_answer(await self._asend("POST", "/runsync", json=job))
        try:
            while _still_running(body, deadline, self.timeout_s):
                await asyncio.sleep(self.poll_interval_s)
                response = await self._asend("GET", f"/status/{body['id']}")
                if response.status_code == 405:
                    response = await self._asend("POST", f"/status/{body['id']}")
                body = _runpod_answer(response)
        except asyncio.CancelledError:
            await _cancel_quietly(self._asend("POST", f"/cancel/{body['id']}"))
            raise
        return _runpod_output(body)


def _generate_input(request: GenerateRequest, idempotency_key: str | None) -> dict:
    return {**_body(request), **({"idempotency_key": idempotency_key} if idempotency_key else {})}


async def _cancel_quietly(call) -> None:
    """Best effort, bounded: the caller is being cancelled and must not wait long for it."""
    try:
        await asyncio.wait_for(asyncio.shield(call), 5.0)
    except (BackendError, asyncio.TimeoutError, asyncio.CancelledError):
        pass


def _runpod_answer(response: httpx.Response) -> dict:
    """The JSON of a RunPod API answer; HTTP-level failures as BackendError."""
    if response.status_code in (401, 403):
        raise BackendError("RunPod rejected the API key", ErrorCode.UNAUTHORIZED, False)
    if response.status_code == 429:
        raise BackendError("RunPod answered 429", ErrorCode.BUSY, True,
                           retry_after_s(response.headers.get("retry-after"), response.text[:300]))
    if response.status_code >= 400:
        raise BackendError(f"RunPod answered {response.status_code}: {response.text[:300]}", ErrorCode.INTERNAL,
                           response.status_code >= 500)
    body = _json_of(response, "RunPod")
    if not isinstance(body, dict):
        raise BackendError(f"RunPod answered {body!r:.120}", ClientCode.INVALID_ANSWER)
    return body


def _still_running(body: dict, deadline: float, timeout_s: float) -> bool:
    if body.get("status") not in ("IN_QUEUE", "IN_PROGRESS"):
        return False
    if time.monotonic() > deadline:
        raise BackendError(f"RunPod job {body.get('id')} still {body.get('status')} after {timeout_s:.0f} s",
                           ErrorCode.TIMEOUT)
    return True


def _runpod_output(body: dict):
    if body.get("status") == "COMPLETED":
        output = body.get("output")
        error = _error_from_body(output)  # a handler's error as its output
        if error is not None:
            raise error
        return output
    raise _error_from_body(body) or BackendError(f"RunPod job ended {body.get('status')}", ErrorCode.INTERNAL)
