"""The one exception that carries a contract error code (the codes live in the wire contract).

Every failure the service answers is a ServiceError; anything else is reported as `internal`.
"""

from sdxl_lora_client.contract import HTTP_STATUS, ErrorCode

__all__ = ["HTTP_STATUS", "ErrorCode", "RequestCancelled", "ServiceError"]


class ServiceError(Exception):
    """A failure with a contract error code; the message is safe to show the caller."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.lora = None  # the LoRA file at fault, when the adapter cache knows it (the service evicts it)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_dict(self) -> dict:
        return {"code": self.code.value, "message": self.message}

    def __repr__(self) -> str:
        return f"ServiceError({self.code.value!r}, {self.message!r})"


class RequestCancelled(Exception):
    """The caller went away (a client hung up): the work stopped and nobody waits for an answer."""
