import json

import numpy as np
import pytest

from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.policy_file import PolicyConfig
from emoe.core.specs import ModelSpec

from tests.core.loop import TINY_MODEL


def tuned():
    return PolicyConfig(scheduling="emoe", planner="emoe", predictor="last-prompt",
                        prediction_interval=20, experts_per_layer=[1, 2, 3, 4],
                        memory_budget_bytes=5_000, max_batch_tokens=512, max_num_seqs=16,
                        model="tiny", sensitivity={"qa": [0, 0, 1, 1]},
                        expert_frequencies=[[1, 2, 3, 4]] * 4)


def test_round_trip_through_a_file(tmp_path):
    path = tmp_path / "policy.json"
    config = tuned()
    config.to_file(path)
    data = json.loads(path.read_text())
    assert data["format"] == "emoe-policy" and data["version"] == 1
    assert data["tasks"]["qa"]["slo"] == {"ttft_s": 2.0, "tpot_s": 0.15}
    loaded = PolicyConfig.from_file(path)
    assert loaded == config
    np.testing.assert_array_equal(loaded.slots_per_layer(TINY_MODEL), [1, 2, 3, 4])
    np.testing.assert_array_equal(loaded.layer_sensitivity(TINY_MODEL)["qa"], [0, 0, 1, 1])
    # classification tolerates wrong routing everywhere, conversation in its first quarter
    np.testing.assert_array_equal(loaded.layer_sensitivity(TINY_MODEL)["classification"],
                                  [0, 0, 0, 0])
    np.testing.assert_array_equal(loaded.layer_sensitivity(TINY_MODEL)["conversation"],
                                  [0, 1, 1, 1])


def write(tmp_path, **fields):
    path = tmp_path / "p.json"
    data = tuned().to_dict()
    data.update(fields)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("field, value, message", [
    ("prediction_interval", 0, "field 'prediction_interval': a positive integer"),
    ("max_batch_tokens", 1.5, "field 'max_batch_tokens': a positive integer"),
    ("max_num_seqs", 10_000, "field 'max_num_seqs': 10000 exceeds max_batch_tokens"),
    ("experts_per_layer", [1, 0, 1, 1], r"field 'experts_per_layer\[1\]'"),
    ("sensitivity", {"qa": [1, -1]}, "field 'sensitivity.qa'"),
    ("expert_frequencies", [[1, 2], [3]], "field 'expert_frequencies'"),
    ("tasks", {"qa": {"mean_output_tokens": 5}}, "field 'tasks.qa.slo': missing"),
    ("tasks", {"qa": {"mean_output_tokens": 5, "slo": {"ttft_s": 0, "tpot_s": 1}}},
     "field 'tasks.qa.slo'"),
    ("tasks", {"qa": {"mean_output_tokens": 5, "slo": {"ttft_s": 1, "tpot_s": 1},
                      "insensitive_fraction": 2}}, "tasks.qa.insensitive_fraction"),
    ("version", 2, "field 'version'"),
    ("colour", "blue", "unknown field 'colour'"),
])
def test_bad_fields_are_named_with_the_file(tmp_path, field, value, message):
    path = write(tmp_path, **{field: value})
    with pytest.raises(ConfigError, match=message) as info:
        PolicyConfig.from_file(path)
    assert str(path) in str(info.value)


def test_unknown_names_list_valid_ones(tmp_path):
    with pytest.raises(UnknownNameError, match="field 'planner': unknown expert planner 'x'; "
                                               "valid: all, emoe, lru, predict-every, random, static"):
        PolicyConfig.from_file(write(tmp_path, planner="x"))
    with pytest.raises(UnknownNameError, match="field 'sensitivity': unknown task 'poetry'"):
        PolicyConfig.from_file(write(tmp_path, sensitivity={"poetry": [1, 1, 1, 1]}))
    with pytest.raises(UnknownNameError, match="unknown scheduling policy 'lifo'"):
        PolicyConfig(scheduling="lifo")


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read policy file"):
        PolicyConfig.from_file(tmp_path / "missing.json")
    path = tmp_path / "bad.json"
    path.write_text('{\n  "planner": "emoe",\n  oops\n}')
    with pytest.raises(ConfigError, match=r"bad.json:3: not valid JSON"):
        PolicyConfig.from_file(path)


def test_slots_from_an_expert_budget_favour_output_side_layers():
    config = PolicyConfig(planner="emoe", expert_budget_bytes=1_050)  # 10 experts of 100 B
    np.testing.assert_array_equal(config.slots_per_layer(TINY_MODEL), [2, 2, 3, 3])
    assert PolicyConfig(planner="all").slots_per_layer(TINY_MODEL).tolist() == [4] * 4


def test_slots_that_do_not_fit_the_model_are_config_errors():
    with pytest.raises(ConfigError, match="needs 'experts_per_layer' or 'expert_budget_bytes'"):
        PolicyConfig(planner="lru").slots_per_layer(TINY_MODEL)
    with pytest.raises(ConfigError, match="at most 4 per layer"):
        PolicyConfig(planner="lru", experts_per_layer=5).slots_per_layer(TINY_MODEL)
    with pytest.raises(ConfigError, match="3 values for a model with 4 layers"):
        PolicyConfig(planner="lru", experts_per_layer=[1, 1, 1]).slots_per_layer(TINY_MODEL)
    with pytest.raises(ConfigError, match="at least one per layer"):
        PolicyConfig(planner="lru", expert_budget_bytes=300).slots_per_layer(TINY_MODEL)
    with pytest.raises(ConfigError, match="'sensitivity.qa': 2 layers, model has 4"):
        PolicyConfig(sensitivity={"qa": [1, 1]}).layer_sensitivity(TINY_MODEL)
    wide = ModelSpec("wide", 4, 5, 2, 100, 0, 1)
    with pytest.raises(ConfigError, match=r"shape \(4, 4\), model needs \(4, 5\)"):
        tuned().frequencies(wide)
