"""Simulating the model that serves: a model folder as --model, its recorded routing, its
context (requests that do not fit are rejected with the server's reason)."""

from __future__ import annotations

import json
from pathlib import Path

from emoe.cli import main
from emoe.core.serving import context_error

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "emoe/engine/reference/emoe-tiny"
ROUTING = REPO / "traces/routing-emoe-tiny.parquet"


def test_the_engines_routing_trace_replays_in_the_simulator_of_its_model(tmp_path, capsys):
    summary = tmp_path / "runs.json"
    rc = main(["sim", "--model", str(REFERENCE), "--routing-trace", str(ROUTING),
               "--scheduler", "fcfs", "--experts", "emoe,lru", "--duration", "60",
               "--fit", "scale", "--json", str(summary), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "SIMULATED emoe-tiny" in printed and "routing trace" in printed
    assert "exact: recorded top-k expert ids" in printed
    assert "exceed the model's context of 256 tokens" in printed and "scaled down" in printed
    assert ("uncalibrated: no calibration used (--accuracy-calibration "
            "traces/accuracy-calibration-emoe-tiny.json maps it") in printed
    runs = json.loads(summary.read_text())
    for run in runs:
        summary = run["summary"]
        assert summary["finished"] == summary["requests"] > 0
        assert summary["system"]["synthetic_routing"] is False
        assert 0 < summary["hit_rate"] <= 1


def test_a_routing_trace_of_another_model_is_refused_naming_both(capsys):
    assert main(["sim", "--routing-trace", str(ROUTING), "--duration", "5",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "recorded for 4 layers x 8 experts" in err and "mixtral-8x7b has 32 x 8" in err


def test_requests_longer_than_the_context_are_rejected_with_the_servers_reason(tmp_path):
    trace = tmp_path / "long.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens,task\n"
                     "0.0,32000,769,qa\n0.1,32768,1,qa\n0.2,1000,100,qa\n")
    out = tmp_path / "requests.jsonl"
    assert main(["sim", "--trace", str(trace), "--scheduler", "fcfs", "--experts", "emoe",
                 "--out", str(out), "--no-progress"]) == 0
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["2"]["status"] == "finished"
    for rid, (n_in, n_out) in {"0": (32000, 769), "1": (32768, 1)}.items():
        assert rows[rid]["status"] == "rejected"
        assert rows[rid]["reason"] == ": ".join(context_error(n_in, n_out, 32768))
    assert rows["0"]["reason"] == ("sampling.max_tokens: prompt (32000 tokens) + max_tokens (769) "
                                   "exceeds the model's context of 32768 tokens")
    assert rows["1"]["reason"] == ("token_ids.ids: 32768 prompt tokens leave no room in the model's "
                                   "context of 32768 tokens")


def test_a_bad_model_config_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 8}))
    assert main(["sim", "--model", str(tmp_path), "--no-progress"]) == 2
    assert "config.json: missing field 'max_position_embeddings'" in capsys.readouterr().err


def test_a_warm_start_gives_the_simulated_planner_what_the_engine_session_gets():
    from emoe.core.routing_trace import read_routing_trace
    from emoe.core.warm_start import routing_frequencies
    from emoe.sim.runner import SimConfig, build

    trace = read_routing_trace(ROUTING)
    static, _ = build(SimConfig(model=str(REFERENCE), scheduling="fcfs", planner="static",
                                experts_per_layer=2, warm_start=ROUTING))
    assert (static.planner._frequencies == routing_frequencies(trace)).all()
    emoe, _ = build(SimConfig(model=str(REFERENCE), scheduling="fcfs", planner="emoe",
                              experts_per_layer=2, warm_start=ROUTING))
    assert emoe.planner.predictor.observed
    lengths = {task: len(rs) and sum(len(r.decode_ids) + 1 for r in rs) / len(rs)
               for task, rs in trace.by_task().items()}
    for task, mean in lengths.items():  # Eq. 2's W_o: the history's measured means
        assert emoe.tasks[task].mean_output_tokens == max(1, round(mean))
    cold, _ = build(SimConfig(model=str(REFERENCE), scheduling="fcfs", planner="emoe",
                              experts_per_layer=2))
    assert not cold.planner.predictor.observed
    assert cold.tasks["conversation"].mean_output_tokens != emoe.tasks["conversation"].mean_output_tokens
