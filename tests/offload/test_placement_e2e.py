"""Measured placement end to end on the reference model: ``emoe sensitivity`` on a few
prompts, its file in ``emoe eval`` (with ``--json`` and the ``random`` control), and the
engine's report of generated-token routing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emoe.cli import main
from emoe.core.sensitivity import SensitivityProfile
from emoe.engine.reference import REFERENCE_MODEL_DIR

CHECKPOINT = str(REFERENCE_MODEL_DIR)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sensitivity_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sens") / "sensitivity.json"
    assert main(["sensitivity", CHECKPOINT, "-o", str(path), "--per-task", "1", "--slots", "2",
                 "--max-new-tokens", "8"]) == 0
    return path


def test_sensitivity_profiles_every_task_and_layer(sensitivity_file, capsys):
    profile = SensitivityProfile.from_file(sensitivity_file)
    assert profile.model == "emoe-tiny" and profile.num_layers == 4 and profile.top_k == 2
    assert sorted(profile.tasks) == ["classification", "conversation", "qa", "similarity",
                                     "summarization"]
    # per task: 4 single-layer and 4 progressive runs at 2 experts
    assert len(profile.measurements) == 5 * 8
    for m in profile.measurements:
        assert 0.0 <= m.agreement <= 1.0 and 0.0 < m.miss < 1.0 and m.slots == 2
    graded, binary = profile.table("graded"), profile.table("binary")
    assert all(len(v) == 4 and min(v) >= 0 for v in graded.values())
    assert all(set(v) <= {0.0, 1.0} for v in binary.values())
    provenance = profile.provenance
    assert provenance["prompts"] == {"source": "emoe.engine.reference.data", "seed": 2,
                                     "per_task": 1, "max_new_tokens": 8}
    assert "--per-task 1" in provenance["command"]


def test_eval_uses_the_file_and_writes_json_rows_with_a_random_control(sensitivity_file,
                                                                       tmp_path, capsys):
    rows_path = tmp_path / "rows.json"
    assert main(["eval", CHECKPOINT, "--per-task", "1", "--max-new-tokens", "6",
                 "--policy", "emoe", "--policy", "random", "--random-draws", "2",
                 "--expert-budget", "50%", "--sensitivity", str(sensitivity_file),
                 "--calibration", "traces/routing-emoe-tiny.parquet",
                 "--json", str(rows_path)]) == 0
    out = capsys.readouterr()
    assert f"graded s from {sensitivity_file}" in out.err
    rows = {r["planner"]: r for r in json.loads(rows_path.read_text())}
    assert set(rows) == {"all", "emoe", "random"}
    for row in rows.values():
        assert {"planner", "budget", "agreement", "quality", "perplexity"} <= set(row)
    assert rows["all"]["budget"] == 1.0 and rows["all"]["agreement"] == 1.0
    assert rows["emoe"]["budget"] == 0.5 and sum(rows["emoe"]["slots_per_layer"]) == 16
    # random: the per-layer sizes emoe chose, averaged over its draws
    assert rows["random"]["slots_per_layer"] == rows["emoe"]["slots_per_layer"]
    assert rows["random"]["draws"] == 2 and rows["random"]["agreement_sd"] >= 0.0
    assert min(rows["emoe"]["slots_per_layer"]) >= 2  # every layer keeps top-k
    assert "| random | 50% |" in out.out


def test_engine_reports_generated_token_routing_when_a_request_finishes():
    from emoe.engine.checkpoint import load_model
    from emoe.engine.engine import Engine, fcfs_plan
    from emoe.engine.sampling import SamplingParams

    engine = Engine(load_model(CHECKPOINT), max_batch_size=2)
    engine.add_request("a", [0, 5, 6, 7], SamplingParams(max_new_tokens=5, ignore_eos=True))
    decode_routing, tokens = {}, 0
    while engine.num_requests:
        result = engine.execute(fcfs_plan(engine, ["a"], 64))
        decode_routing.update(result.decode_routing)
        tokens += sum(len(o.token_ids) for o in result.outputs)
    assert tokens == 5
    counts = decode_routing["a"]  # the 4 generated tokens fed back, top-2 in each layer
    np.testing.assert_array_equal(counts.sum(axis=1), [8, 8, 8, 8])
