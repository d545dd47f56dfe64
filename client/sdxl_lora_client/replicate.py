"""The few Replicate HTTP API calls the client makes: create a prediction, wait for it, cancel it,
read a model's input schema.

`run` is a coroutine, usable from any event loop: cancelling it cancels the prediction it started
(`POST /v1/predictions/{id}/cancel`), so a cancelled video job leaves nothing running and billed.
429 is retried after Retry-After (the official client does not retry a throttled prediction create).
Every failure, an answer that is not JSON included, is a `ReplicateError`; a prediction comes back
as a typed `Prediction`, as replicate-python's does.
"""

from __future__ import annotations

import asyncio
import os

from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from sdxl_lora_client.errors import ReplicateError
from sdxl_lora_client.http import LoopClients
from sdxl_lora_client.retry import RetryPolicy, retry_after_s

__all__ = ["Prediction", "ReplicateClient", "ReplicateError", "lora_like_inputs"]

TERMINAL = ("succeeded", "failed", "canceled")
TOKEN_ENV = "REPLICATE_API_TOKEN"
# A throttled call waits its Retry-After (1 s when it names none, at most 60 s), with jitter.
THROTTLE_RETRY = RetryPolicy(waits=(), max_busy_wait_s=60.0)


class Prediction(BaseModel):
    """A Replicate prediction, as the API describes it (fields the client reads; others kept)."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    status: str | None = None
    output: Any = None
    error: Any = None

    def output_urls(self) -> list[str]:
        """The output's URLs: a video model's output is one URL or a list of them."""
        if isinstance(self.output, list):
            return [str(item) for item in self.output]
        return [str(self.output)] if self.output else []


class ReplicateClient:
    """A Replicate API client for one token (default: `REPLICATE_API_TOKEN`)."""

    def __init__(self, token: str | None = None, base_url: str = "https://api.replicate.com",
                 timeout_s: float = 600.0, poll_interval_s: float = 2.0, max_throttle_retries: int = 5,
                 wait_s: int = 60, throttle_retry: RetryPolicy = THROTTLE_RETRY,
                 transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None):
        token = token or os.environ.get(TOKEN_ENV)
        if not token:
            raise ReplicateError(f"no Replicate token: pass one or set {TOKEN_ENV}")
        self._http = LoopClients(transport, async_transport, base_url=base_url.rstrip("/"),
                                 timeout=httpx.Timeout(timeout_s, connect=10.0),
                                 headers={"authorization": f"Bearer {token}"})
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self.max_throttle_retries = max_throttle_retries
        self.throttle_retry = throttle_retry
        self.wait_s = wait_s

    async def run(self, model: str, inputs: dict) -> Prediction:
        """Create a prediction on `owner/name` (holding the connection up to `wait_s` with
        `Prefer: wait`), then poll until it ends. Returns the succeeded prediction."""
        prediction = _prediction(await self._request("POST", f"/v1/models/{model}/predictions",
                                                     json={"input": inputs}, headers={"prefer": f"wait={self.wait_s}"}))
        try:
            async with asyncio.timeout(self.timeout_s):
                while prediction.status not in TERMINAL:
                    await asyncio.sleep(self.poll_interval_s)
                    prediction = _prediction(await self._request("GET", f"/v1/predictions/{_id_of(prediction)}"))
        except TimeoutError:
            await self._cancel(prediction)
            raise ReplicateError(f"prediction {prediction.id} still {prediction.status}") from None
        except asyncio.CancelledError:
            await self._cancel(prediction)
            raise
        if prediction.status != "succeeded":
            raise ReplicateError(f"prediction {prediction.id} {prediction.status}: {prediction.error}")
        return prediction

    async def _cancel(self, prediction: Prediction) -> None:
        """Cancel a prediction we started; best effort and bounded, shielded from our caller's cancel."""
        if not prediction.id:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._request("POST", f"/v1/predictions/{prediction.id}/cancel")),
                                   10.0)
        except (ReplicateError, TimeoutError, asyncio.CancelledError):
            pass

    def input_schema(self, model: str) -> dict:
        """The model's latest version's Input schema properties."""
        body = _json(_checked(self._send_sync("GET", f"/v1/models/{model}")))
        schema = (body.get("latest_version") or {}).get("openapi_schema") or {}
        return schema.get("components", {}).get("schemas", {}).get("Input", {}).get("properties", {})

    async def _request(self, method: str, path: str, **kwargs) -> dict:
        for attempt in range(self.max_throttle_retries + 1):
            try:
                response = await self._http.current().request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                raise ReplicateError(f"Replicate unreachable: {exc!r}") from exc
            if response.status_code == 429 and attempt < self.max_throttle_retries:
                await asyncio.sleep(self.throttle_retry.busy_wait(retry_after_s(response.headers.get("retry-after"))))
                continue
            return _json(_checked(response))
        raise ReplicateError("Replicate kept throttling")  # unreachable: the last 429 raises in _checked

    def _send_sync(self, method: str, path: str) -> httpx.Response:
        try:
            return self._http.sync.request(method, path)
        except httpx.HTTPError as exc:
            raise ReplicateError(f"Replicate unreachable: {exc!r}") from exc

    def close(self) -> None:
        self._http.close()

    async def aclose(self) -> None:
        await self._http.aclose()


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise ReplicateError(f"Replicate answered {response.status_code}: {response.text[:300]}")
    return response


def _json(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        raise ReplicateError(f"Replicate answered {response.status_code} with something that is not JSON: "
                             f"{response.text[:120]!r}") from None
    if not isinstance(body, dict):
        raise ReplicateError(f"Replicate answered {body!r:.120}")
    return body


def _prediction(body: dict) -> Prediction:
    try:
        return Prediction.model_validate(body)
    except ValidationError as exc:
        raise ReplicateError(f"Replicate answered something that is not a prediction: {body!r:.120}") from exc


def _id_of(prediction: Prediction) -> str:
    if not prediction.id:
        raise ReplicateError(f"Replicate answered a prediction without an id: {prediction!r:.120}")
    return prediction.id


def lora_like_inputs(properties: dict) -> list[str]:
    return sorted(name for name in properties if "lora" in name.lower())
