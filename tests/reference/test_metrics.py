import math

import numpy as np
import pytest

from emoe.engine.reference.metrics import (exact_match, js_divergence, normalized_entropy,
                                          rouge_l_f1, words)


def test_words_ignore_case_and_punctuation():
    assert words(" Anna bought a Lamp.") == ["anna", "bought", "a", "lamp"]


def test_exact_match():
    assert exact_match(" Paris", "Paris.")
    assert not exact_match("Paris Rome", "Paris")


def test_rouge_l_f1():
    assert rouge_l_f1("anna bought a lamp", "anna bought a lamp") == 1.0
    assert rouge_l_f1("lamp", "anna bought a lamp") == pytest.approx(2 * 1 * 0.25 / 1.25)
    # LCS of (a b c d) and (a c b d) is 3: precision = recall = 0.75
    assert rouge_l_f1("a b c d", "a c b d") == pytest.approx(0.75)
    assert rouge_l_f1("x y", "a b") == 0.0
    assert rouge_l_f1("", "") == 1.0 and rouge_l_f1("", "a") == 0.0


def test_js_divergence_bounds():
    assert js_divergence(np.array([[1, 2, 3], [2, 4, 6]])) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(np.array([[1, 0], [0, 1]])) == pytest.approx(1.0)
    assert js_divergence(np.eye(4)) == pytest.approx(2.0)
    mixed = js_divergence(np.array([[0.7, 0.3], [0.3, 0.7]]))
    assert 0 < mixed < 1
    assert js_divergence(np.eye(5)) <= math.log2(5) + 1e-12


def test_normalized_entropy():
    assert normalized_entropy(np.ones(8)) == pytest.approx(1.0)
    assert normalized_entropy(np.array([5, 0, 0, 0])) == pytest.approx(0.0)
    assert 0 < normalized_entropy(np.array([3, 1, 0, 0])) < 1
