"""The measured step model: the table's interpolation and extrapolation, and prefill steps of
several prompts (their own attended pairs and a cost per extra prompt)."""

from __future__ import annotations

import pytest

from emoe.core.profile import StepSample, StepTimes, attended_pairs, fit_prompt_costs


def test_table_interpolates_and_extrapolates_with_the_last_slope():
    table = StepTimes((1, 64, 128), (0.010, 0.020, 0.040), 0.0, 0.0)
    assert table.table(32) == pytest.approx(0.010 + 0.010 * 31 / 63)
    assert table.table(256) == pytest.approx(0.040 + 0.020 / 64 * 128)


def test_a_falling_last_point_never_makes_a_step_shorter_with_more_tokens():
    # measured on a loaded machine: the longest prompt happened to time below the one before
    table = StepTimes((1, 256, 511), (0.010, 0.060, 0.050), 0.0, 0.0)
    far = table.table(4096)
    assert far >= table.table(511) > 0
    assert far == pytest.approx(0.050 + (0.040 / 510) * (4096 - 511))


# A step table measured on an engine whose pair-free cost is 2 ms + 40 us per token and whose
# attention costs 200 ns per attended pair: the table is convex, the base a line.
PER_PAIR, PER_CHUNK = 2e-7, 8e-4
TOKENS = (1, 16, 64, 128, 192, 255)


def pair_free(tokens: float) -> float:
    return 0.002 + 4e-5 * tokens


def measured_table(per_pair: float = PER_PAIR, per_chunk: float = PER_CHUNK,
                   beyond: float | None = None) -> StepTimes:
    seconds = tuple(pair_free(n) + PER_PAIR * attended_pairs(0, n) for n in TOKENS)
    return StepTimes(TOKENS, seconds, 1e-4, 1e-7, per_pair, per_chunk, beyond)


def prompts_s(steps: StepTimes, chunks: list[tuple[int, int]], decode: int = 0,
              context: int = 0) -> float:
    tokens = sum(n for _, n in chunks) + decode
    return steps.step_s(tokens, decode, context, sum(attended_pairs(s, n) for s, n in chunks),
                        len(chunks))


def test_attended_pairs_counts_each_token_seeing_its_prefix():
    for start, tokens in ((0, 1), (0, 7), (5, 3), (40, 11)):
        brute = sum(1 for i in range(start, start + tokens) for _ in range(i + 1))
        assert attended_pairs(start, tokens) == brute


@pytest.mark.parametrize("tokens", [1, 10, 64, 100, 255])
def test_one_prompt_from_its_start_costs_exactly_the_table(tokens):
    steps = measured_table()
    assert prompts_s(steps, [(0, tokens)]) == pytest.approx(steps.table(tokens))
    assert steps.step_s(tokens, 0, 0) == pytest.approx(steps.table(tokens))  # the default


def test_prompts_cost_their_own_attention_and_what_each_extra_prompt_adds():
    steps = measured_table()
    one = steps.step_s(750, 0, 0)  # one prompt of 750: the table's convex extrapolation
    three = prompts_s(steps, [(0, 250)] * 3)
    # beyond the table the base extends the pair-free line, not the table's convex part
    truth = pair_free(750) + PER_PAIR * 3 * attended_pairs(0, 250) + 2 * PER_CHUNK
    assert three == pytest.approx(truth)
    assert three < one
    pairs_only = StepTimes(steps.tokens, steps.seconds, 0.0, 0.0, PER_PAIR, 0.0)
    assert (prompts_s(pairs_only, [(0, 32)] * 8)
            == pytest.approx(prompts_s(steps, [(0, 32)] * 8) - 7 * PER_CHUNK))
    assert prompts_s(pairs_only, [(0, 32)] * 8) < pairs_only.step_s(256, 0, 0)


def test_past_the_table_the_base_rises_by_its_fitted_slope_whatever_the_last_segment():
    noisy = list(measured_table().seconds)
    noisy[-1] *= 1.3  # a burst of load on the longest prompt steepens the last segment
    steps = StepTimes(TOKENS, tuple(noisy), 0.0, 0.0, PER_PAIR, 0.0, 4e-5)
    assert steps.base(755) - steps.base(255) == pytest.approx(4e-5 * 500)
    assert steps.base(255) == pytest.approx(noisy[-1] - PER_PAIR * attended_pairs(0, 255))


def test_a_chunk_continuing_a_prompt_pays_for_the_prefix_it_attends():
    steps = measured_table()
    later = prompts_s(steps, [(191, 64)])
    assert later - prompts_s(steps, [(0, 64)]) == pytest.approx(PER_PAIR * 64 * 191)
    assert later == pytest.approx(pair_free(64) + PER_PAIR * attended_pairs(191, 64))


def test_decodes_attend_no_pairs_and_without_pair_costs_every_step_costs_its_table():
    steps = measured_table()
    assert steps.step_s(16, 16, 900) == pytest.approx(pair_free(16) + 16e-4 + 9e-5)
    old = measured_table(per_pair=0.0, per_chunk=0.0)  # a profile without multi-prompt steps
    assert old.step_s(8, 8, 900) == pytest.approx(old.table(8) + 8e-4 + 9e-5)
    assert prompts_s(old, [(0, 250)] * 3) == pytest.approx(old.table(750))
    assert prompts_s(old, [(0, 32)] * 8, decode=4, context=400) == pytest.approx(
        old.table(260) + 4e-4 + 4e-5)


def test_the_fit_recovers_the_pair_chunk_and_past_the_table_costs_of_multi_prompt_steps():
    truth = measured_table(beyond=5e-5)
    grid = [[(0, n)] * k for k, n in ((2, 32), (2, 128), (2, 250), (3, 64), (3, 250), (4, 64),
                                      (8, 32))] + [[(128, 127)], [(192, 63)]]
    samples = [StepSample(sum(n for _, n in c), 0, 0, prompts_s(truth, c), tuple(c))
               for c in grid]
    table = StepTimes(truth.tokens, truth.seconds, 0.0, 0.0)
    assert fit_prompt_costs(table, samples) == pytest.approx((PER_PAIR, PER_CHUNK, 5e-5),
                                                             rel=1e-6)
    within = [s for s in samples if s.prefill_tokens <= TOKENS[-1]]
    assert fit_prompt_costs(table, within)[2] is None  # nothing measured past the table
    assert fit_prompt_costs(table, within)[:2] == pytest.approx((PER_PAIR, PER_CHUNK), rel=1e-6)
    assert fit_prompt_costs(table, []) == (0.0, 0.0, None)


def test_decode_only_steps_cost_their_batch_and_mixed_steps_the_line():
    line = measured_table()
    steps = StepTimes(line.tokens, line.seconds, line.per_decode_s, line.per_context_token_s,
                      line.per_pair_s, line.per_chunk_s, line.beyond_s_per_token,
                      decode_batches=(1, 2, 4, 8), decode_base_s=(0.002, 0.003, 0.0036, 0.0044))
    context = 300
    # measured batches exactly, interpolated between them, past the last one its slope
    assert steps.step_s(2, 2, context) == pytest.approx(0.003 + 1e-7 * context)
    assert steps.step_s(3, 3, context) == pytest.approx(0.0033 + 1e-7 * context)
    assert steps.step_s(16, 16, 0) == pytest.approx(0.0044 + 0.0008 / 4 * 8)
    # a step with a prompt chunk keeps the line, and a profile without the table costs
    # decode-only steps by the line too
    assert prompts_s(steps, [(0, 64)], decode=2, context=context) == pytest.approx(
        prompts_s(line, [(0, 64)], decode=2, context=context))
    assert line.step_s(2, 2, context) == pytest.approx(
        line.base(2) + 2 * line.per_decode_s + 1e-7 * context)
