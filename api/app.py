"""The FastAPI service: POST /v1/generate plus health, readiness, metrics and the adapter cache.

Generation runs off the event loop; the engine's lock makes it one at a time per GPU, while LoRA
downloads of queued requests proceed in parallel. At most QUEUE_MAX requests wait; beyond that
the answer is 429 `busy` with Retry-After.

Shutdown (SIGTERM or SIGINT, as a platform stops a container): the app starts draining at once,
before uvicorn stops accepting and waits for open requests. While draining, a new request is
answered `busy` and /readyz is 503; the generation running finishes; a queued request still runs
if it can finish within the grace period (SDXL_LORA_SHUTDOWN_GRACE_S, default 20 s, judged from
recent request times), and is answered `busy` otherwise, at the latest when the grace period
ends. So every request gets an answer, and the process exits within the grace period plus one
generation (a LoRA download under way when the grace period ends is abandoned to its own timeout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.check_page import add_check_page
from api.metrics import Metrics
from sdxl_lora_client.contract import (ErrorResponse, GenerateRequest, GenerateResponse, PrefetchRequest,
                                       PrefetchResponse)
from inference.backpressure import ServiceTimes, with_retry_after
from inference.deadline import Deadline, timed_out
from inference.errors import HTTP_STATUS, ErrorCode, RequestCancelled, ServiceError
from inference.idempotency import KEY_PATTERN, WAITING, Claim, IdempotencyStore
from inference.settings import Settings

log = logging.getLogger("sdxl_lora.api")

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (422, 424, 429, 500, 502, 503, 504)}
# The largest body a valid request can have: the schema's cap on `image` (a data: URI) plus room for
# the rest. Anything larger is refused before it is read, so a huge body cannot exhaust memory.
MAX_BODY_BYTES = 65 * 1024**2
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DISCONNECT_POLL_S = 0.2  # how often a running request looks whether its client is still there
DEADLINE_SLACK_S = 2.0  # past the deadline, how long the app waits for the generation to stop itself


def create_app(settings: Settings | None = None, service=None, grace_s: float | None = None) -> FastAPI:
    """`service` may be given (tests); otherwise one is built and its pipeline loaded at startup.
    `grace_s` overrides the shutdown grace period (see the module docstring)."""
    settings = settings or Settings()
    metrics = Metrics()
    state = _State(settings, service, metrics, settings.shutdown_grace_s if grace_s is None else grace_s)
    metrics.count_renders(lambda: state.service.images_rendered if state.service else 0)
    metrics.count_recompiles(lambda: state.service.engine.recompiles if state.service and state.service.engine else 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.api_key:
            log.warning("SDXL_LORA_API_KEY is not set: the API accepts requests WITHOUT authentication")
        state.loop = asyncio.get_running_loop()
        previous = _chain_signals(state.begin_drain)
        threading.Thread(target=state.load, name="pipeline-load", daemon=True).start()
        yield
        state.begin_drain()  # a server stopped without a signal (tests, an embedding program)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Every request has been answered by now (uvicorn waits for them); a thread still busy is
        # a download abandoned at the end of the grace period, bounded by its own timeout.
        state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="sdxl-lora-service", version="0.1.0", lifespan=lifespan,
                  description="SDXL + LoRA character reference images. Errors: `{error: {code, message}}`.")
    app.state.service_state = state
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    # Bearer auth only when a key is set: then OpenAPI advertises it, and a keyless dev server's
    # schema does not claim a security scheme it never checks.
    auth = [Depends(_bearer_check(settings.api_key))] if settings.api_key else []
    auth_errors = {401: {"model": ErrorResponse}} if settings.api_key else {}

    app.add_middleware(RequestLog, metrics=metrics)  # outermost: sees every answer, BodyLimit's too

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        headers = {"x-error-code": exc.code.value}
        error = exc.to_dict()
        if exc.code == ErrorCode.BUSY:
            retry_after = state.retry_after_s()
            headers["retry-after"] = str(retry_after)
            error["message"] = with_retry_after(exc.message, retry_after)
        return JSONResponse({"error": error}, status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestCancelled)
    async def cancelled(request: Request, exc: RequestCancelled):
        # Nobody reads this answer (the client is gone); 499, nginx's "client closed request",
        # keeps such requests apart in the logs and metrics.
        return JSONResponse({"error": {"code": "internal", "message": str(exc)}}, status_code=499,
                            headers={"x-error-code": "client_closed"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                             for e in exc.errors())
        return await service_error(request, ServiceError(ErrorCode.INVALID_REQUEST, problems or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = ErrorCode.UNAUTHORIZED if exc.status_code in (401, 403) else (
            ErrorCode.INVALID_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL)
        # A body that cannot be parsed at all (FastAPI's 400) is an invalid request like any other: 422,
        # the status the contract gives invalid_request. 404, 405 and the like keep their own status.
        status = HTTP_STATUS[code] if exc.status_code == 400 else exc.status_code
        return JSONResponse({"error": {"code": code.value, "message": str(exc.detail)}},
                            status_code=status, headers={"x-error-code": code.value, **(exc.headers or {})})

    @app.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_none=True,
              responses={**ERROR_RESPONSES, **auth_errors}, dependencies=auth)
    async def generate(body: GenerateRequest, request: Request, response: Response,
                       idempotency_key: Annotated[str | None, Header(
                           alias="Idempotency-Key", pattern=KEY_PATTERN,
                           description="A repeat within IDEMPOTENCY_TTL_S gets the first answer, not a new render")] = None,
                       ) -> GenerateResponse:
        if idempotency_key is None:
            return await state.run(body, request)
        answer, replayed = await state.run_once(idempotency_key, body, request)
        if replayed:
            response.headers["idempotent-replayed"] = "true"
        return answer

    @app.post("/v1/loras/prefetch", response_model=PrefetchResponse, response_model_exclude_none=True,
              responses={**ERROR_RESPONSES, **auth_errors}, dependencies=auth)
    async def prefetch(body: PrefetchRequest) -> PrefetchResponse:
        return await state.prefetch(body)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz():
        if state.draining:
            return JSONResponse({"error": {"code": "busy", "message": "shutting down"}}, status_code=503)
        if state.load_error:
            return JSONResponse({"error": {"code": "internal", "message": state.load_error}}, status_code=503)
        if not state.service or not state.service.ready:
            return JSONResponse({"error": {"code": "busy", "message": "pipeline loading"}}, status_code=503)
        return {"status": "ready", **state.service.status()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        if state.service and state.service.ready:
            metrics.resident_adapters.set(len(state.service.engine.adapters.resident()))
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/adapters", dependencies=auth, responses={429: {"model": ErrorResponse}, **auth_errors})
    async def adapters() -> dict:
        if not state.service:
            raise ServiceError(ErrorCode.BUSY, "the service is still starting")
        return state.service.adapters()

    add_check_page(app)
    return app


class RequestLog:
    """ASGI middleware: a request id, one JSON log line and the request metrics per HTTP request; an
    exception no handler answered becomes the contract's `internal` 500.

    Plain ASGI, not Starlette's BaseHTTPMiddleware: that one hides the client's disconnect from the
    endpoint, and a request whose client hung up must stop its generation.
    """

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex[:16]
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
                response = JSONResponse({"error": {"code": "internal", "message": "internal error"}}, status_code=500,
                                        headers={"x-error-code": "internal"})
                await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(route=path, status=str(answer["status"]), code=answer["code"]).inc()
            self.metrics.latency.labels(route=path).observe(elapsed)
            log.info(json.dumps({"request_id": request_id, "method": scope.get("method"), "path": scope.get("path"),
                                 "status": answer["status"], "error": answer["code"] or None,
                                 "ms": round(elapsed * 1e3, 1)}))


def _bearer_check(api_key: str):
    """A dependency that refuses a request without `Authorization: Bearer <api_key>` (constant time)."""
    bearer = HTTPBearer(auto_error=False)

    def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ServiceError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")

    return require_api_key


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` is refused as invalid_request (422).

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
            response = JSONResponse({"error": {"code": "invalid_request", "message": self.message}}, status_code=422,
                                    headers={"x-error-code": "invalid_request", "connection": "close"})
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


def _chain_signals(on_signal) -> dict:
    """Call `on_signal()` first on SIGTERM/SIGINT, then whatever handled them before (uvicorn's
    handler, which stops accepting and waits for open requests). Returns the handlers replaced.

    Signal handlers can only be set from the main thread: elsewhere (a server in a thread) nothing
    is chained and the lifespan's shutdown starts the drain instead.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in DRAIN_SIGNALS:
        before = signal.getsignal(sig)
        if before is None or before == signal.SIG_IGN:  # set outside Python, or ignored: leave it be
            continue

        def handler(signum, frame, before=before):
            on_signal()
            if callable(before):
                before(signum, frame)
            elif before == signal.SIG_DFL:  # nobody else handles it: do what the default would
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        previous[sig] = before
        signal.signal(sig, handler)
    return previous


class _Ticket:
    """One admitted request: its deadline, whether it holds the pipeline's turn or was answered busy
    while waiting, and the event that stops it when its client hangs up."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline
        self.cancel = threading.Event()
        self.lock = threading.Lock()
        self.started = False
        self.abandoned = False


class _State:
    """Admission control, the worker threads that run requests, and the drain at shutdown."""

    def __init__(self, settings: Settings, service, metrics: Metrics, grace_s: float):
        self.settings = settings
        self.service = service
        self.metrics = metrics
        self.load_error: str | None = None
        self.in_flight = 0  # running + waiting; touched only on the event loop
        self.executor = ThreadPoolExecutor(max_workers=settings.queue_max + 1, thread_name_prefix="generate")
        self._recent_seconds = 5.0
        self.service_times = ServiceTimes()  # how long a request holds the pipeline: Retry-After
        self.idempotency = IdempotencyStore.from_settings(settings)
        self.grace_s = grace_s
        self.draining = False
        self.drain_deadline = float("inf")  # time.monotonic() at which waiting requests are answered busy
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_over: asyncio.Event | None = None  # set on the loop when the grace period ends
        # The pipeline's turn, taken after a request's LoRAs are fetched and held while it generates:
        # it mirrors the engine's lock, so the app knows which requests are still only waiting.
        self.turn = threading.Lock()

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
        return self.service_times.retry_after_s(self.in_flight)

    # -- shutdown ------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop admitting; waiting requests run only while the grace period allows. Idempotent;
        safe from a signal handler (it only sets fields and schedules work on the loop)."""
        if self.draining:
            return
        self.drain_deadline = time.monotonic() + self.grace_s
        self.draining = True
        log.log(logging.WARNING if self.in_flight else logging.INFO,
                "shutting down: %d request(s) in flight, %.0f s grace", self.in_flight, self.grace_s)
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._arm_drain_timer)
            except RuntimeError:  # the loop stopped meanwhile
                pass

    def _arm_drain_timer(self) -> None:
        event = self._drain_event()
        self.loop.call_later(max(0.0, self.drain_deadline - time.monotonic()), event.set)

    def _drain_event(self) -> asyncio.Event:
        if self._drain_over is None:
            self._drain_over = asyncio.Event()
        return self._drain_over

    def _too_late_to_start(self) -> bool:
        """While draining: would a request started now run past the grace period?"""
        return self.draining and time.monotonic() + self._recent_seconds > self.drain_deadline

    # -- one request ---------------------------------------------------------------------------

    async def run_once(self, key: str, body: GenerateRequest, request: Request) -> tuple[GenerateResponse, bool]:
        """`run` for a request with an idempotency key: the answer, and whether it is a replay (the
        first request's with this key, kept or waited for without a place in the queue)."""
        deadline = Deadline(self.settings.request_timeout_s)
        while True:
            claim = self.idempotency.claim(key, body)
            if claim.first:
                try:
                    answer = await self.run(body, request, deadline)
                except BaseException:
                    self.idempotency.drop(claim)
                    raise
                self.idempotency.keep(claim, answer)
                return answer, False
            kept = await self._wait_for_first(claim, request, deadline)
            if kept is not None:
                return kept, True

    async def _wait_for_first(self, claim: Claim, request: Request, deadline: Deadline) -> GenerateResponse | None:
        """The answer of the first request with the claim's key, or None when it failed. Watches this
        request's client and deadline meanwhile, as `_watch` does for a running one."""
        outcome = asyncio.wrap_future(claim.outcome)  # never cancelled: other requests wait on the same
        while not outcome.done():
            await asyncio.wait({outcome}, timeout=DISCONNECT_POLL_S)
            if outcome.done():
                break
            if await request.is_disconnected():
                raise RequestCancelled("the client hung up")
            if deadline.expired:
                raise timed_out(deadline, WAITING)
        return outcome.result()

    async def run(self, body: GenerateRequest, request: Request, deadline: Deadline | None = None) -> GenerateResponse:
        # From arrival: waiting for the GPU counts.
        deadline = deadline or Deadline(self.settings.request_timeout_s)
        if self.draining:
            raise ServiceError(ErrorCode.BUSY, "the service is shutting down")
        if self.service is None or not self.service.ready:
            raise ServiceError(ErrorCode.BUSY, "the pipeline is still loading")
        if self.in_flight >= self.settings.queue_max + 1:
            raise ServiceError(ErrorCode.BUSY, f"queue full ({self.settings.queue_max} waiting)")
        self.in_flight += 1
        self.metrics.queue_depth.set(max(0, self.in_flight - 1))
        ticket = _Ticket(deadline)
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, self._generate, body, ticket)
            await self._watch(future, ticket, request)
            response = await future
        except RequestCancelled:
            self.metrics.interrupted.labels(reason="disconnect").inc()
            raise
        except ServiceError as exc:
            if exc.code == ErrorCode.TIMEOUT:
                self.metrics.interrupted.labels(reason="timeout").inc()
            raise
        finally:
            self.in_flight -= 1
            self.metrics.queue_depth.set(max(0, self.in_flight - 1))
        self.metrics.observe(response)
        self._recent_seconds = 0.8 * self._recent_seconds + 0.2 * response.timings_ms.total / 1e3
        return response

    async def prefetch(self, body: PrefetchRequest) -> PrefetchResponse:
        """Beside the generation queue: a prefetch never waits for the pipeline nor takes a request's
        place in the queue, and runs while the pipeline is still loading (into the disk cache)."""
        if self.draining:
            raise ServiceError(ErrorCode.BUSY, "the service is shutting down")
        if self.service is None:
            raise ServiceError(ErrorCode.BUSY, "the service is still starting")
        deadline = Deadline(self.settings.request_timeout_s)
        return await asyncio.to_thread(self.service.prefetch, body, deadline)

    async def _watch(self, future, ticket: _Ticket, request: Request) -> None:
        """Wait for `future` while watching the client, the deadline and the drain.

        A client that hangs up cancels its request (the generation stops at its next step); past
        the deadline plus a little slack (the thread stops itself at the deadline, this is for a
        step that never ends) the answer is `timeout`; when the drain's grace period ends, a request
        still only waiting is answered `busy`.
        """
        drain_over = asyncio.ensure_future(self._drain_event().wait())
        waiting = {future, drain_over}
        try:
            while not future.done():
                await asyncio.wait(waiting, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_COMPLETED)
                if future.done():
                    return
                if await request.is_disconnected():
                    ticket.cancel.set()
                    future.add_done_callback(_discard)
                    raise RequestCancelled("the client hung up")
                if ticket.deadline.remaining() < -DEADLINE_SLACK_S:
                    ticket.cancel.set()
                    future.add_done_callback(_discard)
                    raise timed_out(ticket.deadline)
                if drain_over.done():
                    with ticket.lock:
                        if not ticket.started:
                            ticket.abandoned = True
                    if ticket.abandoned:
                        future.add_done_callback(_discard)  # the thread sees `abandoned` and stops before generating
                        raise ServiceError(ErrorCode.BUSY, "the service is shutting down")
                    # Started: it runs to its end. Waiting on the finished drain event again would return
                    # at once and spin this loop, starving the generating thread of the GIL (a running
                    # request took ~7x its time during a drain).
                    waiting = {future}
        finally:
            drain_over.cancel()

    def _generate(self, body: GenerateRequest, ticket: _Ticket) -> GenerateResponse:
        """In a worker thread: the service's whole request, taking the pipeline's turn once the LoRAs
        are fetched (its "generate" phase) and giving it back when the images are made ("encode")."""
        held_since: float | None = None

        def progress(phase: str) -> None:
            nonlocal held_since
            if phase == "generate" and held_since is None:
                self._take_turn(ticket)
                held_since = time.perf_counter()
            elif phase != "generate" and held_since is not None:
                self._give_turn(held_since)
                held_since = None

        try:
            return self.service.generate(body, progress=progress, deadline=ticket.deadline, cancel=ticket.cancel)
        finally:
            if held_since is not None:
                self._give_turn(held_since)

    def _give_turn(self, held_since: float) -> None:
        self.service_times.observe(time.perf_counter() - held_since)
        self.turn.release()

    def _take_turn(self, ticket: _Ticket) -> None:
        while True:
            if ticket.abandoned or self._too_late_to_start():
                raise ServiceError(ErrorCode.BUSY, "the service is shutting down")
            if ticket.cancel.is_set():
                raise RequestCancelled("the client hung up while the request waited for the pipeline")
            if ticket.deadline.expired:
                raise timed_out(ticket.deadline, "while waiting for the pipeline")
            if self.turn.acquire(timeout=0.05):
                break
        with ticket.lock:
            if not ticket.abandoned and not self._too_late_to_start():
                ticket.started = True
                return
        self.turn.release()
        raise ServiceError(ErrorCode.BUSY, "the service is shutting down")


def _discard(future) -> None:
    """Collect the result of a request already answered busy, so its exception is not reported."""
    if not future.cancelled():
        future.exception()
