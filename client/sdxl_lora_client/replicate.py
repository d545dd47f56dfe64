"""The few Replicate HTTP API calls the client makes: create a prediction, wait for it, read a
model's input schema. 429 is retried after Retry-After (the official client does not retry a
throttled prediction create)."""

from __future__ import annotations

import time

import httpx

TERMINAL = ("succeeded", "failed", "canceled")


class ReplicateError(Exception):
    pass


class ReplicateClient:
    def __init__(self, token: str, base_url: str = "https://api.replicate.com", timeout_s: float = 600.0,
                 poll_interval_s: float = 2.0, max_throttle_retries: int = 5, wait_s: int = 60):
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout_s, connect=10.0),
                                  headers={"authorization": f"Bearer {token}"})
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self.max_throttle_retries = max_throttle_retries
        self.wait_s = wait_s

    def run(self, model: str, inputs: dict) -> dict:
        """Create a prediction on `owner/name` (holding the connection up to `wait_s` with
        `Prefer: wait`), then poll until it ends. Returns the succeeded prediction."""
        prediction = self._request("POST", f"/v1/models/{model}/predictions", json={"input": inputs},
                                   headers={"prefer": f"wait={self.wait_s}"})
        deadline = time.monotonic() + self.timeout_s
        while prediction.get("status") not in TERMINAL:
            if time.monotonic() > deadline:
                raise ReplicateError(f"prediction {prediction.get('id')} still {prediction.get('status')}")
            time.sleep(self.poll_interval_s)
            prediction = self._request("GET", f"/v1/predictions/{prediction['id']}")
        if prediction["status"] != "succeeded":
            raise ReplicateError(f"prediction {prediction.get('id')} {prediction['status']}: {prediction.get('error')}")
        return prediction

    def input_schema(self, model: str) -> dict:
        """The model's latest version's Input schema properties."""
        body = self._request("GET", f"/v1/models/{model}")
        schema = (body.get("latest_version") or {}).get("openapi_schema") or {}
        return schema.get("components", {}).get("schemas", {}).get("Input", {}).get("properties", {})

    def _request(self, method: str, path: str, **kwargs) -> dict:
        for attempt in range(self.max_throttle_retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                raise ReplicateError(f"Replicate unreachable: {exc}") from exc
            if response.status_code == 429 and attempt < self.max_throttle_retries:
                time.sleep(_retry_after_s(response))
                continue
            if response.status_code >= 400:
                raise ReplicateError(f"Replicate answered {response.status_code}: {response.text[:300]}")
            return response.json()
        raise ReplicateError("Replicate kept throttling")  # unreachable: the last 429 raises above

    def close(self) -> None:
        self._http.close()


def _retry_after_s(response: httpx.Response) -> float:
    try:
        return min(60.0, max(0.0, float(response.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


def lora_like_inputs(properties: dict) -> list[str]:
    return sorted(name for name in properties if "lora" in name.lower())
