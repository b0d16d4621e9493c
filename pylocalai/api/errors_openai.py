"""The OpenAI error shape ({"error": {"message", "type", "param", "code"}}) and its status codes,
for every OpenAI-style blueprint (chat, completions, embeddings, models, responses). Open Responses
keeps the shape with its own type names (invalid_request, not_found, server_error, model_error)."""

from __future__ import annotations

import logging
from typing import Any

from quart import Blueprint
from werkzeug.exceptions import HTTPException

from pylocalai.errors import EngineError, ErrorKind, PylocalaiError

log = logging.getLogger(__name__)

STATUS = {
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.CONTEXT_LENGTH: 400,
    ErrorKind.AUTHENTICATION: 401,
    ErrorKind.PERMISSION: 403,
    ErrorKind.MODEL_NOT_FOUND: 404,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.INTERNAL: 500,
}
_TYPE_CODE = {
    ErrorKind.INVALID_REQUEST: ("invalid_request_error", None),
    ErrorKind.CONTEXT_LENGTH: ("invalid_request_error", "context_length_exceeded"),
    ErrorKind.AUTHENTICATION: ("invalid_request_error", "invalid_api_key"),
    ErrorKind.PERMISSION: ("invalid_request_error", "permission_denied"),
    ErrorKind.MODEL_NOT_FOUND: ("invalid_request_error", "model_not_found"),
    ErrorKind.NOT_FOUND: ("invalid_request_error", "not_found"),
    ErrorKind.OVERLOADED: ("server_error", "overloaded"),
    ErrorKind.INTERNAL: ("server_error", "server_error"),
}


def error_body(exc: PylocalaiError) -> dict[str, Any]:
    typ, code = _TYPE_CODE[exc.kind]
    return {"error": {"message": exc.message, "type": typ, "param": exc.param, "code": code}}


def http_error_body(exc: HTTPException) -> dict[str, Any]:
    status = exc.code or 500
    typ = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": exc.description or exc.name, "type": typ, "param": None, "code": status}}


def responses_type(status: int, exc: BaseException | None = None) -> str:
    """Open Responses' error type for a status: invalid_request 400, not_found 404,
    too_many_requests 429, model_error (the engine failed) or server_error 500."""
    if status == 404:
        return "not_found"
    if status == 403:
        return "forbidden"
    if status == 429:
        return "too_many_requests"
    if status >= 500:
        return "model_error" if isinstance(exc, EngineError) else "server_error"
    return "invalid_request"


def responses_error_body(exc: PylocalaiError) -> dict[str, Any]:
    body = error_body(exc)
    body["error"]["type"] = responses_type(STATUS[exc.kind], exc)
    return body


def install(bp: Blueprint, *, responses: bool = False) -> None:
    """The blueprint's error handlers; responses=True gives Open Responses' type names."""
    @bp.errorhandler(PylocalaiError)
    async def _pylocalai_error(exc: PylocalaiError) -> tuple[dict[str, Any], int, dict[str, str]]:
        if exc.kind is ErrorKind.INTERNAL:
            log.error("request failed: %s", exc, exc_info=exc)
        headers = {"WWW-Authenticate": "Bearer"} if exc.kind is ErrorKind.AUTHENTICATION else {}
        return (responses_error_body(exc) if responses else error_body(exc)), STATUS[exc.kind], headers

    @bp.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> tuple[dict[str, Any], int]:
        body = http_error_body(exc)
        if responses:
            body["error"]["type"] = responses_type(exc.code or 500)
        return body, exc.code or 500
