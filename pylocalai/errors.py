"""The error hierarchy every layer raises. Protocol layers map ErrorKind to their own wire shape once."""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorKind(enum.Enum):
    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH = "context_length"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"  # allowed to ask, not this (a disabled model)
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"  # a resource other than a model (a stored response)
    OVERLOADED = "overloaded"
    INTERNAL = "internal"


class PylocalaiError(Exception):
    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(PylocalaiError):
    kind = ErrorKind.INVALID_REQUEST


class ContextLengthError(InvalidRequestError):
    kind = ErrorKind.CONTEXT_LENGTH


class AuthenticationError(PylocalaiError):
    kind = ErrorKind.AUTHENTICATION


class PermissionDeniedError(PylocalaiError):
    kind = ErrorKind.PERMISSION


class ModelNotFoundError(PylocalaiError):
    kind = ErrorKind.MODEL_NOT_FOUND


class NotFoundError(PylocalaiError):
    kind = ErrorKind.NOT_FOUND


class OverloadedError(PylocalaiError):
    kind = ErrorKind.OVERLOADED


class EngineError(PylocalaiError):
    """The native engine failed (load, decode): not the caller's fault."""

    kind = ErrorKind.INTERNAL


class EngineUnavailableError(EngineError):
    """The engine extension for a backend was not built into this install."""
