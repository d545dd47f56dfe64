"""The one place the API writes an error body: the contract's `{"error": {"code", "message"}}`, with
the code in the `x-error-code` header too, so logs, metrics and proxies can read it without the body."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse

from inference.errors import HTTP_STATUS, ErrorCode


def error_response(code: ErrorCode | str, message: str, status: int | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """`status` defaults to the contract's for `code`; `headers` are added (and may say more precisely
    what the code is, as a 499's `x-error-code: client_closed` does)."""
    code = ErrorCode(code)
    return JSONResponse({"error": {"code": code.value, "message": message}},
                        status_code=HTTP_STATUS[code] if status is None else status,
                        headers={"x-error-code": code.value, **(headers or {})})
