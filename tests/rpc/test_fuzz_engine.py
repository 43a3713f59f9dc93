"""Fuzzing the service over the real torch engine on the reference model, with innocent
streams beside: a fuzzed request gets OK, INVALID_ARGUMENT or ALREADY_EXISTS, never INTERNAL or
UNKNOWN, and no innocent request ever fails.

Fuzzed requests go in concurrent batches, so they share engine steps with each other and with
the innocent streams. ``benchmarks/rpc_hardening.py`` runs the same at 10,000 requests.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoe.rpc.client import generate_request
from emoe.rpc.local import LocalEngineBackend
from emoe.rpc.v1 import scheduler_pb2 as pb
from emoe.rpc.v1 import scheduler_pb2_grpc

from .conftest import Innocents, stream_once, threaded_server
from .test_engine_e2e import checkpoint  # noqa: F401 - the module-scoped model fixture
from .test_fuzz import UINT32, requests

BATCH = 12
EXAMPLES = 150  # x BATCH fuzzed requests, plus the innocent ones
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS}
# valid requests stay short: a few tokens, the server's default 6 when unset
FUZZ_MAX_TOKENS = st.integers(0, 10) | UINT32
VOCAB = 259  # below the reference model's 960 and the stand-in model's 259
PROMPTS = ["classify the sentiment of the review.\nreview: Sam said the piano was lovely.\nlabel:",
           "chat with the bot.\nuser: hello, I am Karl from Bergen.\nbot:", "hello"]


def optional(strategy):
    return st.none() | strategy


@st.composite
def plausible(draw) -> pb.GenerateRequest:
    """Requests near the edges of what is valid, so most reach the engine."""
    prompt = (draw(st.sampled_from(PROMPTS) | st.text(min_size=1, max_size=40))
              if draw(st.booleans()) else
              draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=60)))
    return generate_request(
        prompt, task=draw(st.sampled_from(["", "qa", "conversation"])),
        ttft_s=draw(optional(st.floats(1e-9, 1e9))), tpot_s=draw(optional(st.floats(1e-9, 1e9))),
        max_tokens=draw(optional(st.integers(1, 8))),
        temperature=draw(optional(st.floats(0, 4, width=32) | st.sampled_from([1e-38, 1e-45]))),
        top_p=draw(optional(st.floats(0, 1, width=32, exclude_min=True))),
        top_k=draw(optional(st.integers(0, 2**32 - 1))),
        seed=draw(optional(st.integers(0, 2**63 - 1))),
        stop_token_ids=draw(st.lists(st.integers(0, VOCAB - 1), max_size=4)),
        ignore_eos=draw(st.booleans()), priority=draw(st.integers(-2**31, 2**31 - 1)))


@pytest.fixture(scope="module")
def engine(checkpoint):  # noqa: F811
    with threaded_server(lambda: [LocalEngineBackend(checkpoint, max_batch_size=8)],
                         default_max_tokens=6) as (server, address):
        yield server, address


def _raw_call(channel: grpc.Channel, raw: bytes):
    call = channel.unary_stream("/emoe.v1.SchedulerService/Generate")
    try:
        responses = list(call(raw, timeout=60))
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, responses


def test_fuzzed_requests_never_fail_and_never_harm_innocent_streams(engine):
    server, address = engine
    outcomes: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(BATCH) as pool, \
            Innocents(address, streams=3) as innocents:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(batch=st.lists(requests(max_tokens=FUZZ_MAX_TOKENS) | plausible(),
                              min_size=BATCH, max_size=BATCH),
               garbage=st.lists(st.binary(max_size=48), max_size=2))
        def fuzz(batch: list[pb.GenerateRequest], garbage: list[bytes]) -> None:
            records = list(pool.map(lambda r: stream_once(stub, r), batch))
            for request, record in zip(batch, records):
                outcomes[record.code] = outcomes.get(record.code, 0) + 1
                assert record.code in ANSWERS, (record.code, record.details, request)
                if record.code == grpc.StatusCode.OK:
                    c = record.completion
                    assert c is not None and c.output_tokens == record.tokens >= 1
                    assert c.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
                else:
                    assert record.details and len(record.details) <= 1024
            for raw in garbage:
                code, _ = _raw_call(channel, raw)
                assert code in ANSWERS, code

        fuzz()
    assert sum(outcomes.values()) == EXAMPLES * BATCH
    assert outcomes.get(grpc.StatusCode.OK, 0) > EXAMPLES * BATCH // 4  # it reaches the engine
    assert innocents.records and innocents.failures() == []
    assert server.service.serving and server.service.in_flight == 0


def test_a_temperature_too_small_to_divide_by_is_greedy(engine):
    """The issue's case: temperature 1e-38 crashed the step and failed the whole batch."""
    _, address = engine
    with grpc.insecure_channel(address) as channel, Innocents(address, streams=3) as innocents:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        tiny = [stream_once(stub, generate_request("hello", max_tokens=4, temperature=t,
                                                   ignore_eos=True))
                for t in (1e-38, 1e-45, 1e-6, 2e-5)]
        greedy = stream_once(stub, generate_request("hello", max_tokens=4, temperature=0.0,
                                                    ignore_eos=True))
    assert [r.code for r in tiny] == [grpc.StatusCode.OK] * 4
    assert all(r.tokens == 4 for r in tiny) and greedy.tokens == 4
    assert innocents.records and innocents.failures() == []
