"""The public scheduler service (emoe.v1.SchedulerService): validation, admission, streaming.

A Generate call is validated into a Submission, admitted to the least loaded healthy engine
replica, and streamed from that request's event queue. Whatever ends the call (the request
finishing, an Abort, a cancelled call or a passed deadline, a lost engine) the request reaches
a terminal status and its batch slot and KV memory are freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

import emoe
from emoe.core.request import SLO
from emoe.core.tasks import TaskProfile
from emoe.rpc.backend import BackendInfo, SamplingParams
from emoe.rpc.errors import (AlreadyExists, InvalidArgument, NotFound, ResourceExhausted,
                             ServiceError, Unavailable)
from emoe.rpc.metrics import Outcome, ServiceMetrics
from emoe.rpc.replica import Finish, Replica, RequestStream, Submission
from emoe.rpc.task_detect import TaskDetector
from emoe.rpc.text import IncrementalDetokenizer, load_tokenizer
from emoe.rpc.v1 import scheduler_pb2 as pb
from emoe.rpc.v1 import scheduler_pb2_grpc

MAX_REQUEST_ID_CHARS = 256

_FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_STOP,
    "aborted": pb.FINISH_REASON_ABORTED,
}


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    tasks: dict[str, TaskProfile]
    default_task: str
    policy: str
    max_queue: int = 1024
    default_max_tokens: int = 128


def model_info(info: BackendInfo) -> pb.ModelInfo:
    return pb.ModelInfo(name=info.model.name, num_layers=info.model.num_layers,
                        num_experts=info.model.num_experts, top_k=info.model.top_k,
                        vocab_size=info.vocab_size, max_context=info.max_context,
                        eos_token_id=info.eos_token_id)


class SchedulerService(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, config: ServiceConfig, replicas: list[Replica], metrics: ServiceMetrics,
                 remote_workers: list[str]):
        if not replicas:
            raise ValueError("a scheduler service needs at least one engine replica")
        self.config = config
        self.replicas = replicas
        self.metrics = metrics
        self._remote_workers = remote_workers
        self._detector = TaskDetector(config.tasks, config.default_task)
        self._in_flight: dict[str, RequestStream] = {}
        self._draining = False
        self._drained = asyncio.Event()
        self._tokenizer = None
        self._info: BackendInfo | None = None
        for replica in replicas:
            replica.on_terminal = self._terminal

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return not self._draining and any(r.healthy for r in self.replicas)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def model_known(self) -> bool:
        return self._info is not None

    def model_ready(self) -> None:
        """Takes the model's limits and tokenizer from the first warm replica."""
        info = next(r.info for r in self.replicas if r.info is not None)
        self._info = info
        self._tokenizer = load_tokenizer(info.tokenizer_json)

    def start_draining(self) -> None:
        self._draining = True
        if not self._in_flight:
            self._drained.set()

    async def wait_drained(self, timeout: float) -> bool:
        """True when every request in flight finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def _terminal(self, stream: RequestStream) -> None:
        if self._in_flight.get(stream.request_id) is stream:
            del self._in_flight[stream.request_id]
        if self._draining and not self._in_flight:
            self._drained.set()

    def load(self) -> tuple[int, int, int, int]:
        """(waiting, running, resident experts, resident expert bytes) over all replicas."""
        waiting = running = resident = resident_bytes = 0
        for r in self.replicas:
            waiting += r.waiting
            running += r.running
            resident += r.resident_experts
            if r.info is not None:
                resident_bytes += r.resident_experts * r.info.model.expert_bytes
        return waiting, running, resident, resident_bytes

    # -- validation --------------------------------------------------------------------------

    def _submission(self, request: pb.GenerateRequest) -> Submission:
        info = self._info
        if info is None:
            raise Unavailable("the engine is not warm yet")
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")

        kind = request.WhichOneof("prompt")
        if kind is None:
            raise InvalidArgument("prompt", "set text or token_ids")
        text = ""
        if kind == "text":
            text = request.text
            if not text.strip():
                raise InvalidArgument("text", "must not be empty")
            if self._tokenizer is None:
                raise InvalidArgument("text", f"model {info.model.name} accepts token_ids only")
            prompt = self._tokenizer.encode(text).ids
        else:
            prompt = list(request.token_ids.ids)
            if not prompt:
                raise InvalidArgument("token_ids.ids", "must not be empty")
            bad = next((i for i, t in enumerate(prompt) if t >= info.vocab_size), None)
            if bad is not None:
                raise InvalidArgument(f"token_ids.ids[{bad}]",
                                      f"{prompt[bad]} is not below the vocabulary size {info.vocab_size}")
        if len(prompt) >= info.max_context:
            raise InvalidArgument(kind, f"{len(prompt)} prompt tokens leave no room in the "
                                        f"model's context of {info.max_context} tokens")

        if request.task:
            task = request.task
            if task not in self.config.tasks:
                raise InvalidArgument("task", f"unknown task {task!r}; valid: "
                                              f"{', '.join(sorted(self.config.tasks))}")
        else:
            task = self._detector.detect(text) if text else self._detector.default
        default_slo = self.config.tasks[task].slo
        slo = SLO(ttft_s=self._slo_value(request.slo, "ttft_s", default_slo.ttft_s),
                  tpot_s=self._slo_value(request.slo, "tpot_s", default_slo.tpot_s))
        sampling = self._sampling(request.sampling, len(prompt), info)
        return Submission(request_id=request_id, task=task, prompt=prompt, sampling=sampling,
                          slo=slo, priority=request.priority, accepted_at=0.0)

    @staticmethod
    def _slo_value(slo: pb.SLO, name: str, default: float) -> float:
        if not slo.HasField(name):
            return default
        value = getattr(slo, name)
        if not (math.isfinite(value) and value > 0):
            raise InvalidArgument(f"slo.{name}", f"must be a positive number of seconds, got {value}")
        return value

    def _sampling(self, s: pb.SamplingParams, prompt_len: int, info: BackendInfo) -> SamplingParams:
        room = info.max_context - prompt_len
        if s.HasField("max_tokens"):
            max_tokens = s.max_tokens
            if max_tokens < 1:
                raise InvalidArgument("sampling.max_tokens", "must be at least 1")
            if max_tokens > room:
                raise InvalidArgument(
                    "sampling.max_tokens", f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) "
                    f"exceeds the model's context of {info.max_context} tokens")
        else:
            max_tokens = min(self.config.default_max_tokens, room)
        temperature = s.temperature if s.HasField("temperature") else 1.0
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidArgument("sampling.temperature", f"must be >= 0, got {temperature}")
        top_p = s.top_p if s.HasField("top_p") else 1.0
        if not (0 < top_p <= 1):
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {top_p}")
        top_k = s.top_k if s.HasField("top_k") else 0
        stop = tuple(s.stop_token_ids)
        bad = next((t for t in stop if t >= info.vocab_size), None)
        if bad is not None:
            raise InvalidArgument("sampling.stop_token_ids",
                                  f"{bad} is not below the vocabulary size {info.vocab_size}")
        seed = s.seed if s.HasField("seed") else None
        if seed is not None and seed >= 2**63:
            raise InvalidArgument("sampling.seed", f"must be below 2**63, got {seed}")
        return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k,
                              seed=seed,
                              stop_token_ids=stop, ignore_eos=s.ignore_eos)

    # -- admission ---------------------------------------------------------------------------

    def _admit(self, submission: Submission) -> RequestStream:
        if self._draining:
            raise Unavailable("server is draining; send new requests elsewhere")
        if submission.request_id in self._in_flight:
            raise AlreadyExists(f"request_id {submission.request_id!r} is already in flight")
        healthy = [r for r in self.replicas if r.healthy]
        if not healthy:
            raise Unavailable("no engine worker can serve")
        if sum(r.waiting for r in self.replicas) >= self.config.max_queue:
            raise ResourceExhausted(f"queue full ({self.config.max_queue} requests waiting)")
        replica = min(healthy, key=lambda r: r.in_flight)
        submission.accepted_at = time.monotonic()
        stream = replica.submit(submission)
        self._in_flight[submission.request_id] = stream
        self.metrics.submitted(submission.task)
        return stream

    # -- RPCs --------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        submission = self._submission(request)
        stream = self._admit(submission)
        request_id = submission.request_id
        detokenizer = IncrementalDetokenizer(self._tokenizer) if self._tokenizer else None
        events = stream.events
        try:
            while True:
                event = await events.get()
                tokens: list[int] = []
                while isinstance(event, list):
                    tokens.extend(event)
                    if events.empty():
                        event = None
                        break
                    event = events.get_nowait()
                if isinstance(event, ServiceError):
                    raise event
                text = detokenizer.add(tokens, final=event is not None) if detokenizer else ""
                response = pb.GenerateResponse(request_id=request_id, token_ids=tokens, text=text)
                if isinstance(event, Finish):
                    response.completion.CopyFrom(self._completion(stream, event.reason))
                    yield response
                    return
                yield response
        finally:
            if not stream.done:  # the call was cancelled or its deadline passed
                stream.replica.abort(stream, Outcome.ABORTED, None)

    def _completion(self, stream: RequestStream, reason: str) -> pb.Completion:
        queue, ttft, tpot, total = stream.timings()
        s = stream.submission
        if reason in _FINISH_REASONS:
            finish = _FINISH_REASONS[reason]
        else:
            finish = (pb.FINISH_REASON_LENGTH if stream.output_tokens >= s.sampling.max_tokens
                      else pb.FINISH_REASON_STOP)
        return pb.Completion(
            finish_reason=finish, task=s.task, prompt_tokens=len(s.prompt),
            output_tokens=stream.output_tokens, slo_met=reason != "aborted" and stream.slo_met(),
            expert_hits=stream.expert_hits, expert_misses=stream.expert_misses,
            timings=pb.Timings(queue_s=queue or 0.0, ttft_s=ttft or 0.0, tpot_s=tpot or 0.0,
                               total_s=total))

    async def Abort(self, request: pb.AbortRequest,
                    context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        stream = self._in_flight.get(request.request_id)
        if stream is None:
            raise NotFound(f"no request {request.request_id!r} in flight")
        stream.replica.abort(stream, Outcome.ABORTED, Finish("aborted"))
        return pb.AbortResponse()

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        if self._info is None:
            raise Unavailable("the engine is not warm yet")
        return pb.ServerInfo(
            version=emoe.__version__, model=model_info(self._info), policy=self.config.policy,
            tasks=[pb.TaskInfo(name=t.name, ttft_s=t.slo.ttft_s, tpot_s=t.slo.tpot_s,
                               keywords=list(t.keywords)) for t in self.config.tasks.values()],
            default_task=self.config.default_task, max_queue=self.config.max_queue,
            default_max_tokens=self.config.default_max_tokens, workers=self._remote_workers)

    async def GetStats(self, request: pb.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> pb.Stats:
        waiting, running, resident, resident_bytes = self.load()
        e = self.metrics.experts
        stats = pb.Stats(uptime_s=self.metrics.uptime_s, waiting=waiting, running=running,
                         experts=pb.ExpertStats(hits=e.hits, misses=e.misses, hit_rate=e.hit_rate,
                                                loads=e.loads, evictions=e.evictions,
                                                resident=resident, resident_bytes=resident_bytes))
        for t in self.metrics.tasks():
            stats.tasks.append(pb.TaskStats(
                task=t.task, submitted=t.submitted, finished=t.finished, aborted=t.aborted,
                failed=t.failed, slo_met=t.slo_met, slo_attainment=t.slo_attainment,
                output_tokens=t.output_tokens,
                **{name: pb.Durations(**dataclasses.asdict(getattr(t, name)))
                   for name in ("queue", "ttft", "tpot", "total")}))
        return stats
