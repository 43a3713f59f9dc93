"""Task prompts of any length for a trace's requests: what replay sends instead of random ids.

A trace row gives a task and a prompt length; ``TaskPrompts`` turns it into token ids of the
reference tasks (``emoe.engine.reference.data``) as the model was trained on them: examples of
the request's task, each ``bos + prompt + answer + eos``, one after another, the last one's
prompt without its answer, and of that the last ``input_tokens`` ids (the first of them
replaced by ``bos``). The model's router then sees the task's text, so the routing a replay
causes is the routing of that task, and recording it (``emoe record-routing --trace``) gives
the simulator the very routing the server will see.

Prompts depend only on the seed, the request's id, task and length: the recording pass, the
replay and any rerun build the same ids.
"""

from __future__ import annotations

import random

from pathlib import Path

from emoe.core.errors import ConfigError
from emoe.core.model_config import read_model_config
from emoe.core.request import Request
from emoe.engine.reference.data import GENERATORS, TASKS
from emoe.engine.tokenizer import Tokenizer


class TaskPrompts:
    """``prompts(request)``: ``request.input_tokens`` ids of the request's task."""

    def __init__(self, tokenizer: Tokenizer, bos: int, eos: int, seed: int = 0):
        self.tokenizer, self.bos, self.eos, self.seed = tokenizer, bos, eos, seed

    @classmethod
    def for_checkpoint(cls, folder: str | Path, seed: int = 0) -> "TaskPrompts":
        """With the checkpoint's tokenizer and its bos / first eos token."""
        config, *_ = read_model_config(folder)
        if config.bos_token_id is None or not config.eos_token_ids:
            raise ConfigError(f"{folder}: task prompts need bos_token_id and eos_token_id in "
                              "config.json (use random prompts)")
        return cls(Tokenizer.from_folder(folder), config.bos_token_id, config.eos_token_ids[0],
                   seed)

    def __call__(self, request: Request) -> list[int]:
        generate = GENERATORS.get(request.task)
        if generate is None:
            raise ConfigError(f"task prompts: request {request.id!r} has task "
                              f"{request.task!r}, not one of the reference tasks "
                              f"({', '.join(TASKS)}); use random prompts")
        n = request.input_tokens
        rng = random.Random(f"{self.seed}:{request.id}:{request.task}:{n}")
        encode = self.tokenizer.encode
        ids = encode(generate(rng).prompt)
        while len(ids) < n:  # earlier examples of the task, answered, in front
            example = generate(rng)
            ids = (encode(example.prompt) + encode(example.answer, add_special_tokens=False)
                   + [self.eos] + ids)
        ids = ids[len(ids) - n:]
        ids[0] = self.bos
        return ids
