"""The public scheduler service (emoe.v1.SchedulerService): validation, admission, streaming.

A Generate call is validated into a Submission, admitted to the least loaded healthy engine
replica, and streamed from that request's event queue. Whatever ends the call (the request
finishing, an Abort, a cancelled call or a passed deadline, a lost engine) the request reaches
a terminal status and its batch slot and KV memory are freed.

The service core is transport-free, for every front door (gRPC here; HTTP beside it):
``identity`` resolves a caller's ``authorization`` value, ``submission`` validates a request
within the input limits (tokenizing off the event loop), ``admit`` queues it, ``outputs``
streams it, ``abort`` and ``stats`` act for a caller on its own requests (every request for
an admin), and ``health`` says whether the server takes requests and, if not, why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

import emoe
from emoe.core.request import SLO
from emoe.core.serving import context_error
from emoe.core.tasks import TaskProfile
from emoe.rpc.auth import ANONYMOUS, Identity, TokenTable, authorization
from emoe.rpc.backend import BackendInfo, SamplingParams
from emoe.rpc.convert import admission_to_proto
from emoe.rpc.errors import (AlreadyExists, InvalidArgument, NotFound, RequestFailed,
                             ResourceExhausted, ServiceError, Unauthenticated, Unavailable, clip)
from emoe.rpc.metrics import Outcome, ServiceMetrics
from emoe.rpc.policy_info import PolicyInForce
from emoe.rpc.replica import Finish, Replica, RequestStream, Submission
from emoe.rpc.task_detect import TaskDetector
from emoe.rpc.text import IncrementalDetokenizer, load_tokenizer
from emoe.rpc.v1 import scheduler_pb2 as pb
from emoe.rpc.v1 import scheduler_pb2_grpc

MAX_REQUEST_ID_CHARS = 256
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
# Default prompt limit in characters: this many per token of the model's context. No tokenizer
# in use averages more than a few characters per token, so a longer prompt cannot fit.
PROMPT_CHARS_PER_TOKEN = 16
MAX_STOP_TOKEN_IDS = 64

_FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_STOP,
    "aborted": pb.FINISH_REASON_ABORTED,
}


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """``max_message_bytes``: the largest request message a front door accepts;
    ``max_prompt_chars``: the longest text prompt (None: ``PROMPT_CHARS_PER_TOKEN`` x the
    model's context), checked before tokenizing; ``auth``: the bearer tokens (None: auth off,
    every caller is ``ANONYMOUS``)."""

    tasks: dict[str, TaskProfile]
    default_task: str
    policy: str
    max_queue: int = 1024
    default_max_tokens: int = 128
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_prompt_chars: int | None = None
    auth: TokenTable | None = None


@dataclass(slots=True)
class Output:
    """A piece of a request's stream: new token ids and their text; ``completion`` is set on
    the last piece."""

    token_ids: list[int]
    text: str
    completion: pb.Completion | None = None


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
        self._in_flight: dict[str, RequestStream] = {}  # by Submission.key
        self._draining = False
        self._drained = asyncio.Event()
        self._tokenizer = None
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emoe-tokenize")
        self._info: BackendInfo | None = None
        self.max_prompt_chars = 0
        self.policy_in_force: PolicyInForce | None = None  # set when a scheduler is built
        for replica in replicas:
            replica.on_terminal = self._terminal

    # -- lifecycle ---------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """(serving, why not): serving while not draining and any engine takes requests."""
        if self._draining:
            return False, "the server is draining"
        if any(r.accepting for r in self.replicas):
            return True, ""
        return False, "; ".join(r.status for r in self.replicas)

    @property
    def serving(self) -> bool:
        return self.health()[0]

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
        self.max_prompt_chars = (self.config.max_prompt_chars
                                 or PROMPT_CHARS_PER_TOKEN * info.max_context)

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

    def close(self) -> None:
        self._tokenize.shutdown(wait=False, cancel_futures=True)

    def _terminal(self, stream: RequestStream) -> None:
        if self._in_flight.get(stream.key) is stream:
            del self._in_flight[stream.key]
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

    # -- callers -----------------------------------------------------------------------------

    def identity(self, authorization_value: str | bytes | None) -> Identity:
        """The caller an ``authorization`` value ("Bearer TOKEN") stands for; ANONYMOUS with
        auth off. Unauthenticated when auth is on and the value is missing or wrong."""
        if self.config.auth is None:
            return ANONYMOUS
        if authorization_value is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>'")
        identity = self.config.auth.identify(authorization_value)
        if identity is None:
            raise Unauthenticated("invalid bearer token")
        return identity

    def _caller(self, context: grpc.aio.ServicerContext) -> Identity:
        return self.identity(authorization(context.invocation_metadata()))

    # -- validation --------------------------------------------------------------------------

    async def submission(self, request: pb.GenerateRequest, owner: Identity) -> Submission:
        """Validates ``request`` for ``owner``: every limit is checked before any work that
        grows with the input, and text is tokenized on a thread of its own."""
        info = self._info
        if info is None:
            raise Unavailable("the engine is not warm yet")
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument("request_id", f"{len(request_id)} characters; at most "
                                                f"{MAX_REQUEST_ID_CHARS}")

        kind = request.WhichOneof("prompt")
        if kind is None:
            raise InvalidArgument("prompt", "set text or token_ids")
        text = ""
        if kind == "text":
            text = request.text
            if len(text) > self.max_prompt_chars:
                raise InvalidArgument("text", f"{len(text)} characters; at most "
                                              f"{self.max_prompt_chars} are accepted "
                                              "(--max-prompt-chars)")
            if not text.strip():
                raise InvalidArgument("text", "must not be empty")
            if self._tokenizer is None:
                raise InvalidArgument("text", f"model {info.model.name} accepts token_ids only")
            # encode_batch releases the GIL (encode does not): other streams keep flowing
            encodings = await asyncio.get_running_loop().run_in_executor(
                self._tokenize, self._tokenizer.encode_batch, [text])
            prompt = encodings[0].ids
            too_long = context_error(len(prompt), 1, info.max_context, prompt_field="text")
            if too_long is not None:
                raise InvalidArgument(*too_long)
        else:
            ids = request.token_ids.ids
            if not ids:
                raise InvalidArgument("token_ids.ids", "must not be empty")
            too_long = context_error(len(ids), 1, info.max_context)
            if too_long is not None:  # before the ids are copied: a huge list costs nothing
                raise InvalidArgument(*too_long)
            prompt = list(ids)
            if max(prompt) >= info.vocab_size:
                bad = next(i for i, t in enumerate(prompt) if t >= info.vocab_size)
                raise InvalidArgument(f"token_ids.ids[{bad}]",
                                      f"{prompt[bad]} is not below the vocabulary size {info.vocab_size}")

        if request.task:
            task = request.task
            if task not in self.config.tasks:
                raise InvalidArgument("task", f"unknown task {clip(task)}; valid: "
                                              f"{', '.join(sorted(self.config.tasks))}")
        else:
            task = self._detector.detect(text) if text else self._detector.default
        default_slo = self.config.tasks[task].slo
        slo = SLO(ttft_s=self._slo_value(request.slo, "ttft_s", default_slo.ttft_s),
                  tpot_s=self._slo_value(request.slo, "tpot_s", default_slo.tpot_s))
        sampling = self._sampling(request.sampling, len(prompt), info)
        return Submission(key=f"{owner.name}/{request_id}", request_id=request_id,
                          owner=owner.name, task=task, prompt=prompt, sampling=sampling, slo=slo,
                          priority=request.priority, accepted_at=0.0)
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
            too_long = context_error(prompt_len, max_tokens, info.max_context)
            if too_long is not None:
                raise InvalidArgument(*too_long)
        else:
            max_tokens = min(self.config.default_max_tokens, room)
        temperature = s.temperature if s.HasField("temperature") else 1.0
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidArgument("sampling.temperature", f"must be >= 0 (below 1e-5: greedy), "
                                                          f"got {temperature}")
        top_p = s.top_p if s.HasField("top_p") else 1.0
        if not (0 < top_p <= 1):
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {top_p}")
        top_k = s.top_k if s.HasField("top_k") else 0
        if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument("sampling.stop_token_ids", f"{len(s.stop_token_ids)} ids; at "
                                                             f"most {MAX_STOP_TOKEN_IDS}")
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

    def admit(self, submission: Submission) -> RequestStream:
        """Queues a validated request on the least loaded engine that takes requests."""
        if self._draining:
            raise Unavailable("server is draining; send new requests elsewhere")
        if submission.key in self._in_flight:
            raise AlreadyExists(f"request_id {clip(submission.request_id)} is already in flight")
        accepting = [r for r in self.replicas if r.accepting]
        if not accepting:
            raise Unavailable(f"no engine can serve: {self.health()[1]}")
        if sum(r.waiting for r in self.replicas) >= self.config.max_queue:
            raise ResourceExhausted(f"queue full ({self.config.max_queue} requests waiting)")
        replica = min(accepting, key=lambda r: r.in_flight)
        submission.accepted_at = time.monotonic()
        stream = replica.submit(submission)
        self._in_flight[submission.key] = stream
        self.metrics.submitted(submission.task, submission.owner)
        return stream

    async def outputs(self, stream: RequestStream) -> AsyncIterator[Output]:
        """A request's stream: token pieces as they come, the completion last. Raises the
        ServiceError that ended it otherwise. Leaving early aborts the request."""
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
                try:
                    text = detokenizer.add(tokens, final=event is not None) if detokenizer else ""
                except Exception as exc:  # noqa: BLE001 - this request's own failure
                    stream.replica.abort(stream, Outcome.FAILED, None)
                    raise RequestFailed(f"turning this request's tokens into text failed: "
                                        f"{type(exc).__name__}: {exc}") from None
                if isinstance(event, Finish):
                    yield Output(tokens, text, self._completion(stream, event.reason))
                    return
                yield Output(tokens, text)
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

    def abort(self, request_id: str, caller: Identity) -> None:
        """Aborts the caller's request ``request_id`` (an admin's: anyone's with that id)."""
        streams = [self._in_flight.get(f"{caller.name}/{request_id}")]
        if streams[0] is None and caller.admin:
            streams = [s for s in self._in_flight.values()
                       if s.submission.request_id == request_id]
        streams = [s for s in streams if s is not None]
        if not streams:
            raise NotFound(f"no request {clip(request_id)} of yours in flight")
        for stream in streams:
            stream.replica.abort(stream, Outcome.ABORTED, Finish("aborted"))

    def stats(self, caller: Identity) -> pb.Stats:
        """The caller's requests (an admin's: everyone's), the engines' expert counters and
        what admission did."""
        if caller.admin:
            waiting, running, resident, resident_bytes = self.load()
        else:
            _, _, resident, resident_bytes = self.load()
            mine = [s for s in self._in_flight.values() if s.submission.owner == caller.name]
            waiting = sum(s.scheduled_at is None for s in mine)
            running = len(mine) - waiting
        e = self.metrics.experts
        stats = pb.Stats(uptime_s=self.metrics.uptime_s, waiting=waiting, running=running,
                         experts=pb.ExpertStats(hits=e.hits, misses=e.misses, hit_rate=e.hit_rate,
                                                loads=e.loads, evictions=e.evictions,
                                                resident=resident, resident_bytes=resident_bytes,
                                                predictor_calls=e.predictor_calls))
        stats.admission.CopyFrom(admission_to_proto(self.metrics.admission))
        for r in self.replicas:
            speed = getattr(r.backend, "speed", None)
            if speed is not None:
                total = stats.engine_speed
                total.steps += speed.counted
                for field in total.DESCRIPTOR.fields:  # the rest: EngineSpeed's own names
                    name = field.name
                    if name == "prefill_segment_tokens":
                        if not total.prefill_segment_tokens:  # every engine has one profile
                            total.prefill_segment_tokens.extend(speed.prefill_segment_tokens)
                    elif name.startswith("prefill_segment_"):
                        summed = getattr(total, name)
                        mine = getattr(speed, name)
                        if not summed:
                            summed.extend(mine)
                        elif len(summed) == len(mine):
                            summed[:] = [a + b for a, b in zip(summed, mine)]
                    elif name != "steps":
                        setattr(total, name, getattr(total, name) + getattr(speed, name))
        for t in self.metrics.tasks(None if caller.admin else caller.name):
            stats.tasks.append(pb.TaskStats(
                task=t.task, submitted=t.submitted, finished=t.finished, aborted=t.aborted,
                failed=t.failed, slo_met=t.slo_met, slo_attainment=t.slo_attainment,
                output_tokens=t.output_tokens,
                **{name: pb.Durations(**dataclasses.asdict(getattr(t, name)))
                   for name in ("queue", "ttft", "tpot", "total")}))
        return stats

    def server_info(self) -> pb.ServerInfo:
        if self._info is None:
            raise Unavailable("the engine is not warm yet")
        serving, why = self.health()
        return pb.ServerInfo(
            serving=serving, not_serving_reason=why,
            version=emoe.__version__, model=model_info(self._info), policy=self.config.policy,
            tasks=[pb.TaskInfo(name=t.name, ttft_s=t.slo.ttft_s, tpot_s=t.slo.tpot_s,
                               keywords=list(t.keywords)) for t in self.config.tasks.values()],
            default_task=self.config.default_task, max_queue=self.config.max_queue,
            default_max_tokens=self.config.default_max_tokens, workers=self._remote_workers,
            policy_in_force=self.policy_in_force.to_proto() if self.policy_in_force else None)

    # -- RPCs --------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        submission = await self.submission(request, self._caller(context))
        stream = self.admit(submission)
        async with contextlib.aclosing(self.outputs(stream)) as outputs:
            async for out in outputs:
                response = pb.GenerateResponse(request_id=submission.request_id,
                                               token_ids=out.token_ids, text=out.text)
                if out.completion is not None:
                    response.completion.CopyFrom(out.completion)
                yield response

    async def Abort(self, request: pb.AbortRequest,
                    context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        self.abort(request.request_id, self._caller(context))
        return pb.AbortResponse()

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        return self.server_info()

    async def GetStats(self, request: pb.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> pb.Stats:
        return self.stats(self._caller(context))
