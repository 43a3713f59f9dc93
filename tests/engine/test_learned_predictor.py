"""The learned predictor learns structure the frequency average cannot see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emoe.core.errors import ConfigError
from emoe.core.predictor import ExpertPredictor, make_predictor
from emoe.core.routing_trace import RequestRouting, RoutingTrace
from emoe.engine.learned_predictor import (LearnedPredictor, evaluate_recall, load_predictor,
                                           loader, save_predictor, train_predictor)

LAYERS, EXPERTS, K = 2, 4, 2


def alternating_trace(requests: int, start: int = 0) -> RoutingTrace:
    """qa requests alternate between experts {0, 1} and {2, 3} in every layer."""
    out = {}
    for i in range(start, start + requests):
        pair = [0, 1] if i % 2 == 0 else [2, 3]
        ids = np.tile(np.array(pair, dtype=np.int16), (6, LAYERS, 1))  # [tokens, L, K]
        out[f"qa-{i}"] = RequestRouting(f"qa-{i}", "qa", ids, np.ones(ids.shape, np.float32),
                                        ids[:3], np.ones((3, LAYERS, K), np.float32))
    return RoutingTrace("synthetic", LAYERS, EXPERTS, K, out)


class Constant(ExpertPredictor):
    name = "constant"

    def observe(self, task, routing, phase="prefill"):
        pass

    def predict(self, task, phase="prefill"):
        return np.full((LAYERS, EXPERTS), 1.0 / EXPERTS)


def test_learned_predictor_beats_a_constant_one_on_structured_routing(tmp_path):
    torch.manual_seed(0)
    train = alternating_trace(40)
    learned = train_predictor([train], hidden=16, steps=120, lr=1e-2)
    recall = evaluate_recall({"learned": learned, "constant": Constant(LAYERS, EXPERTS)},
                             [train], alternating_trace(10, start=40), fractions=(0.5,))
    assert recall["constant"][0] == pytest.approx(0.5)
    assert recall["learned"][0] > 0.9
    assert recall["oracle"][0] == pytest.approx(1.0)
    # the file round-trips and resolves as learned:FILE
    path = tmp_path / "p.safetensors"
    save_predictor(learned, path, {"recall": recall, "call_seconds": 0.0021})
    net, tasks, report = load_predictor(path)
    assert tasks == ["qa"] and report["recall"] == recall
    again, fresh = loader(str(path))(LAYERS, EXPERTS), LearnedPredictor(learned.net, tasks)
    assert again.call_s == 0.0021  # what the scheduler and the simulator charge per call
    for predictor in (fresh, again):
        predictor.observe("qa", np.array([[3, 3, 0, 0], [3, 3, 0, 0]]))
    np.testing.assert_allclose(again.predict("qa"), fresh.predict("qa"), atol=1e-6)
    assert set(np.argsort(-again.predict("qa")[0])[:2]) == {2, 3}
    with pytest.raises(ConfigError, match="trained for 2 layers x 4 experts"):
        loader(str(path))(3, 4)


def test_a_predictor_file_without_its_call_time_is_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_predictor(train_predictor([alternating_trace(4)], hidden=4, steps=2), path, {})
    with pytest.raises(ConfigError, match="no measured call time.*emoe predictor train"):
        loader(str(path))


def test_unknown_or_bad_predictor_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        make_predictor(f"learned:{tmp_path / 'missing.safetensors'}", LAYERS, EXPERTS)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_predictor(bad)
