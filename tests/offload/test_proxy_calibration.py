"""The simulator's accuracy proxy against `emoe eval`, end to end on a tiny case: eval's rows
carry their settings, `emoe calibrate-proxy` replays them in the simulator over the recorded
routing of eval's own prompts, and `emoe sim --accuracy-calibration` weighs its proxy with the
calibration's table and says which calibration it used."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emoe.cli import main
from emoe.core.accuracy import AccuracyCalibration
from emoe.core.estimates import top_experts
from emoe.core.routing_trace import read_routing_trace
from emoe.core.sensitivity import load_sensitivity
from emoe.core.warm_start import routing_frequencies
from emoe.engine.reference import REFERENCE_MODEL_DIR

CHECKPOINT = str(REFERENCE_MODEL_DIR)
HISTORY = "traces/routing-emoe-tiny.parquet"
SENSITIVITY = "traces/sensitivity-emoe-tiny.json"
PROMPTS = ["--seed", "1", "--per-task", "2", "--max-new-tokens", "6"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def weighted_proxy(trace, resident: np.ndarray, weights: dict[str, list[float]]) -> float:
    """The proxy by hand: every recorded choice (prompt and generated tokens) of every request,
    a hit when its expert is resident, each layer weighted by the task's s."""
    hits = choices = 0.0
    layers = np.arange(trace.num_layers)[None, :, None]
    for r in trace.requests.values():
        s = np.asarray(weights[r.task])
        for ids in (r.prefill_ids, r.decode_ids):
            hits += float((resident[layers, ids].sum(axis=(0, 2)) * s).sum())
            choices += float(ids.shape[0] * ids.shape[2] * s.sum())
    return hits / choices


def test_eval_rows_replay_in_the_simulator_and_calibrate_it(tmp_path, capsys):
    # record-routing makes the output's folder, as the documented commands rely on
    prompts, rows_path = tmp_path / "new" / "prompts.parquet", tmp_path / "rows.json"
    assert main(["record-routing", CHECKPOINT, "-o", str(prompts), *PROMPTS]) == 0
    assert main(["eval", CHECKPOINT, *PROMPTS[:2], "--per-task", "2", "--max-new-tokens", "6",
                 "--policy", "static", "--policy", "emoe", "--expert-budget", "25%",
                 "--expert-budget", "50%", "--expert-budget", "5/layer",
                 "--sensitivity", SENSITIVITY, "--calibration", HISTORY,
                 "--json", str(rows_path)]) == 0
    rows = json.loads(rows_path.read_text())
    run = rows[0]["run"]
    assert run["per_task"] == 2 and run["calibration"] == HISTORY
    assert run["sensitivity"] == SENSITIVITY and run["command"].startswith("emoe eval")
    # static ignores s: the same run measured without --sensitivity must read the same proxy
    rows.append({**rows[1], "run": {**run, "sensitivity": None}, "sensitivity": "hand-set"})
    rows_path.write_text(json.dumps(rows))
    capsys.readouterr()

    calibration_path = tmp_path / "calibration.json"
    assert main(["calibrate-proxy", str(rows_path), "--routing-trace", str(prompts),
                 "--sensitivity", SENSITIVITY, "-o", str(calibration_path)]) == 0
    printed = capsys.readouterr().out
    assert "calibration: 7 `emoe eval` runs of emoe-tiny replayed in the simulator" in printed
    calibration = AccuracyCalibration.from_file(calibration_path)
    assert [p["planner"] for p in calibration.points] == ["static", "emoe"] * 3 + ["static"]
    assert calibration.routing.startswith(f"replayed: {prompts} (10 requests)")
    table, _ = load_sensitivity(SENSITIVITY, "graded", 4, list(calibration.sensitivity))
    assert calibration.sensitivity == table
    for point, row in zip(calibration.points, rows[1:]):  # rows[0] is 'all': left out
        assert (point["agreement"], point["quality"]) == (row["agreement"], row["quality"])
        assert point["engine_proxy"] == row["proxy"]

    # static pins the history's most used experts: the proxy is computable by hand
    trace = read_routing_trace(prompts)
    frequencies = routing_frequencies(read_routing_trace(HISTORY))
    for point in [p for p in calibration.points if p["planner"] == "static"]:
        slots = np.asarray(point["slots_per_layer"])
        assert point["sim_slots_per_layer"] == point["slots_per_layer"]
        expected = weighted_proxy(trace, top_experts(frequencies, slots), table)
        assert point["proxy"] == pytest.approx(expected, rel=1e-9)
    assert calibration.points[-1]["proxy"] == calibration.points[0]["proxy"]

    # the simulator uses it: the calibration's table weighs the proxy, named in the output
    out = tmp_path / "sim.json"
    assert main(["sim", "--model", CHECKPOINT, "--routing-trace", str(prompts),
                 "--warm-start", HISTORY, "--scheduler", "fcfs", "--experts", "static",
                 "--expert-budget", "50%", "--accuracy-calibration", str(calibration_path),
                 "--fit", "scale", "--duration", "5", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (f"weights graded s measured on emoe-tiny ({SENSITIVITY}) from the calibration "
            f"{calibration_path} (the planner's sensitivity: hand-set") in printed
    assert f"(calibration {calibration_path}: 7 `emoe eval` runs of emoe-tiny" in printed
    row = json.loads(out.read_text())[0]
    assert row["accuracy_estimate"] == calibration.predict(row["accuracy"])
