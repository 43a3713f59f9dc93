"""How many request messages are read into memory at once: the bound on a server's memory.

gRPC Python reads a unary call's whole request message before any handler code runs, for
every call at once: 64 concurrent 16 MiB messages took the server to a 1,535 MiB peak (grpcio
1.85). The error interceptor (``emoe.rpc.errors``) therefore serves every request as a stream
and reads its message itself, once it holds one of ``slots`` receive slots; until then the
message stays with the client, behind HTTP/2 flow control (64 KiB per stream: the server does
not widen the window by BDP probing, see ``emoe.rpc.server``). So at most ``slots`` messages,
each under the transport limit, are in memory at once, and the rest of a flood costs 64 KiB
and a waiting handler each; past ``max_waiting`` waiting calls a new one is refused with
RESOURCE_EXHAUSTED at once. A message must have arrived ``timeout_s`` after its slot was
granted (a client that trickles bytes holds a slot no longer). A slot is held while a message
is read and parsed, microseconds for a normal request. The HTTP front door reads request
bodies through the same slots.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from emoe.rpc.errors import ResourceExhausted

RECEIVE_SLOTS = 4
MAX_WAITING = 256
RECEIVE_TIMEOUT_S = 30.0

T = TypeVar("T")


class Intake:
    def __init__(self, slots: int = RECEIVE_SLOTS, max_waiting: int = MAX_WAITING,
                 timeout_s: float = RECEIVE_TIMEOUT_S):
        self.slots, self.max_waiting, self.timeout_s = slots, max_waiting, timeout_s
        self._free = asyncio.Semaphore(slots)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Holds a receive slot, waiting for one (ResourceExhausted when too many wait)."""
        if self._free.locked():
            if self.waiting >= self.max_waiting:
                raise ResourceExhausted(f"request: {self.waiting} requests are waiting to be "
                                        "read; retry later")
            self.waiting += 1
            try:
                await self._free.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._free.acquire()
        try:
            yield
        finally:
            self._free.release()

    async def read(self, receive: Awaitable[T]) -> T:
        """``receive`` (a message read, inside ``slot``), within ``timeout_s``."""
        try:
            return await asyncio.wait_for(receive, self.timeout_s)
        except TimeoutError:
            raise ResourceExhausted(f"request: the message did not arrive within "
                                    f"{self.timeout_s:g} s") from None
