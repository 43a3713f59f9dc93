"""The engine worker service (emoe.v1.WorkerService): any backend, served to a remote scheduler.

``emoe worker`` runs this over the torch engine; ``emoe serve --worker HOST:PORT`` drives it
through ``emoe.rpc.remote.RemoteBackend``. One scheduler drives a worker; steps are serialised.
"""

from __future__ import annotations

import asyncio

import grpc

from emoe.rpc import convert
from emoe.rpc.backend import Backend, BackendInfo
from emoe.rpc.errors import FailedPrecondition
from emoe.rpc.v1 import worker_pb2 as wpb
from emoe.rpc.v1 import worker_pb2_grpc


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, backend: Backend, info: BackendInfo):
        self._backend = backend
        self._info = info
        self._info_proto = convert.info_to_proto(info)
        self._held: set[str] = set()
        self._lock = asyncio.Lock()

    def _check_instance(self, instance_id: str) -> None:
        if instance_id != self._info.instance_id:
            raise FailedPrecondition(
                f"instance_id {instance_id!r} is not this worker's ({self._info.instance_id!r}): "
                "it restarted and holds none of your requests; call GetWorkerInfo and Reset")

    async def GetWorkerInfo(self, request: wpb.GetWorkerInfoRequest,
                            context: grpc.aio.ServicerContext) -> wpb.WorkerInfo:
        return self._info_proto

    async def Reset(self, request: wpb.ResetRequest,
                    context: grpc.aio.ServicerContext) -> wpb.ResetResponse:
        self._check_instance(request.instance_id)
        async with self._lock:
            for request_id in self._held:
                self._backend.remove_request(request_id)
            self._held.clear()
        return wpb.ResetResponse()

    async def ExecuteStep(self, request: wpb.ExecuteStepRequest,
                          context: grpc.aio.ServicerContext) -> wpb.ExecuteStepResponse:
        self._check_instance(request.instance_id)
        async with self._lock:
            for request_id in request.remove:
                self._backend.remove_request(request_id)
                self._held.discard(request_id)
            for prompt in request.add:
                self._backend.add_request(prompt.request_id, list(prompt.token_ids),
                                          convert.sampling_from_proto(prompt.sampling))
                self._held.add(prompt.request_id)
            result = await self._backend.execute(convert.plan_from_proto(request.plan))
            for out in result.outputs:
                if out.finished:
                    self._backend.remove_request(out.request_id)
                    self._held.discard(out.request_id)
            return convert.result_to_proto(result)
