"""The simulator's expert cache against the engine's, on the reference model: the same plans
over the same routing (the workload's task prompts, recorded by ``emoe record-routing
--trace``) fetch, evict and hit exactly alike.

The engine runs a few requests of the built-in trace as task prompts under the ``lru`` planner
(fetch on a miss, 5 of 8 experts per layer); every plan it ran is then carried out by the
simulator's backend replaying the recorded routing, step by step.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from emoe.core.experts import MissMode
from emoe.core.model_config import model_spec_from
from emoe.core.routing_trace import read_routing_trace
from emoe.core.specs import get_hardware, hardware_for
from emoe.core.workload import DEFAULT_TRACE, ContextFit, read_trace
from emoe.engine.checkpoint import load_model
from emoe.engine.offload.session import OffloadSession, SessionConfig, SessionRequest
from emoe.engine.reference import REFERENCE_MODEL_DIR
from emoe.engine.reference.prompts import TaskPrompts
from emoe.engine.routing import record_workload
from emoe.sim.backend import SimBackend
from emoe.sim.routing import TraceRouting

CONTEXT, SLOTS = 256, 5


def workload(n: int = 16):
    """The built-in trace's first requests, scaled to the model's context (fresh objects)."""
    return list(ContextFit(CONTEXT, "scale")(itertools.islice(read_trace(DEFAULT_TRACE), n)))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("routing") / "routing.parquet"
    assert record_workload(REFERENCE_MODEL_DIR, workload(), path, max_batch_size=16,
                           max_seq_len=CONTEXT) == 16
    return read_routing_trace(path)


def test_task_prompts_are_the_requests_task_text_of_their_length():
    prompts = TaskPrompts.for_checkpoint(REFERENCE_MODEL_DIR)
    for request in workload(6):
        ids = prompts(request)
        assert len(ids) == request.input_tokens and ids[0] == prompts.bos
        assert ids == prompts(request)  # the recording pass and the replay send the same
        text = prompts.tokenizer.decode(ids)
        assert text.rstrip().endswith(("summary:", "label:", "answer:", "same meaning:",
                                       "bot:")), text


def test_simulated_lru_fetches_exactly_what_the_engine_fetches(recorded):
    session = OffloadSession(load_model(REFERENCE_MODEL_DIR), SessionConfig(
        planner="lru", budget="62.5%", experts_per_layer=[SLOTS] * 4, max_batch_size=16,
        max_seq_len=CONTEXT), model_name="emoe-tiny")
    steps = []
    execute = session.engine.execute

    def logged(plan):
        result = execute(plan)
        steps.append((plan, sorted(result.fetched_on_miss), sorted(result.evicted_on_miss)))
        return result

    session.engine.execute = logged
    prompts = TaskPrompts.for_checkpoint(REFERENCE_MODEL_DIR)
    stats = session.run([SessionRequest(r.id, r.task, prompts(r), r.output_tokens,
                                        ignore_eos=True) for r in workload()],
                        arrivals_per_step=2)

    model = model_spec_from(REFERENCE_MODEL_DIR)
    sim = SimBackend(model=model, hardware=hardware_for(get_hardware("a100-40gb"), model),
                     memory_bytes=1 << 34, routing=TraceRouting(model, {}, recorded),
                     miss_mode=MissMode.FETCH, slots_per_layer=np.full(4, SLOTS))
    requests = {r.id: r for r in workload()}
    for request in requests.values():
        sim.admit(request)
    fetched = 0
    for plan, engine_fetched, engine_evicted in steps:
        result = sim.execute(plan, 0.0)
        assert (sorted(result.fetched_on_miss), sorted(result.evicted_on_miss)) == (
            engine_fetched, engine_evicted)
        fetched += result.bytes_loaded // model.expert_bytes
        for chunk in plan.prefill:
            if chunk.start + chunk.num_tokens == requests[chunk.request_id].input_tokens:
                requests[chunk.request_id].generated_tokens = 1
        for rid in plan.decode:
            requests[rid].generated_tokens += 1
    sim.finish(list(requests.values()), 0.0)
    sim.flush()
    assert fetched == stats.fetches > 0
    for rid, record in stats.requests.items():
        r = requests[rid]
        assert (r.expert_hits, r.expert_misses) == (record.expert_hits, record.expert_misses)
