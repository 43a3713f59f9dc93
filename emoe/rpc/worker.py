"""The engine worker service (emoe.v1.WorkerService): any backend, served to a remote scheduler.

``emoe worker`` runs this over the torch engine; ``emoe serve --worker HOST:PORT`` drives it
through ``emoe.rpc.remote.RemoteBackend``. One scheduler drives a worker; steps are serialised,
and a step whose caller gave up (its deadline, a lost connection) still runs to its end before
the next call touches the engine.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from emoe.core.plan import RequestStepOutput
from emoe.rpc import convert
from emoe.rpc.backend import Backend, BackendInfo, BackendUnavailable
from emoe.rpc.errors import FailedPrecondition, Unavailable
from emoe.rpc.v1 import worker_pb2 as wpb
from emoe.rpc.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, backend: Backend, info: BackendInfo):
        self._backend = backend
        self._info = info
        self._info_proto = convert.info_to_proto(info)
        self._held: set[str] = set()
        self._lock = asyncio.Lock()
        self.idle = asyncio.Event()  # set while the worker holds no request
        self.idle.set()

    def _check_instance(self, instance_id: str) -> None:
        if instance_id != self._info.instance_id:
            raise FailedPrecondition(
                f"instance_id {instance_id!r} is not this worker's ({self._info.instance_id!r}): "
                "it restarted and holds none of your requests; call GetWorkerInfo and Reset")

    def _update_idle(self) -> None:
        if self._held:
            self.idle.clear()
        else:
            self.idle.set()

    async def GetWorkerInfo(self, request: wpb.GetWorkerInfoRequest,
                            context: grpc.aio.ServicerContext) -> wpb.WorkerInfo:
        return self._info_proto

    async def Reset(self, request: wpb.ResetRequest,
                    context: grpc.aio.ServicerContext) -> wpb.ResetResponse:
        self._check_instance(request.instance_id)
        return await asyncio.shield(asyncio.ensure_future(self._reset()))

    async def _reset(self) -> wpb.ResetResponse:
        async with self._lock:
            self._held.clear()
            self._update_idle()
            try:
                resident = await self._backend.recover()
            except BackendUnavailable as exc:  # its engine is hung in a step
                raise Unavailable(f"engine {self._backend.name}: {exc}") from None
        return wpb.ResetResponse(resident=convert.keys_to_proto(resident))

    async def ExecuteStep(self, request: wpb.ExecuteStepRequest,
                          context: grpc.aio.ServicerContext) -> wpb.ExecuteStepResponse:
        self._check_instance(request.instance_id)
        # shielded: a caller that gives up does not interrupt the engine mid-step
        return await asyncio.shield(asyncio.ensure_future(self._step(request)))

    async def _step(self, request: wpb.ExecuteStepRequest) -> wpb.ExecuteStepResponse:
        async with self._lock:
            for request_id in request.remove:
                self._backend.remove_request(request_id)
                self._held.discard(request_id)
            refused: dict[str, str] = {}
            for prompt in request.add:
                try:
                    self._backend.add_request(prompt.request_id, list(prompt.token_ids),
                                              convert.sampling_from_proto(prompt.sampling))
                except Exception as exc:  # noqa: BLE001 - one bad prompt must not fail the step
                    log.warning("request %s refused by the engine: %s", prompt.request_id, exc)
                    refused[prompt.request_id] = f"the engine refused the prompt: {exc}"
                    continue
                self._held.add(prompt.request_id)
            plan = convert.plan_from_proto(request.plan)
            if refused:
                plan.prefill = [c for c in plan.prefill if c.request_id not in refused]
                plan.decode = [r for r in plan.decode if r not in refused]
            try:
                result = await self._backend.execute(plan)
            except BackendUnavailable as exc:  # hung: the scheduler fails its requests, retries
                raise Unavailable(f"engine {self._backend.name}: {exc}") from None
            for out in result.outputs:
                if out.finished:
                    self._backend.remove_request(out.request_id)
                    self._held.discard(out.request_id)
            result.outputs.extend(RequestStepOutput(request_id, finished=True, finish_reason="error",
                                                    error=error)
                                  for request_id, error in refused.items())
            self._update_idle()
            return convert.result_to_proto(result)
