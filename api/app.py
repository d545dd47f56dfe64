"""The FastAPI service: POST /v1/generate plus health, readiness, metrics and the adapter cache.

The routes are thin: admission, the queue and the drain are in api/admission.py, what every request
passes through in api/middleware.py, and every error body is written by api/responses.py.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.admission import Admission, chain_signals
from api.check_page import add_check_page
from api.metrics import Metrics
from api.middleware import BodyLimit, RequestLog, bearer_check
from api.responses import error_response
from sdxl_lora_client.contract import (ErrorResponse, GenerateRequest, GenerateResponse, PrefetchRequest,
                                       PrefetchResponse)
from inference.backpressure import with_retry_after
from inference.errors import HTTP_STATUS, ErrorCode, RequestCancelled, ServiceError, validation_message
from inference.idempotency import KEY_PATTERN
from inference.settings import Settings

log = logging.getLogger("sdxl_lora.api")

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (422, 424, 429, 500, 502, 503, 504)}
# The largest body a valid request can have: the schema's cap on `image` (a data: URI) plus room for
# the rest. Anything larger is refused before it is read, so a huge body cannot exhaust memory.
MAX_BODY_BYTES = 65 * 1024**2


def create_app(settings: Settings | None = None, service=None, grace_s: float | None = None) -> FastAPI:
    """`service` may be given (tests); otherwise one is built and its pipeline loaded at startup.
    `grace_s` overrides the shutdown grace period (see api/admission.py)."""
    settings = settings or Settings()
    metrics = Metrics()
    admission = Admission(settings, service, metrics, settings.shutdown_grace_s if grace_s is None else grace_s)
    metrics.count_renders(lambda: admission.service.images_rendered if admission.service else 0)
    metrics.count_recompiles(lambda: admission.service.engine.recompiles
                             if admission.service and admission.service.engine else 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.api_key:
            log.warning("SDXL_LORA_API_KEY is not set: the API accepts requests WITHOUT authentication")
        admission.loop = asyncio.get_running_loop()
        previous = chain_signals(admission.begin_drain)
        threading.Thread(target=admission.load, name="pipeline-load", daemon=True).start()
        yield
        admission.begin_drain()  # a server stopped without a signal (tests, an embedding program)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Every request has been answered by now (uvicorn waits for them); a thread still busy is
        # a download abandoned at the end of the grace period, bounded by its own timeout.
        admission.executor.shutdown(wait=False, cancel_futures=True)

    # No /docs or /redoc: Swagger UI and ReDoc load their scripts from a CDN, onto the origin of the
    # check page, which keeps the API key in sessionStorage. /openapi.json stays.
    app = FastAPI(title="sdxl-lora-service", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="SDXL + LoRA character reference images. Errors: `{error: {code, message}}`.")
    app.state.admission = admission
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(RequestLog, metrics=metrics)  # outermost: sees every answer, BodyLimit's too
    _add_error_handlers(app, admission)
    _add_routes(app, admission, metrics, settings.api_key)
    add_check_page(app)
    return app


def _add_error_handlers(app: FastAPI, admission: Admission) -> None:
    """Every failure a route or FastAPI raises, answered in the contract's shape."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        if exc.code != ErrorCode.BUSY:
            return error_response(exc.code, exc.message, exc.http_status)
        retry_after = admission.retry_after_s()
        return error_response(exc.code, with_retry_after(exc.message, retry_after), exc.http_status,
                              headers={"retry-after": str(retry_after)})

    @app.exception_handler(RequestCancelled)
    async def cancelled(request: Request, exc: RequestCancelled):
        # Nobody reads this answer (the client is gone); 499, nginx's "client closed request",
        # keeps such requests apart in the logs and metrics.
        return error_response(ErrorCode.INTERNAL, str(exc), 499, headers={"x-error-code": "client_closed"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(ErrorCode.INVALID_REQUEST, validation_message(exc.errors()) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = ErrorCode.UNAUTHORIZED if exc.status_code in (401, 403) else (
            ErrorCode.INVALID_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL)
        # A body that cannot be parsed at all (FastAPI's 400) is an invalid request like any other: 422,
        # the status the contract gives invalid_request. 404, 405 and the like keep their own status.
        status = HTTP_STATUS[code] if exc.status_code == 400 else exc.status_code
        return error_response(code, str(exc.detail), status, headers=exc.headers)


def _add_routes(app: FastAPI, admission: Admission, metrics: Metrics, api_key: str | None) -> None:
    # Bearer auth only when a key is set: then OpenAPI advertises it, and a keyless dev server's
    # schema does not claim a security scheme it never checks.
    auth = [Depends(bearer_check(api_key))] if api_key else []
    auth_errors = {401: {"model": ErrorResponse}} if api_key else {}

    @app.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_none=True,
              responses={**ERROR_RESPONSES, **auth_errors}, dependencies=auth)
    async def generate(body: GenerateRequest, request: Request, response: Response,
                       idempotency_key: Annotated[str | None, Header(
                           alias="Idempotency-Key", pattern=KEY_PATTERN,
                           description="A repeat within IDEMPOTENCY_TTL_S gets the first answer, not a new render")] = None,
                       ) -> GenerateResponse:
        if idempotency_key is None:
            return await admission.run(body, request)
        answer, replayed = await admission.run_once(idempotency_key, body, request)
        if replayed:
            response.headers["idempotent-replayed"] = "true"
        return answer

    @app.post("/v1/loras/prefetch", response_model=PrefetchResponse, response_model_exclude_none=True,
              responses={**ERROR_RESPONSES, **auth_errors}, dependencies=auth)
    async def prefetch(body: PrefetchRequest) -> PrefetchResponse:
        return await admission.prefetch(body)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz():
        if admission.draining:
            return error_response(ErrorCode.BUSY, "shutting down", 503)
        if admission.load_error:
            return error_response(ErrorCode.INTERNAL, admission.load_error, 503)
        if not admission.service or not admission.service.ready:
            return error_response(ErrorCode.BUSY, "pipeline loading", 503)
        return {"status": "ready", **admission.service.status()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        if admission.service and admission.service.ready:
            metrics.resident_adapters.set(len(admission.service.engine.adapters.resident()))
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/adapters", dependencies=auth, responses={429: {"model": ErrorResponse}, **auth_errors})
    async def adapters() -> dict:
        if not admission.service:
            raise ServiceError(ErrorCode.BUSY, "the service is still starting")
        return admission.service.adapters()
