"""``emoe generate`` on a checkpoint folder, with token ids and with text via tokenizer.json."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from emoe.cli import main
from emoe.engine.checkpoint import save_hf
from emoe.engine.config import MoEConfig
from emoe.engine.engine import Engine
from emoe.engine.model import MoEModel
from emoe.engine.sampling import SamplingParams
from emoe.engine.tokenizer import Tokenizer

WORDS = ["<unk>", "</s>"] + [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = MoEConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2,
                    num_kv_heads=2, num_experts=4, top_k=2, max_position_embeddings=64, eos_token_ids=(1,))
    model = MoEModel(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(0)).eval()
    tok = HFTokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return model, save_hf(model, tmp_path_factory.mktemp("cli") / "ckpt", tokenizer=tok)


def test_generate_ids_json(checkpoint, capsys):
    model, folder = checkpoint
    assert main(["generate", str(folder), "--prompt-ids", "3,4,5", "--prompt-ids", "7",
                 "--max-new-tokens", "4", "--ignore-eos", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = Engine(model).generate([[3, 4, 5], [7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert [r["token_ids"] for r in lines] == [e.token_ids for e in expected]


def test_generate_text(checkpoint, capsys):
    _, folder = checkpoint
    assert main(["generate", str(folder), "--prompt", "w1 w2 w3", "--max-new-tokens", "3",
                 "--temperature", "0.8", "--seed", "1", "--ignore-eos"]) == 0
    out = capsys.readouterr()
    assert len(out.out.split()) == 3 and all(w in WORDS for w in out.out.split())
    assert "tokens/s" in out.err
    assert Tokenizer.from_folder(folder).encode("w1 w2 w3") == [3, 4, 5]


def test_generate_bad_input_is_an_error_not_a_traceback(checkpoint, capsys):
    _, folder = checkpoint
    assert main(["generate", str(folder), "--prompt-ids", "3,4", "--top-p", "2"]) == 2
    assert "sampling.top_p" in capsys.readouterr().err
    assert main(["generate", str(folder / "nope"), "--prompt-ids", "3"]) == 2
