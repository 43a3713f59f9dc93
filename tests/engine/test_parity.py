"""emoe's logits match transformers' on checkpoints transformers wrote itself (float32, 1e-4)."""

from __future__ import annotations

import pytest
import torch

from emoe.engine.checkpoint import load_model, save_hf
from emoe.engine.engine import Engine
from emoe.engine.kv_cache import SlotKVCache, StepBatch
from emoe.engine.sampling import SamplingParams

from .conftest import VOCAB

ATOL = 1e-4


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]  # [T, V]


def test_full_prompt(hf_checkpoints, family):
    hf, folder = hf_checkpoints[family]
    model = load_model(folder)
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_cached_decode_batched_different_lengths(hf_checkpoints, family):
    """Mixed prefill (one prompt in two chunks) then token-by-token decode of three sequences of
    different lengths in one batch; every step's logits against transformers' full forward."""
    hf, folder = hf_checkpoints[family]
    model = load_model(folder)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    full = [s + torch.randint(0, VOCAB, (6,), generator=gen).tolist() for s in seqs]
    expected = [_hf_logits(hf, f) for f in full]
    cache = SlotKVCache(model.config, num_slots=4, max_seq_len=64)
    slots = [cache.allocate() for _ in seqs]

    def step(decode, prefill):
        batch = StepBatch(cache, decode, prefill, "cpu")
        ids = [full[i][pos] for i, pos in decode_req]
        for slot, start, n in prefill:
            i = slots.index(slot)
            ids += full[i][start:start + n]
        with torch.inference_mode():
            return model.forward_step(torch.tensor(ids), batch.positions, batch)

    # step 1: prompt 0 whole, prompt 1 first chunk; step 2: prompt 1 rest, prompt 2 whole
    decode_req = []
    out = step([], [(slots[0], 0, 5), (slots[1], 0, 4)])
    torch.testing.assert_close(out[:5], expected[0][:5], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[5:], expected[1][:4], atol=ATOL, rtol=0)
    out = step([], [(slots[1], 4, 7), (slots[2], 0, 2)])
    torch.testing.assert_close(out[:7], expected[1][4:11], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[7:], expected[2][:2], atol=ATOL, rtol=0)
    for k in range(6):
        decode_req = [(i, len(seqs[i]) + k) for i in range(3)]
        out = step([(slots[i], pos) for i, pos in decode_req], [])
        for row, (i, pos) in enumerate(decode_req):
            torch.testing.assert_close(out[row], expected[i][pos], atol=ATOL, rtol=0)


def test_long_prompt_in_two_chunks_takes_the_cpu_prefill_paths(hf_checkpoints, family):
    """A 200-token prompt in chunks of 120 and 80: long enough for the CPU prefill kernels
    (causal attention, grouped experts, RMSNorm, router softmax) when they apply."""
    hf, folder = hf_checkpoints[family]
    model = load_model(folder)
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(6)).tolist()
    expected = _hf_logits(hf, ids)  # [200, V]
    cache = SlotKVCache(model.config, num_slots=1, max_seq_len=256)
    slot = cache.allocate()
    with torch.inference_mode():
        for start, n in ((0, 120), (120, 80)):
            batch = StepBatch(cache, [], [(slot, start, n)], "cpu")
            got = model.forward_step(torch.tensor(ids[start:start + n]), batch.positions, batch)
            torch.testing.assert_close(got, expected[start:start + n], atol=ATOL, rtol=0)


def test_engine_greedy_matches_transformers_generate(hf_checkpoints, family):
    hf, folder = hf_checkpoints[family]
    engine = Engine.from_pretrained(folder, max_batch_size=2, prefill_chunk=8)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 13, 7)]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
        assert out.finish_reason == "length"


def test_save_hf_is_read_by_transformers(hf_checkpoints, family, tmp_path):
    hf, folder = hf_checkpoints[family]
    model = load_model(folder)
    save_hf(model, tmp_path)
    cls = type(hf)
    reloaded = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids), atol=ATOL, rtol=0)


def test_bfloat16_close_to_float32(hf_checkpoints):
    _, folder = hf_checkpoints["mixtral"]
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = load_model(folder)(ids)
        low = load_model(folder, dtype="bfloat16")(ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
