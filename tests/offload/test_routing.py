"""Routing traces recorded from the engine: round trip, positions, and bad files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from emoe.core.errors import TraceFormatError
from emoe.core.routing_trace import read_routing_trace
from emoe.engine.offload.session import OffloadSession, SessionConfig, SessionRequest
from emoe.engine.routing import RoutingRecorder

from .conftest import TINY, tiny_model


def test_recorded_trace_round_trips_and_matches_the_router(tmp_path):
    model = tiny_model(seed=4)
    reference = tiny_model(seed=4)
    session = OffloadSession(model, SessionConfig(max_batch_size=3, prefill_chunk=16), "tiny")
    g = torch.Generator().manual_seed(1)
    requests = [SessionRequest(f"r{i}", task, torch.randint(2, 64, (5 + 7 * i,), generator=g).tolist(), 6)
                for i, task in enumerate(("qa", "classification", "conversation", "qa"))]
    path = tmp_path / "routing.parquet"
    recorder = RoutingRecorder.open(path, model, "tiny")
    stats = session.run(requests, recorder=recorder)
    recorder.close()

    trace = read_routing_trace(path)
    assert (trace.model, trace.num_layers, trace.num_experts, trace.top_k) == ("tiny", 3, 4, 2)
    assert set(trace.requests) == {r.request_id for r in requests}
    for r in requests:
        routing = trace.requests[r.request_id]
        generated = stats.requests[r.request_id].token_ids
        assert routing.task == r.task
        assert routing.prefill_ids.shape == (len(r.prompt_ids), TINY.num_layers, TINY.top_k)
        # every generated token but the last is fed back through one decode step
        assert routing.decode_ids.shape == (len(generated) - 1, TINY.num_layers, TINY.top_k)
        # the router's choices over the whole sequence, from a plain causal forward
        sequence = torch.tensor([r.prompt_ids + generated[:-1]])
        with torch.inference_mode():
            _, logits = reference(sequence, return_router_logits=True)
        probs = torch.stack(logits, dim=1).softmax(dim=-1)  # [T, L, E]
        scores, ids = probs.topk(TINY.top_k, dim=-1)  # [T, L, K]
        recorded_ids = torch.cat([torch.from_numpy(routing.prefill_ids),
                                  torch.from_numpy(routing.decode_ids)]).long()
        recorded_scores = torch.cat([torch.from_numpy(routing.prefill_scores),
                                     torch.from_numpy(routing.decode_scores)])
        assert torch.equal(recorded_ids, ids)
        torch.testing.assert_close(recorded_scores, scores, rtol=1e-4, atol=1e-5)


def test_trace_with_wrong_schema_is_rejected_naming_the_column(tmp_path):
    path = tmp_path / "bad.parquet"
    table = pa.table({"request_id": ["a"], "task": ["qa"], "phase": ["prefill"],
                      "token_index": [0], "layer": [0], "expert_ids": [[1, 2]]})
    pq.write_table(table.replace_schema_metadata({
        "emoe.routing_trace.version": "1", "emoe.routing_trace.model": "m",
        "emoe.routing_trace.num_layers": "1", "emoe.routing_trace.num_experts": "4",
        "emoe.routing_trace.top_k": "2"}), path)
    with pytest.raises(TraceFormatError, match="gate_scores"):
        read_routing_trace(path)
    pq.write_table(table, path)
    with pytest.raises(TraceFormatError, match="metadata missing"):
        read_routing_trace(path)
