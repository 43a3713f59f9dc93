"""Trace replay: arrival times, forced output lengths, the simulator's columns and summary."""

from __future__ import annotations

import csv
import time

import pytest

from emoe.core.metrics import REQUEST_COLUMNS
from emoe.rpc.client import EmoeClient
from emoe.rpc.fake import FakeBackend
from emoe.core.request import RequestStatus
from emoe.rpc.replay import TargetModel, replay_file

from .conftest import serving

pytestmark = pytest.mark.anyio

TRACE = [  # arrival_s, input_tokens, output_tokens, task
    (0.00, 12, 5, "qa"), (0.05, 30, 1, "classification"), (0.10, 7, 9, "summarization"),
    (0.10, 100, 10, "conversation"),  # does not fit the 64-token context: scaled (--fit scale)
    (0.20, 3, 4, "similarity"), (0.30, 20, 3, "qa"), (0.40, 9, 7, "qa"), (2.00, 5, 5, "qa"),
]


async def test_replay_sends_at_arrival_times_and_writes_simulator_columns(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    with trace.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arrival_s", "input_tokens", "output_tokens", "task"])
        writer.writerows(TRACE)
    out = tmp_path / "results.csv"
    async with serving([FakeBackend(max_context=64, emit_eos_after=0)]) as server:
        client = EmoeClient(f"127.0.0.1:{server.port}")
        assert await replay_file(trace, client, rate_scale=2.0, limit=7, out=out,
                                 fit="scale") == 0
    with out.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == REQUEST_COLUMNS
    assert len(rows) == 7  # the limit
    by_id = {int(r["id"]): r for r in rows}
    for i, (arrival, input_tokens, output_tokens, task) in enumerate(TRACE[:7]):
        row = by_id[i]
        assert row["status"] == "finished" and row["task"] == task
        if input_tokens + output_tokens > 64:  # scaled by 64 / 110, rounded down
            input_tokens, output_tokens = 58, 5
        # EOS after the first token is ignored: every output is the trace's length
        assert int(row["generated_tokens"]) == int(row["output_tokens"]) == output_tokens
        assert int(row["input_tokens"]) == input_tokens
        assert float(row["arrival_s"]) >= arrival / 2.0 - 1e-3
        assert float(row["arrival_s"]) <= float(row["first_token_at_s"]) <= float(row["finished_at_s"])
    assert float(by_id[6]["arrival_s"]) < 1.0  # the 2.0 s arrival was past the limit
    printed = capsys.readouterr().out
    assert "replay trace.csv" in printed and "7" in printed
    assert "1 of 7 requests (14.3%) exceed the model's context of 64 tokens" in printed


@pytest.mark.parametrize("fit", ["reject", "skip", "scale"])
async def test_replay_fits_requests_longer_than_the_context_by_the_rule(tmp_path, fit, capsys):
    trace = tmp_path / "long.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens,task\n0.0,40,100,conversation\n"
                     "0.0,10,5,qa\n")
    out = tmp_path / "results.csv"
    async with serving([FakeBackend(max_context=64, emit_eos_after=0)]) as server:
        client = EmoeClient(f"127.0.0.1:{server.port}")
        assert await replay_file(trace, client, out=out, fit=fit) == 0
    with out.open() as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert rows["1"]["status"] == "finished"
    assert "1 of 2 requests (50.0%) exceed the model's context of 64 tokens" in capsys.readouterr().out
    if fit == "skip":
        assert "0" not in rows
        return
    long = rows["0"]
    if fit == "reject":  # refused by the server with the reason the simulator gives too
        assert long["status"] == "rejected"
        assert long["reason"] == ("INVALID_ARGUMENT: sampling.max_tokens: prompt (40 tokens) + "
                                  "max_tokens (100) exceeds the model's context of 64 tokens")
    else:  # 64 / 140 of each, rounded down
        assert long["status"] == "finished"
        assert (int(long["input_tokens"]), int(long["generated_tokens"])) == (18, 45)


async def test_replay_with_task_prompts_sends_each_requests_task_text_greedily(tmp_path):
    from emoe.core.workload import read_trace
    from emoe.engine.reference.prompts import TaskPrompts
    from emoe.rpc.local import REFERENCE_CHECKPOINT
    from emoe.rpc.replay import GrpcTarget

    trace = tmp_path / "trace.csv"
    with trace.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arrival_s", "input_tokens", "output_tokens", "task"])
        writer.writerows(TRACE[:3])
    prompts = TaskPrompts.for_checkpoint(REFERENCE_CHECKPOINT)
    backend = FakeBackend(max_context=64)
    backend._vocab = 960  # the reference model's ids are valid here
    sent = {}
    add = backend.add_request

    def received(request_id, prompt, sampling):
        sent[request_id.rpartition("-")[2]] = (prompt, sampling.temperature)
        add(request_id, prompt, sampling)

    backend.add_request = received
    async with serving([backend]) as server:
        target = GrpcTarget(EmoeClient(f"127.0.0.1:{server.port}"), temperature=0.0)
        assert await replay_file(trace, target, prompts=prompts) == 0
    for request in read_trace(trace):  # what emoe record-routing --trace records
        assert sent[request.id] == (prompts(request), 0.0)


async def test_every_prompt_is_made_before_the_first_request_goes_out(tmp_path):
    """Making a task prompt takes up to ~1 ms (text, then the tokenizer); made while the
    replay ran, it held up the event loop that was sending the request just due, which reached
    the server ~0.8 ms late, and its measured TTFT carried it."""
    from emoe.core.metrics import MetricsCollector
    from emoe.core.request import SLO, Request
    from emoe.rpc.replay import replay

    events: list[str] = []

    def prompts(request: Request) -> list[int]:
        events.append(f"prompt {request.id}")
        return [5] * request.input_tokens

    requests = [Request(str(i), 0.0, "qa", 4, 2, SLO(1.0, 1.0)) for i in range(3)]
    with MetricsCollector(tmp_path / "rows.csv") as metrics:
        await replay(requests, Answering(lambda r: events.append(f"send {r.id}")), metrics,
                     prompts=prompts)
    assert events == ["prompt 0", "prompt 1", "prompt 2", "send 0", "send 1", "send 2"]


async def test_the_clients_own_stalls_are_kept_small_and_reported(tmp_path, caplog):
    """Replay freezes its process's objects while it runs (no full garbage collection scans
    them mid-replay) and warns when it sent a request late: here the first send blocks the
    event loop for 30 ms, as a stalled client would."""
    import gc

    from emoe.core.metrics import MetricsCollector
    from emoe.core.request import SLO, Request
    from emoe.rpc.replay import replay

    frozen: list[int] = []

    def sent(request: Request) -> None:
        frozen.append(gc.get_freeze_count())
        if request.id == "0":
            time.sleep(0.03)

    requests = [Request(str(i), 0.001 * i, "qa", 4, 2, SLO(1.0, 1.0)) for i in range(3)]
    with MetricsCollector(tmp_path / "rows.csv") as metrics:
        await replay(requests, Answering(sent), metrics)
    assert len(frozen) == 3 and min(frozen) > 1000 and gc.get_freeze_count() == 0
    warned = [r.getMessage() for r in caplog.records if "after their time" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 requests were sent more than 10 ms")


class Answering:
    """A replay target that answers every request at once, after ``on_send(request)``."""

    def __init__(self, on_send):
        self.on_send = on_send

    async def model(self) -> TargetModel:
        return TargetModel("m", None, 100)

    async def send(self, request, prompt: list[int], start: float):
        self.on_send(request)
        request.first_token_at = request.finished_at = time.monotonic() - start
        request.status, request.generated_tokens = RequestStatus.FINISHED, 2
        return request

    async def close(self) -> None:
        pass
