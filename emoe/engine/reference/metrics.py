"""Quality and routing statistics for the reference model: plain Python and numpy."""

from __future__ import annotations

import re

import numpy as np

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and spacing do not count."""
    return _WORD.findall(text.lower())


def exact_match(prediction: str, reference: str) -> bool:
    return words(prediction) == words(reference)


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over word tokens: longest common subsequence against both lengths."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits along the last axis (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p), 0.0)
    return -terms.sum(axis=-1)


def js_divergence(distributions: np.ndarray) -> float:
    """Generalised Jensen-Shannon divergence (bits) of equally weighted distributions
    ``[K, E]``: entropy of the mixture minus the mean entropy. 0 when all are equal, at most
    log2(K)."""
    p = np.asarray(distributions, dtype=np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    return float(_entropy_bits(p.mean(axis=0)) - _entropy_bits(p).mean())


def normalized_entropy(counts: np.ndarray) -> float:
    """Entropy of the distribution ``counts`` [E] over log2(E): 1 when uniform, 0 when one."""
    p = np.asarray(counts, dtype=np.float64)
    return float(_entropy_bits(p / p.sum()) / np.log2(len(p)))
