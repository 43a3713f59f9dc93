"""Fuzzing the request fields: the service answers OK or INVALID_ARGUMENT, nothing else."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoe.rpc.fake import FakeBackend
from emoe.rpc.v1 import scheduler_pb2 as pb
from emoe.rpc.v1 import scheduler_pb2_grpc

from .conftest import serving

UINT32 = st.integers(0, 2**32 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@pytest.fixture(scope="module")
def target():
    """A server on its own event loop thread (hypothesis drives sync clients)."""
    ready, stop = threading.Event(), threading.Event()
    address: list[str] = []

    async def run() -> None:
        async with serving([FakeBackend(max_context=512)]) as server:
            address.append(f"127.0.0.1:{server.port}")
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    with grpc.insecure_channel(address[0]) as channel:
        yield scheduler_pb2_grpc.SchedulerServiceStub(channel)
    stop.set()
    thread.join(10)


def optional(strategy):
    return st.none() | strategy


MAX_TOKENS = st.integers(0, 600) | UINT32


@st.composite
def requests(draw, max_tokens=MAX_TOKENS) -> pb.GenerateRequest:
    r = pb.GenerateRequest(
        request_id=draw(st.text(max_size=300)),
        task=draw(st.sampled_from(["", "qa", "summarization", "classification"]) | st.text(max_size=12)),
        priority=draw(st.integers(-2**31, 2**31 - 1)))
    if draw(st.booleans()):
        r.text = draw(st.text(max_size=200))
    elif draw(st.booleans()):
        r.token_ids.ids.extend(draw(st.lists(st.integers(0, 300) | UINT32, max_size=64)))
    for name in ("ttft_s", "tpot_s"):
        value = draw(optional(st.floats(allow_nan=True, allow_infinity=True)))
        if value is not None:
            setattr(r.slo, name, value)
    s = r.sampling
    for name, strategy in (("max_tokens", max_tokens), ("temperature", FLOATS),
                           ("top_p", FLOATS), ("top_k", UINT32), ("seed", st.integers(0, 2**64 - 1))):
        value = draw(optional(strategy))
        if value is not None:
            setattr(s, name, value)
    s.stop_token_ids.extend(draw(st.lists(st.integers(0, 300) | UINT32, max_size=4)))
    s.ignore_eos = draw(st.booleans())
    return r


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_any_request_is_served_or_invalid_argument(target, request):
    try:
        responses = list(target.Generate(request, timeout=30))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert exc.details()
        return
    final = responses[-1].completion
    assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert final.output_tokens == sum(len(r.token_ids) for r in responses)
    if request.request_id:
        assert {r.request_id for r in responses} == {request.request_id}
