"""`emoe sim --model DIR ... --export-policy P.json`, then `emoe serve --checkpoint DIR --policy
P.json` unchanged: the server accepts it and shows the whole policy in force (GetServerInfo,
the start log line, Prometheus), predictor calls counted."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import generate_latest

from emoe.cli import main
from emoe.core.errors import ConfigError
from emoe.core.policy_file import PolicyConfig
from emoe.rpc import cli
from emoe.rpc.local import REFERENCE_CHECKPOINT

from .conftest import connected, serving
from .test_offload_serve import PROMPTS, parse

pytestmark = pytest.mark.anyio


def export(tmp_path, *flags: str) -> str:
    path = tmp_path / "best.json"
    assert main(["sim", "--model", str(REFERENCE_CHECKPOINT), "--duration", "20", "--fit",
                 "scale", "--no-progress", *flags, "--export-policy", str(path)]) == 0
    return str(path)


async def test_an_exported_policy_is_served_and_reported_whole(tmp_path, caplog):
    sensitivity = REFERENCE_CHECKPOINT.parents[3] / "traces/sensitivity-emoe-tiny.json"
    path = export(tmp_path, "--scheduler", "emoe", "--experts", "emoe", "-p", "3",
                  "--experts-per-layer", "3", "--sensitivity", str(sensitivity))
    exported = json.loads(open(path).read())
    assert exported["model"] == "emoe-tiny"
    assert exported["model_shape"] == {"num_layers": 4, "num_experts": 8, "top_k": 2,
                                       "hidden_size": 128}
    args = parse("serve", "--checkpoint", str(REFERENCE_CHECKPOINT), "--policy", path,
                 "--max-batch-size", "4")
    policy = PolicyConfig.from_file(args.policy)
    backend = cli._local_backend(args, policy)
    caplog.set_level(logging.INFO, logger="emoe.rpc.server")
    async with serving([backend], policy=policy, policy_source=f"policy file {path}") as server, \
            connected(server) as client:
        info = await client.server_info()
        for task, text in PROMPTS:
            await client.complete(text, task=task, max_tokens=4)
        stats = await client.stats()
        scrape = generate_latest(server.metrics.registry).decode()
    p = info.policy_in_force
    assert info.policy == "emoe"
    assert (p.scheduling, p.planner, p.predictor, p.prediction_interval) == (
        "emoe", "emoe", "frequency", 3)
    assert list(p.experts_per_layer) == [3, 3, 3, 3]
    expert_bytes = 3 * 128 * 256 * 4  # float32 on the CPU: the engine's own bytes
    assert p.expert_budget_bytes == 12 * expert_bytes
    assert p.miss_policy == "reroute" and p.tuned_for == "emoe-tiny"
    assert p.sensitivity_source == f"measured (graded s on emoe-tiny, {sensitivity})"
    assert p.max_num_seqs == 4 and p.source == f"policy file {path}"
    assert p.memory_budget_bytes > p.expert_budget_bytes
    assert stats.experts.predictor_calls >= 2  # prompt 1, then every 3rd
    assert f"emoe_predictor_calls_total {float(stats.experts.predictor_calls)}" in scrape
    a = stats.admission  # the emoe scheduler's Eq. 3 costed every admission it planned
    assert a.estimated_s > 0 and 0.01 < a.slowdown_s / a.estimated_s < 100
    assert f"emoe_admission_deferred_total {float(a.deferred)}" in scrape
    assert "emoe_admission_slowdown " in scrape
    assert 'emoe_policy_info{miss_policy="reroute",planner="emoe",predictor="frequency"' in scrape
    assert 'emoe_policy_value{setting="prediction_interval"} 3.0' in scrape
    assert 'emoe_policy_experts_per_layer{layer="3"} 3.0' in scrape
    line = next(r.getMessage() for r in caplog.records if "policy in force" in r.getMessage())
    assert "scheduling=emoe planner=emoe predictor=frequency p=3" in line
    assert f"expert budget={12 * expert_bytes} B (12 experts, 3 per layer) miss=reroute" in line


def test_a_policy_for_another_model_says_which_and_what_differs(tmp_path):
    path = tmp_path / "mixtral.json"
    assert main(["sim", "--duration", "5", "--scheduler", "fcfs", "--experts", "emoe",
                 "--no-progress", "--export-policy", str(path)]) == 0
    args = parse("serve", "--checkpoint", str(REFERENCE_CHECKPOINT), "--policy", str(path))
    with pytest.raises(ConfigError) as info:
        cli._local_backend(args, PolicyConfig.from_file(path))
    message = str(info.value)
    assert "tuned for 'mixtral-8x7b' (32 layers x 8 experts, top-2, hidden 4096)" in message
    assert "used with 'emoe-tiny' (4 layers x 8 experts, top-2, hidden 128)" in message
    assert "num_layers 32 vs 4" in message and "hidden_size 4096 vs 128" in message
