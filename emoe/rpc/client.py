"""A Python client for the emoe scheduler service.

    async with EmoeClient("127.0.0.1:50051") as client:
        async for chunk in client.generate("Summarize: ...", max_tokens=32):
            print(chunk.text, end="")
        result = await client.complete([1, 42, 7], task="qa")   # whole output at once

Failures surface as ``grpc.aio.AioRpcError`` with the status code the service documents.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emoe.rpc.v1 import scheduler_pb2 as pb
from emoe.rpc.v1 import scheduler_pb2_grpc


@dataclass(slots=True)
class Generation:
    """A finished request: its text, token ids and the server's completion message."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    completion: pb.Completion | None = None


def generate_request(prompt: str | Sequence[int], *, request_id: str = "", task: str = "",
                     ttft_s: float | None = None, tpot_s: float | None = None,
                     max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                     stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                     priority: int = 0) -> pb.GenerateRequest:
    """A GenerateRequest; None leaves an optional field unset (the server's default)."""
    request = pb.GenerateRequest(request_id=request_id, task=task, priority=priority)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    for name, value in (("ttft_s", ttft_s), ("tpot_s", tpot_s)):
        if value is not None:
            setattr(request.slo, name, value)
    s = request.sampling
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(s, name, value)
    s.stop_token_ids.extend(stop_token_ids)
    s.ignore_eos = ignore_eos
    return request


class EmoeClient:
    def __init__(self, target: str, *, auth_token: str | None = None,
                 root_certificates: bytes | None = None,
                 options: Sequence[tuple[str, object]] = ()):
        self.target = target
        if root_certificates is not None:
            self.channel = grpc.aio.secure_channel(
                target, grpc.ssl_channel_credentials(root_certificates), options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else None
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> "EmoeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    def stream(self, request: pb.GenerateRequest, timeout: float | None = None
               ) -> grpc.aio.UnaryStreamCall:
        """The raw call (iterate it; ``cancel()`` it to abandon the request)."""
        return self.stub.Generate(request, timeout=timeout, metadata=self._metadata)

    async def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                       **fields: object) -> AsyncIterator[pb.GenerateResponse]:
        """Streams the responses; keyword fields as in :func:`generate_request`."""
        call = self.stream(generate_request(prompt, **fields), timeout=timeout)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def complete(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                       **fields: object) -> Generation:
        result = Generation()
        async for response in self.generate(prompt, timeout=timeout, **fields):
            result.request_id = response.request_id
            result.text += response.text
            result.token_ids.extend(response.token_ids)
            if response.HasField("completion"):
                result.completion = response.completion
        return result

    async def abort(self, request_id: str, timeout: float | None = None) -> None:
        await self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout,
                              metadata=self._metadata)

    async def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return await self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout,
                                             metadata=self._metadata)

    async def stats(self, timeout: float | None = None) -> pb.Stats:
        return await self.stub.GetStats(pb.GetStatsRequest(), timeout=timeout,
                                        metadata=self._metadata)

    async def health(self, service: str = "", timeout: float | None = None
                     ) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                            timeout=timeout)
        return response.status

    async def wait_serving(self, timeout: float = 60.0, poll_s: float = 0.05) -> None:
        """Waits until the server's health is SERVING; TimeoutError after ``timeout`` seconds,
        saying what the server last answered (nothing, or its health status)."""
        last = "no answer"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        status = await self.health(timeout=poll_s * 20)
                        if status == health_pb2.HealthCheckResponse.SERVING:
                            return
                        last = f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                              grpc.StatusCode.DEADLINE_EXCEEDED):
                            raise
                        last = f"no answer ({exc.code().name})"
                    await asyncio.sleep(poll_s)
        except TimeoutError:
            raise TimeoutError(last) from None
