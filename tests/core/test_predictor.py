import numpy as np
import pytest

from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.predictor import (FrequencyPredictor, LastPromptPredictor, make_predictor,
                                 register_predictor)


def _normalised(counts):
    counts = np.asarray(counts, dtype=float)
    return counts / counts.sum(axis=1, keepdims=True)


def test_nothing_observed_predicts_uniform():
    p = FrequencyPredictor(2, 4)
    np.testing.assert_allclose(p.predict("qa"), np.full((2, 4), 0.25))


def test_first_observation_taken_as_is_then_exponential_average():
    p = FrequencyPredictor(1, 2, decay=0.5)
    p.observe("qa", np.array([[3, 1]]))
    np.testing.assert_allclose(p.predict("qa"), [[0.75, 0.25]])
    p.observe("qa", np.array([[0, 4]]))
    np.testing.assert_allclose(p.predict("qa"), [[0.375, 0.625]])


def test_all_zero_row_counts_as_uniform():
    p = FrequencyPredictor(2, 2)
    p.observe("qa", np.array([[0, 0], [2, 0]]))
    np.testing.assert_allclose(p.predict("qa"), [[0.5, 0.5], [1.0, 0.0]])


def test_unseen_task_falls_back_to_all_tasks():
    p = FrequencyPredictor(1, 2, decay=1.0)
    p.observe("qa", np.array([[1, 3]]))
    np.testing.assert_allclose(p.predict("summarization"), [[0.25, 0.75]])
    p.observe("summarization", np.array([[1, 0]]))
    np.testing.assert_allclose(p.predict("summarization"), [[1.0, 0.0]])
    np.testing.assert_allclose(p.predict("qa"), [[0.25, 0.75]])


def test_batched_folding_equals_one_by_one_average():
    rng = np.random.default_rng(3)
    observations = rng.integers(0, 9, size=(150, 3, 4)) + 1
    p = FrequencyPredictor(3, 4, decay=0.1)
    expected = _normalised(observations[0])
    for i, counts in enumerate(observations):
        p.observe("qa", counts)
        if i:
            expected = 0.9 * expected + 0.1 * _normalised(counts)
        if i in (10, 63, 64, 149):
            np.testing.assert_allclose(p.predict("qa"), expected)


def test_last_prompt_predicts_previous_routing():
    p = LastPromptPredictor(1, 3)
    p.observe("qa", np.array([[1, 1, 2]]))
    p.observe("qa", np.array([[0, 3, 1]]))
    np.testing.assert_allclose(p.predict("qa"), [[0.0, 0.75, 0.25]])


def test_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        FrequencyPredictor(2, 4).observe("qa", np.ones((4, 2)))


def test_bad_decay_is_a_config_error():
    with pytest.raises(ConfigError, match="decay"):
        FrequencyPredictor(1, 2, decay=0.0)


def test_registry():
    assert isinstance(make_predictor("last-prompt", 2, 2), LastPromptPredictor)
    with pytest.raises(UnknownNameError, match="frequency, last-prompt"):
        make_predictor("xlnet", 2, 2)
    register_predictor("test-only", lambda layers, experts: LastPromptPredictor(layers, experts))
    try:
        assert make_predictor("test-only", 2, 2).num_layers == 2
    finally:
        from emoe.core.predictor import PREDICTORS
        del PREDICTORS["test-only"]


def test_prompt_and_generated_token_routing_are_learned_apart():
    p = FrequencyPredictor(1, 2, decay=1.0)
    p.observe("qa", np.array([[3, 1]]))
    # no decode routing seen for qa yet: its prompt's stands in
    np.testing.assert_allclose(p.predict("qa", "decode"), [[0.75, 0.25]])
    p.observe("qa", np.array([[0, 2]]), "decode")
    np.testing.assert_allclose(p.predict("qa", "decode"), [[0.0, 1.0]])
    np.testing.assert_allclose(p.predict("qa", "prefill"), [[0.75, 0.25]])
    # an unseen task: all tasks' estimate of the same phase
    np.testing.assert_allclose(p.predict("summarization", "decode"), [[0.0, 1.0]])
    with pytest.raises(ValueError, match="phase 'generate'"):
        p.observe("qa", np.array([[1, 1]]), "generate")


def test_loader_prefix_names_resolve_once(monkeypatch):
    from emoe.core import predictor as module

    monkeypatch.setattr(module, "PREDICTORS", dict(module.PREDICTORS))
    monkeypatch.setattr(module, "PREDICTOR_LOADERS", {})
    loads = []

    def loader(arg):
        loads.append(arg)
        return lambda layers, experts: LastPromptPredictor(layers, experts)

    assert not module.known_predictor("learned:x.safetensors")
    module.register_predictor_loader("learned", loader)
    assert module.known_predictor("learned:x.safetensors")
    assert not module.known_predictor("learned")
    for _ in range(2):
        assert isinstance(make_predictor("learned:x.safetensors", 2, 4), LastPromptPredictor)
    assert loads == ["x.safetensors"]
    with pytest.raises(UnknownNameError, match="learned:FILE"):
        make_predictor("nope", 2, 4)
