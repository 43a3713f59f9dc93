import numpy as np
import pytest

from emoe.core.allocation import allocate_slots, layer_floor
from emoe.core.errors import ConfigError


def test_allocation_by_marginal_value_hand_checked():
    # 3 layers x 4 experts, floor 2 (top-k): every layer keeps its best 2 (6 slots), then the
    # 2 left go to the highest values not yet kept: layer 1's expert 2 (8) and expert 3 (1),
    # ahead of layer 2's expert 2 (0.5) and layer 0's zeros
    scores = np.array([[4.0, 3.0, 0.0, 0.0],
                       [10.0, 9.0, 8.0, 1.0],
                       [2.0, 1.0, 0.5, 0.0]])
    mask = allocate_slots(scores, total=8, floor=2)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    # one slot fewer: layer 1's expert 3 (1) is the one left out
    np.testing.assert_array_equal(allocate_slots(scores, 7, 2).sum(axis=1), [2, 3, 2])


def test_floor_keeps_top_k_unless_forced_lower_or_the_budget_is_short():
    scores = np.array([[9.0, 8.0, 7.0, 6.0], [0.1, 0.0, 0.0, 0.0]])
    # floor 2: the worthless layer still keeps 2, so every token can use its k experts
    np.testing.assert_array_equal(allocate_slots(scores, 6, 2).sum(axis=1), [4, 2])
    # forced floor 1: the valuable layer takes the slot
    np.testing.assert_array_equal(allocate_slots(scores, 6, 1).sum(axis=1), [4, 2])
    np.testing.assert_array_equal(allocate_slots(scores, 5, 1).sum(axis=1), [4, 1])
    # a budget below floor x layers: an even share, at least 1 per layer
    assert layer_floor(3, 2, 4, 2) == 1
    with pytest.raises(ConfigError, match="cannot give each of 2 layers one"):
        allocate_slots(scores, 1, 2)


def test_ties_prefer_resident_then_usage_then_lower_index_then_the_layer_nearer_the_output():
    zeros = np.zeros((2, 4))
    # no information: expert order, the extra slot to the layer nearer the output
    np.testing.assert_array_equal(allocate_slots(zeros, 5, 2),
                                  [[1, 1, 0, 0], [1, 1, 1, 0]])
    # resident experts win a tie (no load), usage breaks what is left
    resident = np.array([[0, 0, 1, 1], [0, 0, 0, 0]], dtype=bool)
    usage = np.array([[0, 0, 0, 0], [0, 1, 0, 3]], dtype=float)
    np.testing.assert_array_equal(allocate_slots(zeros, 4, 2, usage=usage, prefer=resident),
                                  [[0, 0, 1, 1], [0, 1, 0, 1]])
    # the total never exceeds the model
    assert allocate_slots(zeros, 100, 2).all()
