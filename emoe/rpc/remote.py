"""A remote engine worker as a backend: the client side of emoe.v1.WorkerService.

Prompts to add and requests to remove are buffered and sent with the next step, so a step is
one round trip. Any transport failure, a worker that restarted (new instance id) or a step
that takes longer than ``step_timeout_s`` raises BackendUnavailable: the requests the worker
held are gone, and the server fails them with UNAVAILABLE and reconnects (``start``).
"""

from __future__ import annotations

import time

import grpc

from emoe.core.plan import StepPlan, StepResult
from emoe.rpc import convert
from emoe.rpc.backend import BackendInfo, BackendUnavailable, SamplingParams
from emoe.rpc.v1 import worker_pb2 as wpb
from emoe.rpc.v1 import worker_pb2_grpc

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
                 connect_timeout_s: float = 2.0):
        self.name = target
        self._target = target
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else None
        self._root_certificates = root_certificates
        self._step_timeout_s = step_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: worker_pb2_grpc.WorkerServiceStub | None = None
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
        return self._stub

    async def start(self) -> BackendInfo:
        stub = self._connect_channel()
        self._add.clear()
        self._remove.clear()
        try:
            info = await stub.GetWorkerInfo(wpb.GetWorkerInfoRequest(), timeout=self._connect_timeout_s,
                                            metadata=self._metadata)
            await stub.Reset(wpb.ResetRequest(instance_id=info.instance_id),
                             timeout=self._connect_timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise BackendUnavailable(f"{self._target}: {exc.code().name}: {exc.details()}") from None
        self._instance = info.instance_id
        return convert.info_from_proto(info, self._target)

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
        try:
            response = await self._stub.ExecuteStep(request, timeout=self._step_timeout_s,
                                                    metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _LOST:
                raise BackendUnavailable(f"{self._target}: {exc.code().name}: {exc.details()}") from None
            raise RuntimeError(f"worker {self._target} failed a step: {exc.code().name}: "
                               f"{exc.details()}") from None
        return convert.result_from_proto(response, started, time.monotonic())

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
