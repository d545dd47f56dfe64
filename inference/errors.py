"""The one exception that carries a contract error code (the codes live in the wire contract).

Every failure the service answers is a ServiceError; anything else is reported as `internal`.
"""

from collections.abc import Iterable, Mapping

from sdxl_lora_client.contract import HTTP_STATUS, ErrorCode

__all__ = ["HTTP_STATUS", "ErrorCode", "RequestCancelled", "ServiceError", "validation_message"]


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


def validation_message(errors: Iterable[Mapping], drop_loc: tuple[str, ...] = ("body",), whole: str = "body") -> str:
    """pydantic's errors as one `field.path: reason; ...` line, so that the API and the RunPod handler
    word an invalid request alike. `drop_loc` leaves out location parts the caller never wrote (the
    API's "body"); `whole` names an error about the input as a whole."""
    return "; ".join(f"{'.'.join(str(part) for part in e['loc'] if part not in drop_loc) or whole}: {e['msg']}"
                     for e in errors)
