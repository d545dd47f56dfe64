"""The error codes of the contract (DESIGN.md) and the one exception that carries them.

Every failure the service answers is a ServiceError; anything else is reported as `internal`.
"""

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    LORA_DOWNLOAD_FAILED = "lora_download_failed"
    LORA_INVALID = "lora_invalid"
    LORA_INCOMPATIBLE = "lora_incompatible"
    IMAGE_INVALID = "image_invalid"
    BUSY = "busy"
    OUT_OF_MEMORY = "out_of_memory"
    UPLOAD_FAILED = "upload_failed"
    INTERNAL = "internal"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.LORA_DOWNLOAD_FAILED: 424,
    ErrorCode.LORA_INVALID: 422,
    ErrorCode.LORA_INCOMPATIBLE: 422,
    ErrorCode.IMAGE_INVALID: 422,
    ErrorCode.BUSY: 429,
    ErrorCode.OUT_OF_MEMORY: 503,
    ErrorCode.UPLOAD_FAILED: 502,
    ErrorCode.INTERNAL: 500,
}


class ServiceError(Exception):
    """A failure with a contract error code; the message is safe to show the caller."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_dict(self) -> dict:
        return {"code": self.code.value, "message": self.message}

    def __repr__(self) -> str:
        return f"ServiceError({self.code.value!r}, {self.message!r})"
