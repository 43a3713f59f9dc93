"""The one place where failures become gRPC status codes.

Service code raises a :class:`ServiceError` subclass (or lets an ``EmoeError`` through); the
:class:`ErrorInterceptor` turns it into a status with a message that says what was wrong and,
for bad input, names the field (also sent as trailing metadata ``emoe-field``). Anything else
is logged with its traceback and reaches the client as INTERNAL with an incident id: never
UNKNOWN, never a stack trace. The interceptor also reads and parses request messages itself:
one at a time per receive slot (``emoe.rpc.intake``: the bound on the memory requests take),
and one that is not valid protobuf is INVALID_ARGUMENT. Messages never echo more than ``MAX_ECHO_CHARS`` of
a client's input (:func:`clip`), and no status message exceeds ``MAX_DETAILS_CHARS``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from emoe.core.errors import ConfigError

if TYPE_CHECKING:
    from emoe.rpc.intake import Intake

log = logging.getLogger(__name__)

FIELD_METADATA_KEY = "emoe-field"
HEALTH_METHODS = "/grpc.health.v1.Health/"
MAX_ECHO_CHARS = 64
MAX_DETAILS_CHARS = 1024


def clip(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


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


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class RequestFailed(ServiceError):
    """One request failed on its own inside the engine (its logits held NaN, its sampling or
    decoding raised); the requests beside it were unaffected."""

    code = grpc.StatusCode.INTERNAL


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
    if len(details) > MAX_DETAILS_CHARS:
        details = details[:MAX_DETAILS_CHARS - 3] + "..."
    if trailing:
        context.set_trailing_metadata(trailing)
    _drop_frames(exc)
    await context.abort(code, details)


def _drop_frames(exc: BaseException | None) -> None:
    """Drops the tracebacks of ``exc`` and the exceptions it chains to. gRPC keeps an abort,
    and so the exception it was raised in, in a reference cycle until the collector runs;
    the frames of a traceback hold the handler's locals (the parsed request, its text: up to
    the message limit each), which would stay in memory with it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _parser(deserializer: Callable[[bytes], Any] | None,
            max_bytes: int | None) -> Callable[[bytes], Any]:
    """Parses a request inside the handler, so a malformed message is INVALID_ARGUMENT
    (gRPC's own deserialisation failure reaches the client as UNKNOWN) and one over
    ``max_bytes`` is RESOURCE_EXHAUSTED before it is parsed."""

    def parse(raw: bytes) -> Any:
        if max_bytes is not None and len(raw) > max_bytes:
            raise ResourceExhausted(f"request: {len(raw)} bytes; at most {max_bytes} are "
                                    "accepted (--max-message-bytes)")
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
            message = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
            name = message.full_name if message is not None else "request"
            raise InvalidArgument("request", f"not a valid {name} protobuf message "
                                             f"({type(exc).__name__})") from None
    return parse


def _take(parse: Callable[[bytes], Any], raw: bytes) -> tuple[Any, ServiceError | None]:
    """(``parse(raw)``, None) or (None, the refusal without its traceback). The caller raises
    the refusal once it dropped ``raw``: gRPC keeps an abort in a reference cycle until the
    collector runs, and a traceback through a frame that holds the message (up to the
    transport's limit) would keep the message in memory with it."""
    try:
        return parse(raw), None
    except ServiceError as exc:
        return None, exc.with_traceback(None)


async def _receive(context: grpc.aio.ServicerContext, parse: Callable[[bytes], Any],
                   intake: "Intake") -> Any:
    """The call's next request message, read and parsed in a receive slot; grpc.aio.EOF after
    the last."""
    async with intake.slot():
        raw = await intake.read(context.read())
        if raw is grpc.aio.EOF:
            return raw
        request, refusal = _take(parse, raw)
        del raw
    if refusal is not None:
        raise refusal
    return request


def _receiver(parse: Callable[[bytes], Any], intake: "Intake", streaming: bool
              ) -> Callable[[grpc.aio.ServicerContext], Awaitable[Any]]:
    """What a handler is given: its one request message, or (``streaming``) an iterator of
    them, each read in a receive slot."""

    async def requests(context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        while (request := await _receive(context, parse, intake)) is not grpc.aio.EOF:
            yield request

    async def receive(context: grpc.aio.ServicerContext) -> Any:
        if streaming:
            return requests(context)
        request = await _receive(context, parse, intake)
        if request is grpc.aio.EOF:
            raise InvalidArgument("request", "the call ended before its request message")
        return request

    return receive


def _wrap_unary_response(behavior: Callable[..., Awaitable[Any]],
                         receive: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request_iterator: object, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(await receive(context), context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps them all
            await _abort(context, exc)

    return wrapped


def _wrap_stream_response(behavior: Callable[..., Any], receive: Callable[..., Awaitable[Any]]
                          ) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        # a handler that writes with context.write (grpc_health's Watch) and returns nothing
        return _wrap_unary_response(behavior, receive)

    async def wrapped(request_iterator: object, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[Any]:
        try:
            async for message in behavior(await receive(context), context):
                yield message
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)

    return wrapped


def _wrap(handler: grpc.RpcMethodHandler, max_bytes: int | None,
          intake: "Intake") -> grpc.RpcMethodHandler:
    """``handler`` as a request-streaming handler that reads its requests itself (see
    emoe.rpc.intake), with every exception mapped to a status."""
    receive = _receiver(_parser(handler.request_deserializer, max_bytes), intake,
                        handler.request_streaming)
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(handler.unary_stream or handler.stream_stream, receive),
            response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(
        _wrap_unary_response(handler.unary_unary or handler.stream_unary, receive),
        response_serializer=handler.response_serializer)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps the exceptions of every handler to status codes, reads request messages through
    ``intake``'s receive slots (health checks through a slot of their own, so that a flood of
    large requests does not delay them), and refuses those over ``max_message_bytes``."""

    def __init__(self, max_message_bytes: int | None = None,
                 intake: "Intake | None" = None) -> None:
        from emoe.rpc.intake import Intake

        self._max_bytes = max_message_bytes
        self._intake = intake if intake is not None else Intake()
        self._health_intake = Intake(slots=1)
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
        intake = self._health_intake if method.startswith(HEALTH_METHODS) else self._intake
        wrapped = self._wrapped[method] = _wrap(handler, self._max_bytes, intake)
        return wrapped
