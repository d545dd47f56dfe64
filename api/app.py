"""The FastAPI service: POST /v1/generate plus health, readiness, metrics and the adapter cache.

Generation runs off the event loop; the engine's lock makes it one at a time per GPU, while LoRA
downloads of queued requests proceed in parallel. At most QUEUE_MAX requests wait; beyond that
the answer is 429 `busy` with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.metrics import Metrics
from api.schema import ErrorResponse, GenerateRequest, GenerateResponse
from inference.errors import ErrorCode, ServiceError
from inference.settings import Settings

log = logging.getLogger("sdxl_lora.api")

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (401, 422, 424, 429, 500, 502, 503)}


def create_app(settings: Settings | None = None, service=None) -> FastAPI:
    """`service` may be given (tests); otherwise one is built and its pipeline loaded at startup."""
    settings = settings or Settings()
    metrics = Metrics()
    state = _State(settings, service, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.api_key:
            log.warning("SDXL_LORA_API_KEY is not set: the API accepts requests WITHOUT authentication")
        threading.Thread(target=state.load, name="pipeline-load", daemon=True).start()
        yield
        state.executor.shutdown(wait=True, cancel_futures=False)

    app = FastAPI(title="sdxl-lora-service", version="0.1.0", lifespan=lifespan,
                  description="SDXL + LoRA character reference images. Errors: `{error: {code, message}}`.")
    app.state.service_state = state
    bearer = HTTPBearer(auto_error=False)

    def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not settings.api_key:
            return
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise ServiceError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")

    @app.middleware("http")
    async def request_log(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # reaches here past the handlers: answer it in the contract anyway
            log.exception("unhandled error in %s", request.url.path)
            response = JSONResponse({"error": {"code": "internal", "message": "internal error"}},
                                    status_code=500, headers={"x-error-code": "internal"})
        elapsed = time.perf_counter() - started
        route = request.scope.get("route")
        path = route.path if route is not None else "unmatched"
        code = response.headers.get("x-error-code", "")
        metrics.requests.labels(route=path, status=str(response.status_code), code=code).inc()
        metrics.latency.labels(route=path).observe(elapsed)
        response.headers["x-request-id"] = request_id
        log.info(json.dumps({"request_id": request_id, "method": request.method, "path": request.url.path,
                             "status": response.status_code, "error": code or None, "ms": round(elapsed * 1e3, 1)}))
        return response

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        headers = {"x-error-code": exc.code.value}
        if exc.code == ErrorCode.BUSY:
            headers["retry-after"] = str(state.retry_after_s())
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                             for e in exc.errors())
        return await service_error(request, ServiceError(ErrorCode.INVALID_REQUEST, problems or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = ErrorCode.UNAUTHORIZED if exc.status_code in (401, 403) else (
            ErrorCode.INVALID_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL)
        return JSONResponse({"error": {"code": code.value, "message": str(exc.detail)}},
                            status_code=exc.status_code, headers={"x-error-code": code.value})

    @app.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_none=True,
              responses=ERROR_RESPONSES, dependencies=[Depends(require_api_key)])
    async def generate(body: GenerateRequest) -> GenerateResponse:
        return await state.run(body)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz():
        if state.load_error:
            return JSONResponse({"error": {"code": "internal", "message": state.load_error}}, status_code=503)
        if not state.service or not state.service.ready:
            return JSONResponse({"error": {"code": "busy", "message": "pipeline loading"}}, status_code=503)
        return {"status": "ready", "model": state.service.model_info().model_dump()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        if state.service and state.service.ready:
            metrics.resident_adapters.set(len(state.service.engine.adapters.resident()))
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/adapters", dependencies=[Depends(require_api_key)])
    async def adapters() -> dict:
        if not state.service:
            raise ServiceError(ErrorCode.BUSY, "the service is still starting")
        return state.service.adapters()

    return app


class _State:
    """Admission control and the worker threads that run requests."""

    def __init__(self, settings: Settings, service, metrics: Metrics):
        self.settings = settings
        self.service = service
        self.metrics = metrics
        self.load_error: str | None = None
        self.in_flight = 0  # running + waiting; touched only on the event loop
        self.executor = ThreadPoolExecutor(max_workers=settings.queue_max + 1, thread_name_prefix="generate")
        self._recent_seconds = 5.0

    def load(self) -> None:
        try:
            if self.service is None:
                from inference.service import InferenceService

                self.service = InferenceService(self.settings)
            self.service.load()
        except Exception as exc:  # keep serving /healthz and say why /readyz is failing
            log.exception("pipeline failed to load")
            self.load_error = f"pipeline failed to load: {exc}"

    def retry_after_s(self) -> int:
        return max(1, round(self._recent_seconds))

    async def run(self, body: GenerateRequest) -> GenerateResponse:
        if self.service is None or not self.service.ready:
            raise ServiceError(ErrorCode.BUSY, "the pipeline is still loading")
        if self.in_flight >= self.settings.queue_max + 1:
            raise ServiceError(ErrorCode.BUSY, f"queue full ({self.settings.queue_max} waiting)")
        self.in_flight += 1
        self.metrics.queue_depth.set(max(0, self.in_flight - 1))
        try:
            loop = asyncio.get_running_loop()
            response = await loop.run_in_executor(self.executor, self.service.generate, body)
        finally:
            self.in_flight -= 1
            self.metrics.queue_depth.set(max(0, self.in_flight - 1))
        self.metrics.observe(response)
        self._recent_seconds = 0.8 * self._recent_seconds + 0.2 * response.timings_ms.total / 1e3
        return response
