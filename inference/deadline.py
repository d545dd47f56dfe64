"""A point in time that several steps share: a whole request's deadline (REQUEST_TIMEOUT_S), or
one download's. On the monotonic clock, so wall-clock jumps move nothing."""

from __future__ import annotations

import time

from inference.errors import ErrorCode, ServiceError


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0


def timed_out(deadline: Deadline, where: str = "") -> ServiceError:
    """The `timeout` answer of a request that ran past `deadline` (`where`: at which point)."""
    return ServiceError(ErrorCode.TIMEOUT, f"the request ran past its {deadline.seconds:g} s deadline "
                        f"(SDXL_LORA_REQUEST_TIMEOUT_S){' ' + where if where else ''}")
