"""The errors the client raises, under one base, and the client's own reason codes.

`apply()` itself never raises for the LoRA step (its outcomes say why a clip kept its original
reference); these come out of the parts a caller may use on their own: a backend, the Replicate
client, the ledger.
"""

from __future__ import annotations

from enum import StrEnum


class ClientCode(StrEnum):
    """Reasons of the client's own, beside the service's `ErrorCode` values (a clip outcome's
    `reason` and `BackendError.code` are one or the other)."""

    LORA_NOT_READY = "lora_not_ready"
    NO_CHARACTER_REFERENCE = "no_character_reference"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    INVALID_ANSWER = "invalid_answer"
    DIRECT_FAILED = "direct_failed"  # the direct path failed; the clip was preprocessed instead
    IDENTITY_REJECTED = "identity_rejected"
    LEDGER_UNAVAILABLE = "ledger_unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"


class ClientError(Exception):
    """Base of every error `sdxl_lora_client` raises."""


class BackendError(ClientError):
    """A preprocessing backend's failure.

    `code` is the service's `ErrorCode` value when it answered with one, else a `ClientCode`
    (`backend_unavailable`: not reached; `invalid_answer`: a 200 that is no valid answer).
    `retryable` says whether the same request could succeed later; `retry_after_s` is the wait a
    `busy` answer asked for (None when it named none).
    """

    def __init__(self, message: str, code: str = ClientCode.BACKEND_UNAVAILABLE, retryable: bool = True,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.code = str(code)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class OptionsError(ClientError, ValueError):
    """Options outside the contract's limits, caught when they are built; `field` names the option."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ReplicateError(ClientError):
    """A Replicate API call failed: unreachable, an error status, a prediction that failed, or an
    answer that is not the JSON the API documents."""


class LedgerError(ClientError):
    """The ledger (`SqlStore`) could not do what was asked. `retryable`: the database was
    unreachable or dropped the connection (a restart, say), so the same call may succeed later."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable
