import pytest

from emoe.core.errors import UnknownNameError
from emoe.core.policies import POLICIES, make_policy
from emoe.core.policy_file import PolicyConfig
from emoe.core.scheduler import Scheduler

from tests.core.loop import TINY_GPU, TINY_MODEL, make_request, run


def admission_order(scheduling, requests):
    s = Scheduler(TINY_MODEL, TINY_GPU, PolicyConfig(scheduling=scheduling, max_num_seqs=1))
    _, backend = run(s, requests)
    return [p.prefill[0].request_id for p in backend.plans if p.prefill]


def waiting_set():
    # all queued while "first" runs; true output_tokens are the reverse of the expected ones
    return [make_request("first", 0.0, output_tokens=3),
            make_request("a", 0.1, expected=30, output_tokens=2, ttft=5.0),
            make_request("b", 0.2, expected=10, output_tokens=9, ttft=1.0),
            make_request("c", 0.3, expected=20, output_tokens=5, ttft=3.0)]


def test_registry():
    assert sorted(POLICIES) == ["edf", "emoe", "fcfs", "sjf"]
    with pytest.raises(UnknownNameError, match="valid: edf, emoe, fcfs, sjf"):
        make_policy("lifo")


def test_fcfs_orders_by_arrival():
    assert admission_order("fcfs", waiting_set()) == ["first", "a", "b", "c"]


def test_sjf_orders_by_expected_not_true_output():
    assert admission_order("sjf", waiting_set()) == ["first", "b", "c", "a"]


def test_sjf_uses_task_mean_when_no_expectation_given():
    requests = [make_request("first", 0.0, output_tokens=3),
                make_request("conv", 0.1, task="conversation"),  # mean 192
                make_request("cls", 0.2, task="classification")]  # mean 8
    assert admission_order("sjf", requests) == ["first", "cls", "conv"]


@pytest.mark.parametrize("scheduling", ["edf", "emoe"])
def test_deadline_policies_order_by_first_token_deadline(scheduling):
    # deadlines: a 5.1, b 1.2, c 3.3
    assert admission_order(scheduling, waiting_set()) == ["first", "b", "c", "a"]
