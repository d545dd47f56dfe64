"""Admission control and drain: which requests run, wait or are answered `busy`, in which worker
thread, and what happens to them at shutdown.

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
import logging
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

from fastapi import Request

from api.metrics import Metrics
from sdxl_lora_client.contract import GenerateRequest, GenerateResponse, PrefetchRequest, PrefetchResponse
from inference.backpressure import ServiceTimes
from inference.deadline import Deadline, timed_out
from inference.errors import ErrorCode, RequestCancelled, ServiceError
from inference.idempotency import Claim, still_running
from inference.idempotency_stores import store_from_settings
from inference.settings import Settings

log = logging.getLogger("sdxl_lora.api")

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DISCONNECT_POLL_S = 0.2  # how often a running request looks whether its client is still there
DEADLINE_SLACK_S = 2.0  # past the deadline, how long the app waits for the generation to stop itself


def chain_signals(on_signal) -> dict:
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


class Ticket:
    """One admitted request: its deadline, whether it holds the pipeline's turn or was answered busy
    while waiting, and the event that stops it when its client hangs up."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline
        self.cancel = threading.Event()
        self.lock = threading.Lock()
        self.started = False
        self.abandoned = False


class Admission:
    """Admission control (the queue, the pipeline's turn), the worker threads that run requests, and
    the drain at shutdown. The app holds one; its routes hand it their requests."""

    def __init__(self, settings: Settings, service, metrics: Metrics, grace_s: float):
        self.settings = settings
        self.service = service
        self.metrics = metrics
        self.load_error: str | None = None
        self.in_flight = 0  # running + waiting; touched only on the event loop
        self.executor = ThreadPoolExecutor(max_workers=settings.queue_max + 1, thread_name_prefix="generate")
        self._recent_seconds = 5.0
        self.service_times = ServiceTimes()  # how long a request holds the pipeline: Retry-After
        self.idempotency = store_from_settings(settings)
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
                raise still_running(claim.key)
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
        ticket = Ticket(deadline)
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

    async def _watch(self, future, ticket: Ticket, request: Request) -> None:
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

    def _generate(self, body: GenerateRequest, ticket: Ticket) -> GenerateResponse:
        """In a worker thread: the service's whole request, holding the pipeline's turn while it renders."""
        return self.service.generate(body, deadline=ticket.deadline, cancel=ticket.cancel,
                                     render_turn=partial(self._render_turn, ticket))

    @contextmanager
    def _render_turn(self, ticket: Ticket) -> Iterator[None]:
        """Held from the LoRAs being ready to the images being made: its length is the service time
        Retry-After is judged from."""
        self._take_turn(ticket)
        held_since = time.perf_counter()
        try:
            yield
        finally:
            self.service_times.observe(time.perf_counter() - held_since)
            self.turn.release()

    def _take_turn(self, ticket: Ticket) -> None:
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
