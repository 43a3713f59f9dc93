"""A request's output as text deltas, cut at its first stop string.

OpenAI's ``stop`` strings are matched on the text, not on token ids, so the HTTP front door
matches them here: the output ends before the first occurrence (which is not returned), and
while streaming, text that could be the start of a stop string is held back until it is not.
The token that completed the stop string is the last one counted in the usage.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from emoe.rpc.text import IncrementalDetokenizer


class OutputText:
    __slots__ = ("_detokenizer", "_stops", "_hold", "_pending", "stopped")

    def __init__(self, tokenizer: Tokenizer | None, stops: tuple[str, ...] = ()):
        self._detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def add(self, token_ids: list[int], final: bool) -> tuple[str, int]:
        """(the text to send now, how many of ``token_ids`` it covers). After a stop string
        ``stopped`` is True and the rest of ``token_ids`` is not part of the output."""
        if self._detokenizer is None:  # a model served as token ids only
            return "", len(token_ids)
        if not self._stops:
            return self._detokenizer.add(token_ids, final=final), len(token_ids)
        out = []
        if final and not token_ids:
            self._pending += self._detokenizer.add([], final=True)
        for i, token in enumerate(token_ids):
            last = final and i == len(token_ids) - 1
            self._pending += self._detokenizer.add([token], final=last)
            cut = min((at for at in (self._pending.find(s) for s in self._stops) if at >= 0),
                      default=-1)
            if cut >= 0:
                out.append(self._pending[:cut])
                self._pending = ""
                self.stopped = True
                return "".join(out), i + 1
        keep = 0 if final else min(self._hold, len(self._pending))
        release = len(self._pending) - keep
        out.append(self._pending[:release])
        self._pending = self._pending[release:]
        return "".join(out), len(token_ids)
