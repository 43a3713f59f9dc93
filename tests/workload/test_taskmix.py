from collections import Counter
from itertools import islice

import pytest

from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.workload import TaskMix


def test_parse_normalises_weights():
    mix = TaskMix.parse("summarization=0.2, qa=0.3,conversation=0.5")
    assert mix.names == ("summarization", "qa", "conversation")
    assert mix.probabilities == pytest.approx((0.2, 0.3, 0.5))
    assert TaskMix.parse("qa=2,similarity=6").probabilities == pytest.approx((0.25, 0.75))


@pytest.mark.parametrize("spec, error, message", [
    ("qa=0.5,poetry=0.5", UnknownNameError, "unknown task 'poetry'; valid: classification"),
    ("qa", ConfigError, "bad item 'qa'"),
    ("qa=lots", ConfigError, "bad item 'qa=lots'"),
    ("qa=-1", ConfigError, "expected a finite number >= 0"),
    ("qa=0,similarity=0", ConfigError, "all weights are 0"),
])
def test_bad_mixes_are_rejected(spec, error, message):
    with pytest.raises(error, match=message):
        TaskMix.parse(spec)


def test_draws_follow_the_mix_and_repeat_per_seed():
    mix = TaskMix.parse("summarization=0.2,qa=0.3,conversation=0.5")
    n = 40_000
    drawn = list(islice(mix.draw(11), n))
    counts = Counter(drawn)
    for name, p in zip(mix.names, mix.probabilities):
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(counts[name] / n - p) < 4 * sd
    assert drawn[:5000] == list(islice(mix.draw(11), 5000))
    assert drawn[:5000] != list(islice(mix.draw(12), 5000))


def test_zero_weight_tasks_are_never_drawn():
    assert set(islice(TaskMix.parse("qa=1,similarity=0").draw(0), 10_000)) == {"qa"}
