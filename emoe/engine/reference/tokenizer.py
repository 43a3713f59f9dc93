"""A byte-level BPE tokenizer for the reference model, trained with ``tokenizers``.

Byte-level, so any text round-trips; ``encode`` prepends the bos token (like Mixtral's).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train BPE on ``texts``; the vocabulary stops short of ``vocab_size`` once every word
    of the corpus is one token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """``{"bos": id, "eos": id, "pad": id}``."""
    return {role: tokenizer.token_to_id(token)
            for role, token in zip(("bos", "eos", "pad"), SPECIAL_TOKENS)}


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """``tokenizer.json`` plus the ``tokenizer_config.json`` that Hugging Face loaders read,
    with the chat template that maps messages to the task prompt forms."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
              "eos_token": EOS, "pad_token": PAD, "add_bos_token": True,
              "model_max_length": 512, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE.read_text()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
