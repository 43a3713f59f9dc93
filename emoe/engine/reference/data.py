"""The multi-task text the reference model learns: five templated task types.

Every example is a prompt and an answer. The prompts follow a recognisable form per task and
carry that task's detection keywords from ``emoe.core.tasks`` (and no other task's keywords),
so keyword-based task detection works on them. The answers are fully determined by the prompt,
so a small model can learn them, but each task needs a different skill:

- classification: sentiment of a sentence with polarity words, flipped by a negation;
- qa: extract the person, object, place or day of the fact in a context that also says
  where someone else lives;
- similarity: whether two sentences mean the same (a paraphrase: active, passive,
  reordered, synonyms) or tell of another event (person, object, place and verb differ);
- summarization: compress a shuffled passage to its one key event;
- conversation: the next bot reply in a templated dialogue (greeting, recalling the user's
  name or city, facts about cities, thanks).

Generation is deterministic for a seed.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("summarization", "classification", "qa", "similarity", "conversation")

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Ivan", "Julia",
         "Karl", "Laura", "Marco", "Nina", "Oscar", "Paula", "Quinn", "Rosa", "Sam", "Tara",
         "Omar", "Vera", "Yuri", "Zoe", "Leo", "Mila", "Noah", "Ella", "Adam", "Lena")
# city -> country, the facts the conversation task asks for.
CITIES = {"Paris": "France", "Rome": "Italy", "Lima": "Peru", "Oslo": "Norway",
          "Cairo": "Egypt", "Tokyo": "Japan", "Berlin": "Germany", "Madrid": "Spain",
          "Dublin": "Ireland", "Vienna": "Austria", "Prague": "Czechia", "Lisbon": "Portugal",
          "Quito": "Ecuador", "Seoul": "Korea", "Sydney": "Australia", "Toronto": "Canada",
          "Boston": "America", "Nairobi": "Kenya", "Athens": "Greece", "Warsaw": "Poland",
          "Geneva": "Switzerland", "Munich": "Germany", "Bergen": "Norway", "Porto": "Portugal"}
PLACES = tuple(CITIES)
OBJECTS = ("lamp", "bike", "book", "piano", "camera", "jacket", "guitar", "laptop", "table",
           "kettle", "radio", "clock", "sofa", "violin", "helmet", "mirror", "teapot",
           "blanket", "printer", "carpet")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# (past tense, base form); the past tense doubles as the past participle.
VERBS = (("bought", "buy"), ("sold", "sell"), ("found", "find"), ("repaired", "repair"),
         ("painted", "paint"), ("borrowed", "borrow"), ("lost", "lose"), ("built", "build"),
         ("delivered", "deliver"), ("cleaned", "clean"))
SYNONYMS = {"bought": "purchased", "repaired": "fixed", "cleaned": "washed", "sold": "traded"}
POSITIVE = ("great", "excellent", "wonderful", "lovely", "superb", "pleasant", "delightful",
            "fantastic", "brilliant", "charming")
NEGATIVE = ("awful", "terrible", "poor", "dreadful", "boring", "broken", "noisy", "ugly",
            "disappointing", "horrible")
INTENSIFIERS = ("", "really ", "very ", "quite ", "truly ")
WEATHER = ("sunny", "rainy", "cold", "warm", "windy", "grey")
COUNTS = ("two", "three", "four", "five", "six")


@dataclass(frozen=True, slots=True)
class Example:
    """One prompt and its answer. ``answer`` starts with a space: it continues the prompt."""

    task: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _classification(rng: random.Random) -> Example:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.3
    adjective = rng.choice(POSITIVE if positive != negated else NEGATIVE)
    name, obj, place = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(PLACES)
    judgement = ("not " if negated else "") + rng.choice(INTENSIFIERS) + adjective
    sentence = rng.choice((
        f"{name} said the {obj} from {place} was {judgement}.",
        f"the {obj} {name} got in {place} was {judgement}.",
        f"for {name}, the new {obj} was {judgement}.",
        f"{name} wrote that the {obj} in {place} was {judgement}.",
    ))
    return Example("classification",
                   f"classify the sentiment of the review.\nreview: {sentence}\nlabel:",
                   " positive" if positive else " negative")


def _qa(rng: random.Random) -> Example:
    (name, neighbour), (place, home) = rng.sample(NAMES, 2), rng.sample(PLACES, 2)
    obj, day, (verb, base) = rng.choice(OBJECTS), rng.choice(DAYS), rng.choice(VERBS)
    sentences = [f"{name} {verb} a {obj} in {place} on {day}.", f"{neighbour} lives in {home}."]
    rng.shuffle(sentences)
    question, answer = rng.choice((
        (f"who {verb} the {obj}?", name),
        (f"what did {name} {base}?", obj),
        (f"where did {name} {base} the {obj}?", place),
        (f"when did {name} {base} the {obj}?", day),
    ))
    return Example("qa", f"context: {' '.join(sentences)}\nquestion: {question}\nanswer:",
                   f" {answer}")


def _active(name: str, verb: str, obj: str, place: str) -> str:
    return f"{name} {verb} the {obj} in {place}."


def _paraphrase(rng: random.Random, name: str, verb: str, obj: str, place: str) -> str:
    verb = SYNONYMS.get(verb, verb) if rng.random() < 0.5 else verb
    return rng.choice((
        f"the {obj} was {verb} by {name} in {place}.",
        f"in {place}, {name} {verb} the {obj}.",
        f"in {place}, the {obj} was {verb} by {name}.",
        _active(name, verb, obj, place),
    ))


def _similarity(rng: random.Random) -> Example:
    name, obj, place = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(PLACES)
    verb = rng.choice(VERBS)[0]
    first = _active(name, verb, obj, place)
    same = rng.random() < 0.5
    if not same:  # another event: every slot differs
        name = rng.choice([n for n in NAMES if n != name])
        obj = rng.choice([o for o in OBJECTS if o != obj])
        place = rng.choice([p for p in PLACES if p != place])
        verb = rng.choice([v for v, _ in VERBS if v != verb])
    second = _paraphrase(rng, name, verb, obj, place)
    if rng.random() < 0.5:
        first, second = second, first
    return Example("similarity",
                   f"are the two sentences similar?\nfirst: {first}\nsecond: {second}\n"
                   f"same meaning:", " yes" if same else " no")


def _summarization(rng: random.Random) -> Example:
    name, friend = rng.sample(NAMES, 2)
    obj, place, day = rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(DAYS)
    verb = rng.choice(VERBS)[0]
    key = rng.choice((
        f"on {day}, {name} {verb} a {rng.choice(POSITIVE + NEGATIVE)} {obj} in {place}.",
        f"{name} {verb} a {obj} in {place} on {day}.",
    ))
    details = [
        f"the weather in {place} was {rng.choice(WEATHER)}.",
        f"{friend}, a friend of {name}, came along.",
        f"people talked about it for {rng.choice(COUNTS)} days.",
        f"it was the {rng.choice(('first', 'second', 'fourth'))} time {name} did so.",
        f"the {obj} was {rng.choice(('old', 'new', 'small', 'large', 'red', 'blue'))}.",
    ]
    sentences = [key] + rng.sample(details, rng.choice((2, 3)))
    rng.shuffle(sentences)
    return Example("summarization",
                   f"summarize the passage in one line.\npassage: {' '.join(sentences)}\nsummary:",
                   f" {name} {verb} a {obj} in {place} on {day}.")


def _conversation(rng: random.Random) -> Example:
    name, home = rng.choice(NAMES), rng.choice(PLACES)
    turns = [(f"hello, I am {name} from {home}.", f"hello {name}, nice to meet you.")]
    owned: list[str] = []
    for _ in range(rng.choice((1, 2, 3))):
        kind = rng.randrange(5)
        if kind == 0:
            city = rng.choice(PLACES)
            turns.append((f"tell me about {city}.", f"{city} is a city in {CITIES[city]}."))
        elif kind == 1:
            turns.append(("please remind me of my name.", f"your name is {name}."))
        elif kind == 2:
            turns.append(("please remind me of my city.", f"you are from {home}."))
        elif kind == 3:
            obj, day = rng.choice(OBJECTS), rng.choice(DAYS)
            owned.append(obj)
            turns.append((f"I bought a {obj} on {day}.", f"nice, enjoy your new {obj}."))
        elif owned:
            turns.append(("tell me my last purchase.", f"you bought a {owned[-1]}."))
        else:
            turns.append(("thanks for the help.", f"you are welcome, {name}."))
    history = "".join(f"user: {u}\nbot: {b}\n" for u, b in turns[:-1])
    user, reply = turns[-1]
    return Example("conversation", f"chat with the bot.\n{history}user: {user}\nbot:",
                   f" {reply}")


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "summarization": _summarization,
    "classification": _classification,
    "qa": _qa,
    "similarity": _similarity,
    "conversation": _conversation,
}


def iter_examples(seed: int, tasks: tuple[str, ...] = TASKS) -> Iterator[Example]:
    """An endless, deterministic stream of examples, the tasks in round-robin order."""
    rng = random.Random(seed)
    while True:
        for task in tasks:
            yield GENERATORS[task](rng)


def generate_examples(n: int, seed: int, tasks: tuple[str, ...] = TASKS,
                      exclude: frozenset[str] = frozenset()) -> list[Example]:
    """``n`` examples (round-robin over ``tasks``) whose prompts are not in ``exclude``."""
    fresh = (e for e in iter_examples(seed, tasks) if e.prompt not in exclude)
    return list(itertools.islice(fresh, n))
