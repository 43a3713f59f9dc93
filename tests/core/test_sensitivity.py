import json

import pytest

from emoe.core.errors import ConfigError
from emoe.core.sensitivity import Measurement, SensitivityProfile, load_sensitivity


def m(task, method, layers, slots, agreement, miss, quality=1.0):
    return Measurement(task, method, tuple(layers), slots, agreement, quality, miss)


def profile():
    return SensitivityProfile(
        model="tiny", num_layers=3, num_experts=4, top_k=2, threshold=0.05,
        baseline={"qa": 1.0, "classification": 1.0},
        measurements=[
            # qa, single layer: layer 0 loses 0.5 at miss 0.5 and 0.2 at miss 0.25
            m("qa", "single-layer", [0], 2, 0.5, 0.5), m("qa", "single-layer", [0], 3, 0.8, 0.25),
            m("qa", "single-layer", [1], 2, 0.98, 0.5), m("qa", "single-layer", [1], 3, 1.0, 0.2),
            m("qa", "single-layer", [2], 2, 0.9, 0.4), m("qa", "single-layer", [2], 3, 0.95, 0.2),
            # classification, progressive: layers 0 and 0-1 tolerate it, 0-2 does not
            m("classification", "progressive", [0], 2, 0.98, 0.5),
            m("classification", "progressive", [0, 1], 2, 0.96, 0.5),
            m("classification", "progressive", [0, 1, 2], 2, 0.6, 0.5),
        ])


def test_graded_is_loss_per_missed_mass_fitted_through_the_origin():
    graded = profile().table("graded")
    # layer 0: (0.5 * 0.5 + 0.2 * 0.25) / (0.25 + 0.0625) = 0.96
    assert graded["qa"][0] == pytest.approx(0.96)
    # layer 1: (0.02 * 0.5 + 0 * 0.2) / (0.25 + 0.04)
    assert graded["qa"][1] == pytest.approx(0.01 / 0.29, abs=1e-6)
    # layer 2: (0.1 * 0.4 + 0.05 * 0.2) / (0.16 + 0.04) = 0.25
    assert graded["qa"][2] == pytest.approx(0.25)
    # progressive only: each added layer's loss increment over its miss
    assert graded["classification"] == pytest.approx([0.04, 0.04, 0.72])


def test_binary_single_layer_and_progressive():
    binary = profile().table("binary")
    # single layer at the fewest slots (2): losses 0.5, 0.02, 0.1 against threshold 0.05
    assert binary["qa"] == [1.0, 0.0, 1.0]
    # progressive (the paper): input-side layers 0 and 1 together stay within the threshold
    assert binary["classification"] == [0.0, 0.0, 1.0]


def test_file_round_trip_and_policy_table(tmp_path):
    path = tmp_path / "s.json"
    p = profile()
    p.provenance = {"command": "emoe sensitivity ..."}
    p.to_file(path)
    back = SensitivityProfile.from_file(path)
    assert back.table("graded") == p.table("graded") and back.measurements == p.measurements
    table, source = load_sensitivity(path, "binary", 3, ["qa", "classification", "similarity"])
    assert table["classification"] == [0.0, 0.0, 1.0]
    assert source["mode"] == "binary" and source["file"] == str(path)
    assert source["command"] == "emoe sensitivity ..."
    with pytest.raises(ConfigError, match="4 MoE layers|3 MoE layers"):
        load_sensitivity(path, "graded", 4, ["qa", "classification"])
    with pytest.raises(ConfigError, match="task 'qa' is not one of"):
        load_sensitivity(path, "graded", 3, ["classification"])


def test_bad_files_name_the_field(tmp_path):
    path = tmp_path / "s.json"
    data = profile().to_dict()
    data["measurements"][1]["layers"] = [7]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"measurements\[1\]'.*layers \[7\] outside 0..2"):
        SensitivityProfile.from_file(path)
    path.write_text(json.dumps({"format": "emoe-policy"}))
    with pytest.raises(ConfigError, match="field 'format'"):
        SensitivityProfile.from_file(path)
