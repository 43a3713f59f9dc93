import pytest

from emoe.engine.reference.data import generate_examples
from emoe.engine.reference.tokenizer import (SPECIAL_TOKENS, save_tokenizer, special_token_ids,
                                             train_tokenizer)
from emoe.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus():
    return generate_examples(1500, seed=0)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer((e.text for e in corpus), vocab_size=2048)


def test_special_tokens_come_first(tokenizer):
    assert special_token_ids(tokenizer) == {"bos": 0, "eos": 1, "pad": 2}
    assert 256 < tokenizer.get_vocab_size() <= 2048


def test_round_trip_and_bos(tokenizer, corpus):
    for e in corpus[:50]:
        encoding = tokenizer.encode(e.text)
        assert encoding.ids[0] == 0
        assert tokenizer.decode(encoding.ids, skip_special_tokens=True) == e.text
    assert tokenizer.decode(tokenizer.encode("unseen words: Zürich 42!").ids) == "unseen words: Zürich 42!"


def test_prompt_and_answer_tokenise_as_the_whole(tokenizer, corpus):
    for e in corpus[:200]:
        parts = tokenizer.encode(e.prompt).ids + tokenizer.encode(e.answer, add_special_tokens=False).ids
        assert parts == tokenizer.encode(e.text).ids


def test_deterministic(corpus, tokenizer):
    again = train_tokenizer((e.text for e in corpus), vocab_size=2048)
    assert again.to_str() == tokenizer.to_str()


def test_saved_folder_loads_through_the_engine_tokenizer(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    loaded = Tokenizer.from_folder(tmp_path)
    text = "classify the sentiment of the review."
    assert loaded.encode(text) == tokenizer.encode(text).ids
    assert (tmp_path / "tokenizer_config.json").is_file()
    assert all(loaded.token_id(t) is not None for t in SPECIAL_TOKENS)
