"""Input limits before work, on the real engine with innocent streams flowing beside: a 1 MiB and
a 16 MiB prompt are refused with the field and the limit, text is tokenized off the event loop,
malformed messages are INVALID_ARGUMENT, and no message echoes a client's input at length.

The bound: while the large prompts are handled, no innocent stream waits more than
``GAP_BOUND_S`` between two of its messages. Its normal gap is a few milliseconds; before the
limits a 1 MiB prompt froze every stream for 1.3 s and a 16 MiB one for 38 s (issue 11).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from emoe.rpc.client import generate_request
from emoe.rpc.errors import MAX_DETAILS_CHARS
from emoe.rpc.local import LocalEngineBackend
from emoe.rpc.v1 import scheduler_pb2_grpc

from .conftest import Innocents, connected, serving, stream_once, threaded_server
from .test_engine_e2e import checkpoint  # noqa: F401 - the module-scoped model fixture

GAP_BOUND_S = 1.5


def _refused(stub, request) -> grpc.RpcError:
    record = stream_once(stub, request)
    assert record.code != grpc.StatusCode.OK
    return record


def _with_innocents(address: str, work):
    """Runs ``work(stub)`` while innocent streams flow; returns its result and the innocents."""
    with grpc.insecure_channel(address) as channel, Innocents(address, streams=3) as innocents:
        time.sleep(0.3)  # the innocent streams are under way
        result = work(scheduler_pb2_grpc.SchedulerServiceStub(channel))
        time.sleep(0.3)
    return result, innocents


def test_large_prompts_are_refused_before_any_work_while_streams_flow(checkpoint):  # noqa: F811
    with threaded_server(lambda: [LocalEngineBackend(checkpoint, max_batch_size=8)]) as (
            server, address):
        (one, sixteen, ids), innocents = _with_innocents(address, lambda stub: [
            _refused(stub, generate_request("x" * (1 << 20), max_tokens=1)),
            _refused(stub, generate_request("x" * (16 << 20), max_tokens=1)),
            _refused(stub, generate_request([5] * 1_000_000, max_tokens=1))])
        limit, context = server.service.max_prompt_chars, server.service._info.max_context
    assert one.code == grpc.StatusCode.INVALID_ARGUMENT
    assert one.details == (f"text: 1048576 characters; at most {limit} are accepted "
                           "(--max-prompt-chars)")
    assert limit == 16 * context
    assert sixteen.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sixteen.details.startswith("request: 16777") and "at most 4194304" in sixteen.details
    assert ids.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ids.details.startswith("token_ids.ids: 1000000 prompt tokens leave no room")
    assert innocents.records and innocents.failures() == []
    assert max(r.max_gap_s for r in innocents.records) < GAP_BOUND_S


def test_text_is_tokenized_off_the_event_loop(checkpoint):  # noqa: F811
    """With the character limit raised, a 2.5 MB text is tokenized (about 2 s of work here,
    which on the event loop would stall every stream past the bound) while the innocent
    streams keep flowing; it is then refused for its token count."""
    text = "summarize the passage in one line. " * 72_000  # 2.5 MB, 720k tokens
    with threaded_server(lambda: [LocalEngineBackend(checkpoint, max_batch_size=8)],
                         max_prompt_chars=4 << 20) as (server, address):
        error, innocents = _with_innocents(
            address, lambda stub: _refused(stub, generate_request(text, max_tokens=1)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.fullmatch(r"text: 7\d{5} prompt tokens leave no room in the model's context of "
                        r"\d+ tokens", error.details)
    assert innocents.records and innocents.failures() == []
    assert max(r.max_gap_s for r in innocents.records) < GAP_BOUND_S


async def _refused_async(client, request) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in client.stream(request):
            pass
    return err.value


@pytest.mark.anyio
async def test_malformed_messages_and_oversized_echoes():
    async with serving() as server, connected(server) as client:
        garbage = []
        for method in ("Generate", "Abort", "GetStats"):
            multi = client.channel.unary_stream if method == "Generate" else client.channel.unary_unary
            with pytest.raises(grpc.aio.AioRpcError) as err:
                result = multi(f"/emoe.v1.SchedulerService/{method}")(b"\xff\xff\xff\xff")
                if method == "Generate":
                    async for _ in result:
                        pass
                else:
                    await result
            garbage.append(err.value)
        task = await _refused_async(client, generate_request("hi", task="y" * 3_000_000))
        request_id = await _refused_async(client, generate_request("hi", request_id="r" * 3_000_000))
        with pytest.raises(grpc.aio.AioRpcError) as abort:
            await client.abort("a" * 3_000_000)
        stops = await _refused_async(client, generate_request("hi", stop_token_ids=[3] * 100_000))
    for err in garbage:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("request: not a valid emoe.v1.")
    assert task.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert task.details().startswith("task: unknown task 'yyyy") and "(3000000 characters)" in task.details()
    assert request_id.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert request_id.details() == "request_id: 3000000 characters; at most 256"
    assert abort.value.code() == grpc.StatusCode.NOT_FOUND
    assert stops.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stops.details() == "sampling.stop_token_ids: 100000 ids; at most 64"
    for err in (task, request_id, abort.value, stops):
        assert len(err.details()) <= MAX_DETAILS_CHARS


def test_memory_keeper_trims_when_the_server_grew_past_its_slack(monkeypatch):
    from emoe.rpc import memory

    sizes = itertools.chain([100, 150, 400, 120, 130, 500, 480, 470, 460], itertools.repeat(100))
    monkeypatch.setattr(memory, "resident_bytes", lambda: next(sizes))
    trims = []
    keeper = memory.MemoryKeeper(slack_bytes=100, interval_s=0.001)
    keeper._trim = trims.append

    async def run() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(keeper.run(), 0.2)

    asyncio.run(run())
    # baseline 100: 150 is within the slack; 400 -> trim (freed 280); 130 fine; 500 -> trim
    # (freed 20: little, so it looks again later); 470 -> trim; then within the slack
    assert trims == [0, 0, 0]


async def _until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.anyio
async def test_request_messages_are_read_a_few_at_a_time(monkeypatch):
    """One receive slot: a call whose message has not arrived holds it, the next call waits
    for it (a health check does not: it has a slot of its own), a call beyond ``max_waiting``
    is refused at once, the holder is refused once its message is ``timeout_s`` late, and the
    waiting call is then served."""
    from emoe.rpc import intake, server as server_module
    from emoe.rpc.v1 import scheduler_pb2 as pb

    monkeypatch.setattr(server_module, "Intake",
                        lambda: intake.Intake(slots=1, max_waiting=1, timeout_s=1.0))
    async with serving() as server, connected(server) as client:
        slots = server.intake
        never = asyncio.Event()

        async def nothing():  # a request stream that sends no message
            await never.wait()
            yield pb.GenerateRequest()

        generate = client.channel.stream_stream(
            "/emoe.v1.SchedulerService/Generate",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString)
        holder = generate(nothing())
        await _until(slots._free.locked)
        health = await client.health(timeout=5)  # through a slot of its own
        waiting = asyncio.create_task(client.complete([3, 4], max_tokens=2))
        await _until(lambda: slots.waiting == 1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete([3, 4], max_tokens=2)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await holder.read()
        served = await asyncio.wait_for(waiting, 10)
        never.set()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == "request: 1 requests are waiting to be read; retry later"
    assert late.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert late.value.details() == "request: the message did not arrive within 1 s"
    assert served.completion.output_tokens == 2
    assert health == health_pb2.HealthCheckResponse.SERVING


def _memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, bytes."""
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) << 10
    return fields["VmRSS"], fields["VmHWM"]


def test_floods_of_large_messages_take_bounded_memory():
    """48 clients, each on its own connection, send at once to `emoe serve`: 48 prompts of
    16 MiB (over the message limit), then 96 of 4 MiB less 1 KiB (inside it; the prompt is
    refused for its length once parsed). The server's peak memory grows by what its receive
    slots hold (4 messages of at most 5x the message limit, a few copies each), not by what
    the flood sends (before: ~3.6x each 16 MiB message held at once; each refused 4 MiB
    request kept in memory by its exception until the garbage collector ran)."""
    from concurrent.futures import ThreadPoolExecutor

    from emoe.rpc.intake import RECEIVE_SLOTS

    from .conftest import emoe_process, free_port, stop_process

    port = free_port()
    server = emoe_process("serve", "--backend", "fake", "--port", str(port), "--metrics-port",
                          "0", "--log-level", "WARNING")
    address = f"127.0.0.1:{port}"

    def flood(raw: bytes, sends: int) -> tuple[set[grpc.StatusCode], int]:
        """The codes, and how far the server's peak memory rose above its size before."""
        def send(_: int) -> grpc.StatusCode:
            options = [("grpc.max_send_message_length", 1 << 30),
                       ("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
            with grpc.insecure_channel(address, options=options) as channel:
                try:
                    for _ in channel.unary_stream("/emoe.v1.SchedulerService/Generate")(
                            raw, timeout=60):
                        pass
                except grpc.RpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        before = _memory(server.pid)[0]
        with open(f"/proc/{server.pid}/clear_refs", "w") as refs:
            refs.write("5")  # resets the peak (VmHWM)
        with ThreadPoolExecutor(48) as pool:
            codes = set(pool.map(send, range(sends)))
        return codes, _memory(server.pid)[1] - before

    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        over = flood(generate_request("x" * (16 << 20), max_tokens=1).SerializeToString(), 48)
        inside = flood(generate_request("x" * ((4 << 20) - 1024), max_tokens=1)
                       .SerializeToString(), 96)
    finally:
        stop_process(server)
    slots = RECEIVE_SLOTS * 4 * (20 << 20)  # each: the transport limit, a few copies
    assert over[0] == {grpc.StatusCode.RESOURCE_EXHAUSTED} and over[1] < slots
    assert inside[0] == {grpc.StatusCode.INVALID_ARGUMENT} and inside[1] < slots // 2
