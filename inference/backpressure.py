"""How long a caller answered `busy` should wait before trying again (its Retry-After).

The estimate is the time the pipeline needs for the requests already in flight: a moving average
of how long one request holds the pipeline, times the requests in flight, over the pipelines that
serve them. A client that retries at a random point within it (full jitter) spreads its retries
over the time the queue takes to drain, instead of all retrying at once.
"""

from __future__ import annotations

import math
import threading

# The wire phrase a busy message ends with is the contract's (the client reads it there).
from sdxl_lora_client.contract import RETRY_AFTER_MESSAGE, with_retry_after

__all__ = ["DEFAULT_SERVICE_S", "RETRY_AFTER_MESSAGE", "ServiceTimes", "with_retry_after"]
DEFAULT_SERVICE_S = 5.0  # before the first request: about one SDXL image on a GPU
WEIGHT = 0.2  # of the newest service time in the moving average


class ServiceTimes:
    """An exponentially weighted moving average of the time one request holds the pipeline."""

    def __init__(self, initial_s: float = DEFAULT_SERVICE_S):
        self.seconds = initial_s
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.seconds += WEIGHT * (seconds - self.seconds)

    def retry_after_s(self, in_flight: int, workers: int = 1) -> int:
        """Whole seconds, at least 1: the time `in_flight` requests (at least one) keep `workers` busy."""
        return max(1, math.ceil(self.seconds * max(1, in_flight) / workers))

