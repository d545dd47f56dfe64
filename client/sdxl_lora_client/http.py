"""httpx clients that work from any thread and any event loop.

An `httpx.AsyncClient` belongs to the event loop it first ran on: used from a second
`asyncio.run()` it fails with "Event loop is closed". `LoopClients` keeps one async client per
running loop (weakly keyed, so a finished loop's client goes with it) and one synchronous client
for threads. One client per loop rather than one per request: building a client builds an SSL
context (milliseconds each time) and a new client keeps no connections alive.
"""

from __future__ import annotations

import asyncio
import threading
import weakref

import httpx


class LoopClients:
    """A synchronous client, and an async client per event loop, all with the same options."""

    def __init__(self, transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None, **options):
        self._options = options
        self._async_transport = async_transport
        self.sync = httpx.Client(transport=transport, **options)
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    def current(self) -> httpx.AsyncClient:
        """The running loop's async client, opened on first use."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._by_loop.get(loop)
            if client is None or client.is_closed:
                client = self._by_loop[loop] = httpx.AsyncClient(transport=self._async_transport, **self._options)
            return client

    def close(self) -> None:
        """Close the synchronous client; async clients of other loops are dropped (their loops own
        their sockets), the running loop's is closed by `aclose`."""
        self.sync.close()

    async def aclose(self) -> None:
        """Close the running loop's async client."""
        with self._lock:
            client = self._by_loop.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
