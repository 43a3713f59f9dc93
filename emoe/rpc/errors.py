"""The one place where failures become gRPC status codes.

Service code raises a :class:`ServiceError` subclass (or lets an ``EmoeError`` through); the
:class:`ErrorInterceptor` turns it into a status with a message that says what was wrong and,
for bad input, names the field (also sent as trailing metadata ``emoe-field``). Anything else
is logged with its traceback and reaches the client as INTERNAL with an incident id: never
UNKNOWN, never a stack trace.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from emoe.core.errors import ConfigError

log = logging.getLogger(__name__)

FIELD_METADATA_KEY = "emoe-field"


class ServiceError(Exception):
    """A failure with a definite status code; the message is shown to the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) for an exception raised by a handler."""
    if isinstance(exc, ServiceError):
        field = getattr(exc, "field", None)
        return exc.code, exc.message, (((FIELD_METADATA_KEY, field),) if field else ())
    if isinstance(exc, ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), ()
    incident = uuid.uuid4().hex[:12]
    log.error("internal error, incident %s", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}; see the server log)", ()


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code, details, trailing = status_of(exc)
    if trailing:
        context.set_trailing_metadata(trailing)
    await context.abort(code, details)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps them all
            await _abort(context, exc)

    return wrapped


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for message in behavior(request, context):
                yield message
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)

    return wrapped


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions of unary-unary and unary-stream handlers to status codes."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if (wrapped := self._wrapped.get(method)) is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        wrapped = self._wrapped[method] = _wrap(handler)
        return wrapped
