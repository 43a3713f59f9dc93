"""Task detection from a prompt by keyword lists, as eMoE does for requests without a task.

The keyword lists are the tasks' ``TaskProfile.keywords`` (configurable through the task
table the server is given). A keyword matches as whole words, case-insensitively; the task
with the most matches wins, ties going to the task listed first; no match gives the default.
"""

from __future__ import annotations

import re

from emoe.core.tasks import TaskProfile


class TaskDetector:
    def __init__(self, tasks: dict[str, TaskProfile], default: str):
        if default not in tasks:
            raise ValueError(f"default task {default!r} is not one of {sorted(tasks)}")
        self.default = default
        self._patterns = [
            (name, re.compile(r"\b(?:" + "|".join(re.escape(k) for k in profile.keywords) + r")\b",
                              re.IGNORECASE))
            for name, profile in tasks.items() if profile.keywords]

    def detect(self, text: str) -> str:
        best, best_count = self.default, 0
        for name, pattern in self._patterns:
            count = len(pattern.findall(text))
            if count > best_count:
                best, best_count = name, count
        return best
