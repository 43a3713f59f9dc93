import re

import pytest

from emoe.core.tasks import DEFAULT_TASKS
from emoe.engine.reference.data import (NEGATIVE, POSITIVE, TASKS, generate_examples,
                                        iter_examples)


@pytest.fixture(scope="module")
def examples():
    return generate_examples(2000, seed=3)


def test_task_names_are_the_schedulers():
    assert set(TASKS) == set(DEFAULT_TASKS)


def test_deterministic_for_a_seed_and_different_across_seeds():
    assert generate_examples(50, seed=7) == generate_examples(50, seed=7)
    assert generate_examples(50, seed=7) != generate_examples(50, seed=8)


def test_round_robin_over_tasks(examples):
    assert [e.task for e in examples[:10]] == list(TASKS) * 2


def test_prompts_carry_only_their_own_tasks_keywords(examples):
    # Substring matching is the strictest reading: any whole-word detector agrees with it.
    for e in examples:
        text = e.prompt.lower()
        matched = {name for name, profile in DEFAULT_TASKS.items()
                   if any(k in text for k in profile.keywords)}
        assert matched == {e.task}, e.prompt


def test_answers_continue_the_prompt(examples):
    for e in examples:
        assert e.answer.startswith(" ") and not e.answer.startswith("  ")
        assert e.text == e.prompt + e.answer


def test_classification_label_follows_polarity_and_negation(examples):
    for e in (e for e in examples if e.task == "classification"):
        review = e.prompt.split("review: ")[1]
        tokens = re.findall(r"\w+", review)
        positive = any(t in POSITIVE for t in tokens)
        assert positive != any(t in NEGATIVE for t in tokens)
        expected = positive != ("not" in tokens)
        assert e.answer == (" positive" if expected else " negative")


def test_qa_answers_are_extracted_from_the_context(examples):
    for e in (e for e in examples if e.task == "qa"):
        context = e.prompt.split("\nquestion:")[0]
        assert re.search(rf"\b{e.answer.strip()}\b", context)


def test_summary_is_one_event_of_the_passage(examples):
    for e in (e for e in examples if e.task == "summarization"):
        passage = e.prompt.split("passage: ")[1]
        name, verb, _, obj, _, place, _, day = e.answer.strip(" .").split()
        assert {name, verb, obj, place, day} <= set(re.findall(r"\w+", passage))


def test_similarity_and_conversation_answers():
    examples = generate_examples(1000, seed=5, tasks=("similarity", "conversation"))
    labels = [e.answer for e in examples if e.task == "similarity"]
    assert set(labels) == {" yes", " no"}
    assert 0.35 < labels.count(" yes") / len(labels) < 0.65
    for e in (e for e in examples if e.task == "conversation"):
        assert e.prompt.endswith("\nbot:")
        name = re.search(r"I am (\w+)", e.prompt).group(1)
        if e.prompt.endswith("remind me of my name.\nbot:"):
            assert e.answer == f" your name is {name}."


def test_exclude_skips_prompts():
    held_out = generate_examples(100, seed=1)
    fresh = generate_examples(500, seed=1, exclude=frozenset(e.prompt for e in held_out[:50]))
    assert len(fresh) == 500
    assert not {e.prompt for e in held_out[:50]} & {e.prompt for e in fresh}


def test_stream_is_endless():
    stream = iter_examples(seed=0, tasks=("qa",))
    assert all(next(stream).task == "qa" for _ in range(100))
