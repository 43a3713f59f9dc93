"""One expert-budget parser for every command: the same spellings, the same errors."""

import pytest

from emoe.cli import main
from emoe.core.budget import ExpertBudget, ExpertBudgetError, parse_size
from emoe.core.errors import ConfigError

CHECKPOINT = "emoe/engine/reference/emoe-tiny"


@pytest.mark.parametrize("text, budget, label, slots", [
    ("5/layer", ExpertBudget(per_layer=5), "5/layer", 160),
    ("5 / Layer", ExpertBudget(per_layer=5), "5/layer", 160),
    ("62.5%", ExpertBudget(fraction=0.625), "62.5%", 160),
    ("0.625", ExpertBudget(fraction=0.625), "62.5%", 160),
    ("1", ExpertBudget(fraction=1.0), "100%", 256),       # a bare number <= 1 is a fraction
    ("60%", ExpertBudget(fraction=0.6), "60%", 153),      # 153.6 rounds down: a cap
    ("40GiB", ExpertBudget(bytes=40 * 2**30), "40GiB", 121),
    ("40gib", ExpertBudget(bytes=40 * 2**30), "40GiB", 121),
    ("2GB", ExpertBudget(bytes=2 * 10**9), "1.863GiB", 5),
    ("64M", ExpertBudget(bytes=64 * 10**6), "61.04MiB", 0),
    ("3.5e10", ExpertBudget(bytes=35 * 10**9), "32.6GiB", 99),
    ("1048576", ExpertBudget(bytes=2**20), "1MiB", 0),
])
def test_every_spelling(text, budget, label, slots):
    parsed = ExpertBudget.parse(text)
    assert parsed == budget and parsed.label == label
    assert parsed.slots(32, 8, expert_bytes=352_321_536) == slots  # Mixtral-8x7B's experts


@pytest.mark.parametrize("text, message", [
    ("lots", "--expert-budget 'lots' is not an expert budget; expected experts per layer "
             "(5/layer), a fraction of all experts (62.5%, 0.625) or a size"),
    ("0", "--expert-budget '0': a fraction of all experts must be in (0%, 100%]"),
    ("150%", "--expert-budget '150%': a fraction of all experts must be in (0%, 100%]"),
    ("0/layer", "--expert-budget '0/layer': at least 1 expert per layer"),
    ("1.5", "--expert-budget '1.5': a byte count must be whole"),
])
def test_errors_name_the_flag_and_what_is_accepted(text, message):
    with pytest.raises(ExpertBudgetError) as info:
        ExpertBudget.parse(text)
    assert str(info.value).startswith(message)


def test_slots_are_checked_against_the_model():
    assert ExpertBudget.parse("2/layer").num_slots(4, 8, 100) == 8
    with pytest.raises(ExpertBudgetError, match="9/layer: the model has 8 experts per layer"):
        ExpertBudget.parse("9/layer").num_slots(4, 8, 100)
    with pytest.raises(ExpertBudgetError, match="holds 3 experts .* at least one per MoE layer"):
        ExpertBudget.parse("300").num_slots(4, 8, 100)


def test_sizes():
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("1.5KiB") == 1536
    with pytest.raises(ConfigError, match="--memory-budget 'x' is not a size"):
        parse_size("x", "--memory-budget")


def test_sim_and_eval_accept_the_same_spellings_and_name_the_flag(capsys):
    from emoe.engine.evaluate import _budget
    from emoe.sim.cli import parse_budget

    for text in ("5/layer", "62.5%", "0.625", "40GiB"):
        assert _budget(text) == text
        assert parse_budget(text)
    for command in (["sim"], ["eval", CHECKPOINT]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--expert-budget", "lots"])
        assert info.value.code == 2
        assert ("argument --expert-budget: 'lots' is not an expert budget; expected experts per "
                "layer (5/layer)") in capsys.readouterr().err


def test_serve_parses_the_budget_with_the_same_rules():
    from emoe.rpc.offload import parse_budget

    assert parse_budget("5/layer") == ExpertBudget(per_layer=5)
    assert parse_budget("50%") == ExpertBudget(fraction=0.5)
    with pytest.raises(ExpertBudgetError, match="--expert-budget 'lots' is not an expert budget"):
        parse_budget("lots")
