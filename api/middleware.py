"""What every HTTP request passes through before a route: the request log and metrics, the body
size limit, and the bearer check (a FastAPI dependency).

Plain ASGI middlewares, not Starlette's BaseHTTPMiddleware: that one hides the client's disconnect
from the endpoint, and a request whose client hung up must stop its generation.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import uuid

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.metrics import Metrics
from api.responses import error_response
from inference.errors import ErrorCode, ServiceError

log = logging.getLogger("sdxl_lora.api")

# A caller's X-Request-Id is echoed and logged only when it is printable ASCII (as an Idempotency-Key
# must be); anything else (a control character or obs-text a lenient parser let through) gets a new id.
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")


class RequestLog:
    """A request id, one JSON log line and the request metrics per HTTP request; an exception no
    handler answered becomes the contract's `internal` 500."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id") or ""
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        answer = {"status": 500, "code": "internal", "sent": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                answer.update(status=message["status"], code=headers.get("x-error-code", ""), sent=True)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # past every handler: answer it in the contract anyway
            log.exception("unhandled error in %r", scope.get("path"))
            if not answer["sent"]:
                await error_response(ErrorCode.INTERNAL, "internal error")(scope, receive, send_with_id)
        finally:
            self._record(scope, request_id, answer, time.perf_counter() - started)

    def _record(self, scope, request_id: str, answer: dict, elapsed: float) -> None:
        route = scope.get("route")
        path = route.path if route is not None else "unmatched"
        self.metrics.requests.labels(route=path, status=str(answer["status"]), code=answer["code"]).inc()
        self.metrics.latency.labels(route=path).observe(elapsed)
        log.info(json.dumps({"request_id": request_id, "method": scope.get("method"), "path": scope.get("path"),
                             "status": answer["status"], "error": answer["code"] or None,
                             "ms": round(elapsed * 1e3, 1)}))


class BodyLimit:
    """A request body larger than `limit` is refused as invalid_request (422).

    A declared Content-Length over the limit is answered before any of the body is read; a body
    without one (chunked) is cut off once it passes the limit, with the same answer: an
    HTTPException, which FastAPI lets through its body parsing (anything else there becomes
    "There was an error parsing the body").
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit
        self.message = f"the request body is larger than the {limit} bytes allowed"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = error_response(ErrorCode.INVALID_REQUEST, self.message, headers={"connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise StarletteHTTPException(422, self.message, headers={"connection": "close"})
            return message

        await self.app(scope, limited, send)


def bearer_check(api_key: str):
    """A dependency that refuses a request without `Authorization: Bearer <api_key>` (constant time)."""
    bearer = HTTPBearer(auto_error=False)

    def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ServiceError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")

    return require_api_key
