"""Bearer-token authentication and request ownership: ``authorization: Bearer <token>``.

A token file (``--auth-token-file``) holds one token per line; blank lines and ``#`` comments
are ignored:

    s3cret-shared                 a lone token: identity "default", admin (the one-token format)
    alice  s3cret-alice           a named identity
    ops    s3cret-ops   admin     an admin: sees and aborts every identity's requests

A request belongs to the identity whose token sent it; Abort and GetStats see only the
caller's own requests unless the identity is an admin. Without a token file every caller is
the one identity ``anonymous``, an admin: with auth off, anyone who reaches the port may see
and abort everything. Health is exempt from auth (load balancers probe it).

:class:`TokenTable` is transport-free: the gRPC interceptor below and any other front door
resolve a caller with ``TokenTable.identify(authorization header value)``.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from emoe.core.errors import ConfigError

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent a request. ``name`` has no "/" (request keys are ``name/request_id``)."""

    name: str
    admin: bool = False


ANONYMOUS = Identity("anonymous", admin=True)


class TokenTable:
    """Tokens and the identities they stand for."""

    def __init__(self, tokens: dict[str, Identity]):
        if not tokens:
            raise ConfigError("auth: no tokens")
        self._tokens = [(f"Bearer {token}".encode(), identity)
                        for token, identity in tokens.items()]

    @classmethod
    def single(cls, token: str) -> "TokenTable":
        """One shared token: identity "default", an admin (everyone holding it sees everything)."""
        return cls({token: Identity("default", admin=True)})

    @classmethod
    def parse(cls, text: str, source: str) -> "TokenTable":
        tokens: dict[str, Identity] = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            where = f"{source}:{number}"
            if not fields:
                continue
            if len(fields) == 1:
                name, token, admin = "default", fields[0], True
            elif len(fields) == 2 or (len(fields) == 3 and fields[2] == "admin"):
                name, token, admin = fields[0], fields[1], len(fields) == 3
            else:
                raise ConfigError(f"{where}: expected 'TOKEN' or 'NAME TOKEN [admin]', "
                                  f"got {len(fields)} fields")
            if not _NAME.fullmatch(name):
                raise ConfigError(f"{where}: identity name must be 1-64 of A-Z a-z 0-9 _ . @ -")
            if token in tokens:
                raise ConfigError(f"{where}: this token is already listed (for "
                                  f"{tokens[token].name!r})")
            tokens[token] = Identity(name, admin)
        if not tokens:
            raise ConfigError(f"{source}: the token file lists no token")
        return cls(tokens)

    @classmethod
    def from_file(cls, path: Path) -> "TokenTable":
        return cls.parse(read_token_file(path), str(path))

    def identify(self, authorization: str | bytes | None) -> Identity | None:
        """The identity of an ``authorization`` value ("Bearer TOKEN"); None when it is
        missing or no token matches. Compares in constant time."""
        if authorization is None:
            return None
        given = authorization.encode() if isinstance(authorization, str) else authorization
        found = None
        for expected, identity in self._tokens:
            if hmac.compare_digest(given, expected):
                found = identity
        return found


def read_token_file(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read token file: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


def client_token(path: Path) -> str:
    """The token a client sends, from the first entry of a token file (either format)."""
    for line in read_token_file(path).splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            return fields[0] if len(fields) == 1 else fields[1]
    raise ConfigError(f"{path}: the token file is empty")


def authorization(metadata) -> str | bytes | None:
    """The ``authorization`` value of gRPC invocation metadata."""
    for key, value in metadata or ():
        if key == "authorization":
            return value
    return None


def _deny(message: str) -> grpc.RpcMethodHandler:
    """Refuses a call without reading its request message (a request-streaming handler: gRPC
    reads no message for it), whatever its size."""

    async def deny(requests: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_unary_rpc_method_handler(deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a token of ``tokens`` with UNAUTHENTICATED; health is exempt."""

    def __init__(self, tokens: TokenTable):
        self._tokens = tokens
        self._missing = _deny("missing 'authorization: Bearer <token>' metadata")
        self._wrong = _deny("invalid bearer token")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(HEALTH_SERVICE_PREFIX):
            return await continuation(handler_call_details)
        value = authorization(handler_call_details.invocation_metadata)
        if value is None:
            return self._missing
        if self._tokens.identify(value) is None:
            return self._wrong
        return await continuation(handler_call_details)
