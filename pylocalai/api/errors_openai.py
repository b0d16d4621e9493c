"""The OpenAI error shape ({"error": {"message", "type", "param", "code"}}) and its status codes,
for every OpenAI-style blueprint (chat, completions, embeddings, models, responses)."""

from __future__ import annotations

import logging
from typing import Any

from quart import Blueprint
from werkzeug.exceptions import HTTPException

from pylocalai.errors import ErrorKind, PylocalaiError

log = logging.getLogger(__name__)

STATUS = {
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.CONTEXT_LENGTH: 400,
    ErrorKind.AUTHENTICATION: 401,
    ErrorKind.MODEL_NOT_FOUND: 404,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.INTERNAL: 500,
}
_TYPE_CODE = {
    ErrorKind.INVALID_REQUEST: ("invalid_request_error", None),
    ErrorKind.CONTEXT_LENGTH: ("invalid_request_error", "context_length_exceeded"),
    ErrorKind.AUTHENTICATION: ("invalid_request_error", "invalid_api_key"),
    ErrorKind.MODEL_NOT_FOUND: ("invalid_request_error", "model_not_found"),
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


def install(bp: Blueprint) -> None:
    @bp.errorhandler(PylocalaiError)
    async def _pylocalai_error(exc: PylocalaiError) -> tuple[dict[str, Any], int]:
        if exc.kind is ErrorKind.INTERNAL:
            log.error("request failed: %s", exc, exc_info=exc)
        return error_body(exc), STATUS[exc.kind]

    @bp.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> tuple[dict[str, Any], int]:
        return http_error_body(exc), exc.code or 500
