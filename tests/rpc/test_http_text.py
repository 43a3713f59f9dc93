"""The HTTP front door's text handling: the reference model's chat template, and stop strings."""

from __future__ import annotations

import json

import pytest

from emoe.engine.reference.data import generate_examples
from emoe.engine.reference.tokenizer import save_tokenizer
from emoe.rpc.fake import byte_tokenizer
from emoe.rpc.http.chat import ChatTemplate, ChatTemplateError
from emoe.rpc.http.output import OutputText
from emoe.rpc.local import REFERENCE_CHECKPOINT

CONFIG = REFERENCE_CHECKPOINT / "tokenizer_config.json"


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate.from_tokenizer_config(CONFIG.read_text())


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def test_the_committed_template_is_the_one_train_tiny_writes(tmp_path):
    from tokenizers import Tokenizer

    save_tokenizer(Tokenizer.from_file(str(REFERENCE_CHECKPOINT / "tokenizer.json")), tmp_path)
    assert (tmp_path / "tokenizer_config.json").read_text() == CONFIG.read_text()


def test_a_whole_prompt_form_is_kept_as_it_is(template):
    for example in generate_examples(25, seed=1):
        assert template.render(user(example.prompt), task=example.task) == "<s>" + example.prompt


@pytest.mark.parametrize("task, content, prompt", [
    ("classification", "Sam said the piano was not lovely.",
     "classify the sentiment of the review.\nreview: Sam said the piano was not lovely.\nlabel:"),
    ("classification", "review: the lamp was great.",
     "classify the sentiment of the review.\nreview: the lamp was great.\nlabel:"),
    ("qa", "context: Ben lives in Rome. Ana found a lamp in Oslo.\nquestion: who found the lamp?",
     "context: Ben lives in Rome. Ana found a lamp in Oslo.\nquestion: who found the lamp?\nanswer:"),
    ("similarity", "first: Ben sold the sofa in Lima.\nsecond: the sofa was sold by Ben in Lima.",
     "are the two sentences similar?\nfirst: Ben sold the sofa in Lima.\n"
     "second: the sofa was sold by Ben in Lima.\nsame meaning:"),
    ("summarization", "Ben found a clock in Rome on Monday. the clock was old.",
     "summarize the passage in one line.\npassage: Ben found a clock in Rome on Monday. "
     "the clock was old.\nsummary:"),
    ("conversation", "hello, I am Karl from Bergen.",
     "chat with the bot.\nuser: hello, I am Karl from Bergen.\nbot:"),
])
def test_one_user_message_fills_its_task_form(template, task, content, prompt):
    assert template.render(user(content), task=task) == "<s>" + prompt


def test_turns_become_a_conversation_and_system_messages_are_dropped(template):
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "hello, I am Karl from Bergen."},
                {"role": "assistant", "content": " hello Karl, nice to meet you."},
                {"role": "user", "content": "please remind me of my name."}]
    assert template.render(messages, task="qa") == (
        "<s>chat with the bot.\nuser: hello, I am Karl from Bergen.\n"
        "bot: hello Karl, nice to meet you.\nuser: please remind me of my name.\nbot:")


def test_the_last_message_must_be_the_users(template):
    with pytest.raises(ChatTemplateError, match="must be from the user"):
        template.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
                        task="conversation")
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "system", "content": "hi"}], task="conversation")


def test_transformers_renders_the_same_tokens(template):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(REFERENCE_CHECKPOINT)
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(REFERENCE_CHECKPOINT / "tokenizer.json"))
    for example in generate_examples(5, seed=2):
        messages = user(example.prompt.split("\n", 1)[1] if example.task != "qa" else example.prompt)
        text = template.render(messages, task=example.task)
        # emoe strips the rendered bos: its tokenizer adds one (docs/http.md)
        assert ours.encode(text.removeprefix("<s>")).ids == hf.apply_chat_template(
            messages, task=example.task, add_generation_prompt=True, tokenize=True,
            return_dict=False)


def test_a_named_template_list_and_added_token_dicts_are_read():
    config = {"chat_template": [{"name": "tool_use", "template": "x"},
                                {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}],
              "bos_token": {"content": "<s>", "special": True}}
    template = ChatTemplate.from_tokenizer_config(json.dumps(config))
    assert template.render(user("hi")) == "<s>hi"
    assert ChatTemplate.from_tokenizer_config(json.dumps({"bos_token": "<s>"})) is None


def _ids(text: str) -> list[int]:
    return byte_tokenizer().encode(text).ids


def test_stop_strings_across_tokens_hold_back_only_what_could_start_one():
    output = OutputText(byte_tokenizer(), ("STOP", "xy"))
    sent = []
    for piece in ("ab", "cS", "T", "Oq", "STO", "P and more"):
        text, used = output.add(_ids(piece), final=False)
        sent.append(text)
        if output.stopped:
            break
    assert "".join(sent) == "abcSTOq"
    assert output.stopped and used == 1  # the "P" that completed the second "STOP"


def test_without_a_stop_the_held_text_is_flushed_at_the_end():
    output = OutputText(byte_tokenizer(), ("STOP",))
    first, _ = output.add(_ids("abcST"), final=False)
    last, used = output.add(_ids("O"), final=True)
    assert first + last == "abcSTO" and used == 1 and not output.stopped
    empty_final = OutputText(byte_tokenizer(), ("zz",))
    assert empty_final.add(_ids("az"), final=False)[0] == "a"
    assert empty_final.add([], final=True) == ("z", 0)
