"""OpenAI-style errors for both HTTP servers (worker and manager).

Every error leaves as `{"error": {"message", "type", "param", "code"}}`; validation and
malformed JSON become 400 `invalid_request_error`, unknown routes 404, anything
unexpected 500 `server_error` without leaking internals.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_service.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with an HTTP status that is returned to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_found(message: str, *, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, type="invalid_request_error", param=param, code=code)


def _loc_to_param(loc: Sequence[Any]) -> str | None:
    # ("body", "messages", 0, "role") -> "messages.0.role"
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def invalid_input(exc: ValidationError) -> ApiError:
    """A model validated outside a route's parameters (a WebSocket message, say) refused
    as a route's body would be: the same 400 and words."""
    return _validation_error(RequestValidationError(exc.errors()))


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, "request body is not valid JSON", code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",):
        # The body as a whole is wrong: missing, not JSON, or not a JSON object.
        return ApiError(400, "request body must be a JSON object", code="invalid_json")
    param = _loc_to_param(first.get("loc", ()))
    expected = _EXPECTED_TYPES.get(str(first.get("type")))
    if expected is not None and param and len(errors) == 1:
        # OpenAI's words: wrong JSON types are not coerced ("10" is no integer).
        got = _json_type(first.get("input"))
        message = f"Invalid type for '{param}': expected {expected}, but got {got} instead."
        return ApiError(400, message, param=param, code="invalid_type")
    value = first.get("input")
    bound = _INT_BOUNDS.get(str(first.get("type")))
    if bound is not None and param and isinstance(value, int) and not isinstance(value, bool):
        which, sign, code = bound
        limit = next(iter(first.get("ctx", {}).values()), "?")
        kind = "number" if isinstance(limit, float) else "integer"
        message = (
            f"Invalid '{param}': {kind} {which} value. Expected a value {sign} {limit}, "
            f"but got {value} instead."
        )
        return ApiError(400, message, param=param, code=code)
    if first.get("type") == "too_long" and param and isinstance(first.get("input"), list):
        limit = first.get("ctx", {}).get("max_length")
        message = (
            f"Invalid '{param}': array too long. Expected an array with maximum length "
            f"{limit}, but got an array with length {len(first['input'])} instead."
        )
        return ApiError(400, message, param=param, code="array_above_max_length")
    message = str(first.get("msg", "invalid value"))
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return ApiError(400, message, param=param, code="invalid_value")


_INT_BOUNDS = {  # pydantic's error type: OpenAI's words and code
    "less_than_equal": ("above maximum", "<=", "integer_above_max_value"),
    "greater_than_equal": ("below minimum", ">=", "integer_below_min_value"),
}

_EXPECTED_TYPES = {
    "int_type": "an integer",
    "bool_type": "a boolean",
    "float_type": "a number",
    "string_type": "a string",
}


def _json_type(value: Any) -> str:
    """How OpenAI names a JSON value's type in its errors."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}


def _document_400_not_422(app: FastAPI) -> None:
    """Make the OpenAPI schema say what the handlers do: bad input is a 400 ErrorResponse."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(error_schema.pop("$defs", {}))
        components["ErrorResponse"] = error_schema
        error = {
            "description": "Invalid request (OpenAI error shape)",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
            },
        }
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = error
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    """Make every error `app` returns use OpenAI's error shape."""
    _document_400_not_422(app)

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc).response()

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error_type = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        if exc.status_code >= 500:
            error_type = "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code
        )
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            code = "invalid_json"  # FastAPI's words for a body it could not decode
        return ApiError(
            exc.status_code, str(exc.detail), type=error_type, code=code, headers=exc.headers
        ).response()

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return ApiError(500, "internal server error", type="server_error").response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
