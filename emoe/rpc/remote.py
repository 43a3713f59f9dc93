"""A remote engine worker as a backend: the client side of emoe.v1.WorkerService.

Prompts to add and requests to remove are buffered and sent with the next step, so a step is
one round trip. The worker is lost (BackendUnavailable: the requests it held are gone, the
server fails them with UNAVAILABLE and reconnects through ``start``) on any transport
failure, when it restarted (new instance id), when a step takes longer than
``step_timeout_s``, and when it leaves a health check unanswered for ``liveness_timeout_s``:
while a step runs the worker's health is asked every ``PROBE_INTERVAL_S``, so a worker that
hangs (SIGSTOP, a frozen host) is found within seconds even though a long step is allowed a
minute. A worker whose health says NOT_SERVING is ``draining``: it finishes what it holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emoe.core.plan import ExpertKey, StepPlan, StepResult
from emoe.rpc import convert
from emoe.rpc.backend import BackendInfo, BackendUnavailable, SamplingParams
from emoe.rpc.v1 import worker_pb2 as wpb
from emoe.rpc.v1 import worker_pb2_grpc

WORKER_SERVICE = wpb.DESCRIPTOR.services_by_name["WorkerService"].full_name
PROBE_INTERVAL_S = 0.5
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
)
# Failures after which the worker's state cannot be trusted; other codes are bugs.
_LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED,
         grpc.StatusCode.UNAUTHENTICATED}


class RemoteBackend:
    def __init__(self, target: str, auth_token: str | None = None,
                 root_certificates: bytes | None = None, step_timeout_s: float = 60.0,
                 connect_timeout_s: float = 2.0, liveness_timeout_s: float = 3.0):
        self.name = target
        self.draining = False
        self._target = target
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else None
        self._root_certificates = root_certificates
        self._step_timeout_s = step_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._liveness_timeout_s = liveness_timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: worker_pb2_grpc.WorkerServiceStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None
        self._instance = ""
        self._add: dict[str, wpb.PromptSpec] = {}
        self._remove: list[str] = []

    def _connect_channel(self) -> worker_pb2_grpc.WorkerServiceStub:
        if self._stub is None:
            if self._root_certificates is not None:
                credentials = grpc.ssl_channel_credentials(self._root_certificates)
                self._channel = grpc.aio.secure_channel(self._target, credentials, CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.insecure_channel(self._target, CHANNEL_OPTIONS)
            self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)
        return self._stub

    def _lost(self, exc: grpc.aio.AioRpcError) -> BackendUnavailable:
        return BackendUnavailable(f"{self._target}: {exc.code().name}: {exc.details()}")

    async def start(self) -> BackendInfo:
        stub = self._connect_channel()
        self._add.clear()
        self._remove.clear()
        try:
            info = await stub.GetWorkerInfo(wpb.GetWorkerInfoRequest(), timeout=self._connect_timeout_s,
                                            metadata=self._metadata)
            reset = await stub.Reset(wpb.ResetRequest(instance_id=info.instance_id),
                                     timeout=self._connect_timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._lost(exc) from None
        self._instance = info.instance_id
        self.draining = False
        return dataclasses.replace(convert.info_from_proto(info, self._target),
                                   resident=convert.keys_from_proto(reset.resident))

    def add_request(self, request_id: str, prompt: list[int], sampling: SamplingParams) -> None:
        self._add[request_id] = wpb.PromptSpec(request_id=request_id, token_ids=prompt,
                                               sampling=convert.sampling_to_proto(sampling))

    def remove_request(self, request_id: str) -> None:
        if self._add.pop(request_id, None) is None:
            self._remove.append(request_id)

    async def execute(self, plan: StepPlan) -> StepResult:
        assert self._stub is not None, "execute before start"
        request = wpb.ExecuteStepRequest(instance_id=self._instance, add=list(self._add.values()),
                                         remove=self._remove, plan=convert.plan_to_proto(plan))
        self._add.clear()
        self._remove = []
        started = time.monotonic()
        step = asyncio.ensure_future(self._stub.ExecuteStep(
            request, timeout=self._step_timeout_s, metadata=self._metadata))
        watch = asyncio.ensure_future(self._watch())
        try:
            await asyncio.wait((step, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (step, watch):
                task.cancel()
            # let both calls end on this loop (gRPC reports a call's end to the loop it ran on)
            await asyncio.gather(step, watch, return_exceptions=True)
        if step.cancelled():
            raise watch.exception() or BackendUnavailable(f"{self._target}: step abandoned")
        try:
            response = step.result()
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _LOST:
                raise self._lost(exc) from None
            raise RuntimeError(f"worker {self._target} failed a step: {exc.code().name}: "
                               f"{exc.details()}") from None
        return convert.result_from_proto(response, started, time.monotonic())

    async def _watch(self) -> None:
        """Runs beside a step; raises BackendUnavailable once the worker stops answering."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            await self.check()

    async def check(self) -> None:
        assert self._health is not None, "check before start"
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=WORKER_SERVICE),
                timeout=self._liveness_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise BackendUnavailable(f"{self._target}: no answer to a health check within "
                                         f"{self._liveness_timeout_s:g} s") from None
            raise self._lost(exc) from None
        self.draining = response.status != health_pb2.HealthCheckResponse.SERVING

    async def recover(self) -> tuple[ExpertKey, ...]:
        assert self._stub is not None, "recover before start"
        self._add.clear()
        self._remove.clear()
        try:
            reset = await self._stub.Reset(wpb.ResetRequest(instance_id=self._instance),
                                           timeout=self._step_timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _LOST:
                raise self._lost(exc) from None
            raise RuntimeError(f"worker {self._target} cannot recover: {exc.code().name}: "
                               f"{exc.details()}") from None
        return convert.keys_from_proto(reset.resident)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = self._health = None
