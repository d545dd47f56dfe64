"""What the applicator needs of a preprocessing backend, as typed protocols.

`ServiceBackend`, `RunPodBackend` and `testing.ScriptedBackend` are `PreprocessingBackend`s (the
coroutines `agenerate` and `aprefetch`). A backend of the caller's with only a blocking `generate`
(a `SyncPreprocessingBackend`) is run in the applicator's threads by `ThreadedBackend`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from functools import partial
from typing import Protocol, runtime_checkable

from sdxl_lora_client.contract import GenerateRequest, GenerateResponse, PrefetchRequest, PrefetchResponse
from sdxl_lora_client.errors import BackendError, ClientCode

__all__ = ["PreprocessingBackend", "SyncPreprocessingBackend", "ThreadedBackend", "as_backend"]


@runtime_checkable
class PreprocessingBackend(Protocol):
    """Renders an enhanced reference (`agenerate`) and caches LoRAs ahead of a job (`aprefetch`);
    raises `BackendError` for a failure. `idempotency_key`: replays of one clip share one render."""

    async def agenerate(self, request: GenerateRequest,
                        idempotency_key: str | None = None) -> GenerateResponse: ...

    async def aprefetch(self, request: PrefetchRequest) -> PrefetchResponse: ...


@runtime_checkable
class SyncPreprocessingBackend(Protocol):
    """A blocking backend; the applicator calls it from its own threads."""

    def generate(self, request: GenerateRequest, idempotency_key: str | None = None) -> GenerateResponse: ...


@runtime_checkable
class SyncPrefetching(Protocol):
    def prefetch(self, request: PrefetchRequest) -> PrefetchResponse: ...


@runtime_checkable
class AsyncClosing(Protocol):
    async def aclose(self) -> None: ...


@runtime_checkable
class Closing(Protocol):
    def close(self) -> None: ...


class ThreadedBackend:
    """A `SyncPreprocessingBackend` as a `PreprocessingBackend`: each call in one of `threads`."""

    def __init__(self, backend: SyncPreprocessingBackend, threads: concurrent.futures.Executor):
        self.backend = backend
        self.threads = threads

    async def agenerate(self, request: GenerateRequest, idempotency_key: str | None = None) -> GenerateResponse:
        call = partial(self.backend.generate, request, idempotency_key)
        return await asyncio.get_running_loop().run_in_executor(self.threads, call)

    async def aprefetch(self, request: PrefetchRequest) -> PrefetchResponse:
        if not isinstance(self.backend, SyncPrefetching):
            raise BackendError("the preprocessing backend cannot prefetch", ClientCode.BACKEND_UNAVAILABLE, False)
        return await asyncio.get_running_loop().run_in_executor(self.threads, self.backend.prefetch, request)


def as_backend(backend: object, threads: concurrent.futures.Executor) -> PreprocessingBackend | None:
    """`backend` as the coroutine protocol the applicator awaits; None for None."""
    if backend is None or isinstance(backend, PreprocessingBackend):
        return backend
    if isinstance(backend, SyncPreprocessingBackend):
        return ThreadedBackend(backend, threads)
    raise TypeError(f"preprocessing must be a PreprocessingBackend (agenerate, aprefetch) or have a blocking "
                    f"generate(request, idempotency_key=None); got {type(backend).__name__}")


async def aclose_clients(*clients: object) -> None:
    """Close each client's connections of the running loop, where it has any."""
    for client in clients:
        if isinstance(client, ThreadedBackend):
            client = client.backend
        if isinstance(client, AsyncClosing):
            await client.aclose()


def close_clients(*clients: object) -> None:
    """Close each client's connections of threads' calls, where it has any."""
    for client in clients:
        if isinstance(client, ThreadedBackend):
            client = client.backend
        if isinstance(client, Closing):
            client.close()
