"""``emoe eval`` on a tiny random model: the comparison is exact where it must be."""

from __future__ import annotations

import pytest

from emoe.engine.config import MoEConfig
from emoe.engine.evaluate import evaluate, format_tables, token_agreement
from emoe.engine.reference.data import generate_examples
from emoe.engine.reference.tokenizer import special_token_ids, train_tokenizer
from emoe.engine.tokenizer import Tokenizer

from .conftest import tiny_model


@pytest.fixture(scope="module")
def setup():
    examples = generate_examples(10, seed=1)
    inner = train_tokenizer((e.text for e in generate_examples(200, seed=5)), vocab_size=400)
    tokenizer = Tokenizer(inner)
    ids = special_token_ids(inner)
    config = MoEConfig(vocab_size=448, hidden_size=16, intermediate_size=24, num_layers=2,
                       num_heads=2, num_kv_heads=1, num_experts=4, top_k=2,
                       max_position_embeddings=512, eos_token_ids=(ids["eos"],))
    return examples, tokenizer, config


def test_token_agreement_counts_reference_positions():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 5, 3, 4], [1, 2, 3]) == pytest.approx(2 / 3)
    assert token_agreement([1], [1, 2]) == 0.5


def test_eval_is_exact_at_full_budget_and_under_fetch(setup):
    examples, tokenizer, config = setup
    rows = evaluate(lambda: tiny_model(seed=2, config=config), tokenizer, examples,
                    policies=("lru", "emoe"), budgets=("50%", "100%"), max_new_tokens=5)
    assert {(r.policy, r.budget) for r in rows} == {("all", "100%"), ("lru", "50%"),
                                                     ("lru", "100%"), ("emoe", "50%"),
                                                     ("emoe", "100%")}
    assert {r.task for r in rows} == {"summarization", "classification", "qa", "similarity",
                                      "conversation"}
    for r in rows:
        if r.budget == "100%" or r.policy == "lru":
            # all experts resident, or every miss fetched: the all-experts output (fetch waves
            # sum experts in another order and batch size, so up to float rounding)
            assert r.agreement == 1.0 and abs(r.perplexity_change_pct) < 1e-3, r
    emoe_half = [r for r in rows if (r.policy, r.budget) == ("emoe", "50%")]
    assert all(r.hit_rate < 1.0 for r in emoe_half)
    assert any(r.perplexity_change_pct != 0.0 for r in emoe_half)
    table = format_tables(rows)
    assert "| emoe | 50% |" in table and "Perplexity change" in table
