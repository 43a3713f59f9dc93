"""Optional bearer-token authentication: ``authorization: Bearer <token>`` metadata."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the server's token with UNAUTHENTICATED; health is exempt."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("empty bearer token")
        self._expected = f"Bearer {token}".encode()
        self._missing = _deny("missing 'authorization: Bearer <token>' metadata")
        self._wrong = _deny("invalid bearer token")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(HEALTH_SERVICE_PREFIX):
            return await continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._expected):
                    return await continuation(handler_call_details)
                return self._wrong
        return self._missing
