"""Continuous batching: join/leave between steps, cache slots, routing, sampling, bad plans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emoe.core.errors import ConfigError
from emoe.core.plan import PrefillChunk, StepPlan
from emoe.engine.config import MoEConfig
from emoe.engine.engine import Engine, PlanError
from emoe.engine.model import MoEModel
from emoe.engine.sampling import SamplingParams

CFG = MoEConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, num_experts=4, top_k=2, max_position_embeddings=64, eos_token_ids=(0,))
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> MoEModel:
    return MoEModel(CFG).init_weights(std=0.3, generator=torch.Generator().manual_seed(0)).eval()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (int(k),), generator=g).tolist()
            for k in torch.randint(2, 20, (n,), generator=g)]


def _alone(model, prompt, sampling=GREEDY) -> list[int]:
    return Engine(model, max_batch_size=1).generate([prompt], sampling)[0].token_ids


def test_generate_batched_equals_alone(model):
    prompts = _prompts(5)
    outs = Engine(model, max_batch_size=3, prefill_chunk=7).generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _alone(model, prompt)
        assert out.prompt_ids == prompt and out.finish_reason == "length"


def test_requests_join_and_leave_between_steps(model):
    engine = Engine(model, max_batch_size=2, prefill_chunk=4)
    a, b, c = _prompts(3, seed=1)
    engine.add_request("a", a, SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.add_request("b", b, GREEDY)
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    def run(plan):
        res = engine.execute(plan)
        for out in res.outputs:
            got[out.request_id] += out.token_ids
        return res

    res = run(StepPlan(prefill=[PrefillChunk("a", 0, len(a)), PrefillChunk("b", 0, 3)]))
    assert set(res.routing) == {"a"} and engine.cache.num_free == 0
    run(StepPlan(decode=["a"], prefill=[PrefillChunk("b", 3, len(b) - 3)]))
    assert "a" not in engine.seqs and engine.cache.num_free == 1  # a finished: slot freed
    engine.add_request("c", c, GREEDY)
    with pytest.raises(PlanError, match="decode: request 'c' has prefilled 0"):
        engine.execute(StepPlan(decode=["c"]))
    run(StepPlan(decode=["b"], prefill=[PrefillChunk("c", 0, len(c))]))
    while engine.seqs:
        run(StepPlan(decode=list(engine.seqs)))
    assert engine.cache.num_free == 2
    for name, prompt, n in (("a", a, 2), ("b", b, 6), ("c", c, 6)):
        assert got[name] == _alone(model, prompt)[:n]


def test_routing_counts_prompt_choices(model):
    engine = Engine(model, max_batch_size=2, prefill_chunk=5)
    prompt = _prompts(1, seed=2)[0] + [3] * 9
    engine.add_request("r", prompt, GREEDY)
    first = engine.execute(StepPlan(prefill=[PrefillChunk("r", 0, 5)]))
    assert first.routing == {} and first.outputs[0].new_tokens == 0
    res = engine.execute(StepPlan(prefill=[PrefillChunk("r", 5, len(prompt) - 5)]))
    counts = res.routing["r"]
    assert counts.shape == (CFG.num_layers, CFG.num_experts) and counts.dtype == np.int64
    _, router_logits = model(torch.tensor([prompt]), return_router_logits=True)
    for layer, rl in enumerate(router_logits):
        expected = np.bincount(rl.topk(CFG.top_k, dim=-1).indices.flatten().numpy(), minlength=CFG.num_experts)
        np.testing.assert_array_equal(counts[layer], expected)


def test_resident_experts_count_every_choice_as_a_hit(model):
    engine = Engine(model, max_batch_size=2, prefill_chunk=5)
    engine.add_request("a", [5, 6, 7, 8, 9, 10, 11], GREEDY)
    engine.add_request("b", [5, 6], GREEDY)
    engine.execute(StepPlan(prefill=[PrefillChunk("a", 0, 5), PrefillChunk("b", 0, 2)]))
    step = engine.execute(StepPlan(decode=["b"], prefill=[PrefillChunk("a", 5, 2)]))
    per_token = CFG.top_k * CFG.num_layers
    outputs = {o.request_id: o for o in step.outputs}
    assert (outputs["a"].expert_hits, outputs["b"].expert_hits) == (2 * per_token, per_token)
    assert all(o.expert_misses == 0 and o.weighted_hits == o.weighted_choices == o.expert_hits
               for o in step.outputs)


def test_plan_errors_name_the_request(model):
    engine = Engine(model, max_batch_size=1)
    engine.add_request("x", [1, 2, 3], GREEDY)
    engine.add_request("y", [1, 2, 3], GREEDY)
    with pytest.raises(PlanError, match="unknown request 'nope'"):
        engine.execute(StepPlan(decode=["nope"]))
    with pytest.raises(PlanError, match="'x' chunk \\[1, 3\\) does not continue"):
        engine.execute(StepPlan(prefill=[PrefillChunk("x", 1, 2)]))
    engine.execute(StepPlan(prefill=[PrefillChunk("x", 0, 3)]))
    with pytest.raises(PlanError, match="no free KV slot for request 'y'"):
        engine.execute(StepPlan(prefill=[PrefillChunk("y", 0, 3)]))
    engine.execute(StepPlan(aborted=[("x", "client went away")]))
    assert "x" not in engine.seqs and engine.cache.num_free == 1


def test_request_errors_name_the_field(model):
    engine = Engine(model, max_batch_size=1, max_seq_len=16)
    with pytest.raises(ConfigError, match="prompt_ids has 17 tokens, longer than the context of 16"):
        engine.add_request("long", list(range(1, 18)), GREEDY)
    with pytest.raises(ConfigError, match="outside \\[0, 64\\)"):
        engine.add_request("v", [1, 64], GREEDY)
    with pytest.raises(ConfigError, match="prompt_ids is empty"):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(ConfigError, match="sampling.stop_token_ids"):
        engine.add_request("s", [1], SamplingParams(stop_token_ids=(99,)))
    with pytest.raises(ConfigError, match="max_seq_len"):
        Engine(model, max_seq_len=65)


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("temperature", float("nan")),
                                          ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                          ("max_new_tokens", 0), ("seed", -3), ("stop_token_ids", (-1,))])
def test_sampling_params_out_of_range(field, value):
    with pytest.raises(ConfigError, match=f"sampling.{field}"):
        SamplingParams(**{field: value})


def test_context_full_finishes_with_length(model):
    engine = Engine(model, max_batch_size=1, max_seq_len=10)
    out = engine.generate([[1] * 8], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"  # 8 + 3 > 10 positions
    assert engine.cache.num_free == 1


def test_stop_tokens_and_eos(model):
    prompt = _prompts(1, seed=3)[0]
    free_run = _alone(model, prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
    stop = free_run[2]
    out = Engine(model).generate([prompt], SamplingParams(max_new_tokens=6, stop_token_ids=(stop,),
                                                          ignore_eos=True))[0]
    assert out.token_ids == free_run[:free_run.index(stop) + 1] and out.finish_reason == "stop"
    eos_model_cfg = CFG.replace(eos_token_ids=(free_run[0],))
    eos_model = MoEModel(eos_model_cfg)
    eos_model.load_state_dict(model.state_dict())
    out = Engine(eos_model).generate([prompt], SamplingParams(max_new_tokens=6))[0]
    assert out.token_ids == free_run[:1] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    prompts = _prompts(4, seed=4)
    params = [SamplingParams(max_new_tokens=8, temperature=1.3, top_p=0.9, top_k=20, seed=s, ignore_eos=True)
              for s in (7, 8, 9, 7)]
    batched = Engine(model, max_batch_size=4).generate(prompts, params)
    for prompt, p, out in zip(prompts, params, batched):
        assert out.token_ids == _alone(model, prompt, p)
    again = Engine(model, max_batch_size=4).generate(prompts, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in batched]
    reseeded = Engine(model).generate(prompts[:1], SamplingParams(
        max_new_tokens=8, temperature=1.3, top_p=0.9, top_k=20, seed=123, ignore_eos=True))
    assert reseeded[0].token_ids != batched[0].token_ids


def test_top_k_one_is_greedy_and_top_p_keeps_mass(model):
    from emoe.engine.sampling import sample
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    g = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    assert {sample(logits, [p], [g])[0] for _ in range(50)} == {1}  # token 1 alone is > 0.5 of the mass
    p = SamplingParams(temperature=1.0, top_k=2, seed=0)
    assert {sample(logits, [p], [g])[0] for _ in range(200)} == {1, 2}
    assert SamplingParams(temperature=2.0, top_k=1).greedy


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 9.9e-6])
def test_a_temperature_below_the_greedy_threshold_is_greedy(temperature):
    from emoe.engine.sampling import GREEDY_BELOW, sample

    p = SamplingParams(temperature=temperature, seed=0)
    assert temperature < GREEDY_BELOW and p.greedy and p.generator(torch.device("cpu")) is None
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    assert sample(logits, [p], [None]) == [1]


def test_sampling_at_small_temperatures_never_makes_nan():
    from emoe.engine.sampling import sample

    logits = torch.tensor([[0.0, 3.0, 2.9, -1e34], [1e34, -1e34, 0.0, 5.0]])
    for t in (1e-5, 1e-4):  # dividing unshifted logits by these overflows float32
        p = SamplingParams(temperature=t, top_p=0.9, top_k=3, seed=0)
        g = [torch.Generator().manual_seed(0) for _ in range(2)]
        assert sample(logits, [p, p], g) == [1, 0]


def test_a_row_with_non_finite_logits_fails_alone():
    from emoe.engine.sampling import SamplingError, sample

    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, float("nan"), 1.0], [float("inf"), 0.0, 0.0]])
    p = SamplingParams(temperature=1.0, seed=0)
    out = sample(logits, [GREEDY, p, GREEDY], [None, torch.Generator().manual_seed(0), None])
    assert out[0] == 1 and all(isinstance(o, SamplingError) for o in out[1:])
    assert "NaN or inf" in str(out[1])


def test_a_request_with_nan_logits_ends_alone_with_an_error(model):
    poisoned = MoEModel(CFG)
    poisoned.load_state_dict(model.state_dict())
    with torch.no_grad():
        poisoned.embed_tokens.weight[13] = float("nan")
    engine = Engine(poisoned, max_batch_size=3)
    out = engine.generate([[5, 6, 7], [5, 13, 7], [8, 9]], GREEDY)
    assert [o.finish_reason for o in out] == ["length", "error", "length"]
    assert "NaN" in out[1].error and out[1].token_ids == []
    assert out[0].token_ids == _alone(model, [5, 6, 7]) and out[2].token_ids == _alone(model, [8, 9])
    assert engine.num_requests == 0 and engine.cache.num_free == 3


def test_reset_drops_every_request_and_frees_every_slot(model):
    engine = Engine(model, max_batch_size=2)
    for rid, prompt in (("a", [1, 2, 3]), ("b", [4, 5])):
        engine.add_request(rid, prompt, GREEDY)
    engine.execute(StepPlan(prefill=[PrefillChunk("a", 0, 3), PrefillChunk("b", 0, 1)]))
    engine.reset()
    assert engine.num_requests == 0 and engine.cache.num_free == 2


def test_bfloat16_engine_runs(model):
    low = MoEModel(CFG).to(torch.bfloat16)
    low.load_state_dict(model.state_dict())
    out = Engine(low, max_batch_size=2).generate(_prompts(2, seed=5), GREEDY)
    assert all(len(o.token_ids) == 6 for o in out)


@pytest.mark.parametrize("max_seq_len", [3, 64])
def test_warm_up_runs_the_prefill_kernels_and_leaves_no_request(model, max_seq_len, monkeypatch):
    from emoe.engine import cpu_kernels

    calls = {"grouped": 0, "attention": 0}
    for name, key in (("grouped_expert_mlp", "grouped"), ("prefill_attention", "attention")):
        real = getattr(cpu_kernels, name)

        def counted(*args, real=real, key=key):
            calls[key] += 1
            return real(*args)

        monkeypatch.setattr(cpu_kernels, name, counted)
    monkeypatch.setattr(cpu_kernels, "FUSED_MAX_TOKENS", 16)  # a 32-token prefill goes grouped
    monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_ROWS", 16)
    engine = Engine(model, max_batch_size=2, max_seq_len=max_seq_len)
    engine.warm_up()
    assert engine.num_requests == 0 and engine.cache.num_free == 2
    long_enough = max_seq_len > 2 * 16 and cpu_kernels._ONEDNN  # oneDNN ships with x86 torch
    assert (calls["grouped"] > 0 and calls["attention"] > 0) == long_enough


def test_a_finished_request_leaves_zeros_so_stale_nan_cannot_reach_the_next(model):
    """Attention gives a shorter request's unwritten positions weight 0, and 0 x NaN is NaN: a
    slot given back is zeroed where its request wrote."""
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    engine.generate([list(range(1, 30))], GREEDY)
    assert engine.cache.k.abs().sum() == 0 and engine.cache.v.abs().sum() == 0
    slot = engine.cache.allocate()
    engine.cache.k[:, slot, :, :40] = float("nan")  # as if a broken request had run in the slot
    engine.cache.v[:, slot, :, :40] = float("nan")
    engine.cache.release(slot, written=40)
    short, long = [5, 6, 7], list(range(1, 30))
    outs = engine.generate([short, long], GREEDY)  # decode batch of unequal lengths
    assert outs[0].token_ids == _alone(model, short) and outs[1].token_ids == _alone(model, long)
