"""Task types: expected output length, SLOs, routing sensitivity and detection keywords.

The paper defines no numeric SLOs; the defaults below are this project's choice, sized so a
Mixtral-8x7B serving deployment can meet them at moderate load (see docs/scheduler.md).
Sensitivity follows the paper's observation 3: classification and similarity tolerate wrong
routing in every layer; conversation and summarisation do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from emoe.core.errors import UnknownNameError
from emoe.core.request import SLO


@dataclass(frozen=True, slots=True)
class TaskProfile:
    """What the scheduler knows of a task type.

    ``insensitive_fraction``: the share of MoE layers, counted from the input side, whose
    routing can be wrong without the output dropping below the similarity threshold; used
    when no measured per-layer ``sensitivity`` table is given.
    """

    name: str
    mean_output_tokens: int
    slo: SLO
    insensitive_fraction: float = 0.0
    sensitivity: tuple[float, ...] | None = None
    keywords: tuple[str, ...] = field(default_factory=tuple)

    def layer_sensitivity(self, num_layers: int) -> tuple[float, ...]:
        """Per-layer sensitivity s in {0, 1} (or a measured weight), input side first."""
        if self.sensitivity is not None:
            if len(self.sensitivity) != num_layers:
                raise ValueError(
                    f"task {self.name!r}: sensitivity has {len(self.sensitivity)} layers, "
                    f"model has {num_layers}")
            return self.sensitivity
        insensitive = round(self.insensitive_fraction * num_layers)
        return tuple(0.0 if i < insensitive else 1.0 for i in range(num_layers))


DEFAULT_TASKS: dict[str, TaskProfile] = {
    t.name: t
    for t in (
        TaskProfile("summarization", 96, SLO(ttft_s=4.0, tpot_s=0.15), 0.25,
                    keywords=("summarize", "summarise", "summary", "tl;dr")),
        TaskProfile("classification", 8, SLO(ttft_s=1.5, tpot_s=0.20), 1.0,
                    keywords=("classify", "sentiment", "label", "category")),
        TaskProfile("qa", 32, SLO(ttft_s=2.0, tpot_s=0.15), 0.5,
                    keywords=("question", "answer", "what", "who", "when", "where")),
        TaskProfile("similarity", 8, SLO(ttft_s=1.5, tpot_s=0.20), 1.0,
                    keywords=("similar", "similarity", "same meaning", "paraphrase")),
        TaskProfile("conversation", 192, SLO(ttft_s=2.0, tpot_s=0.15), 0.25,
                    keywords=("chat", "hello", "hi", "tell me")),
    )
}


def get_task(name: str, tasks: dict[str, TaskProfile] | None = None) -> TaskProfile:
    tasks = DEFAULT_TASKS if tasks is None else tasks
    try:
        return tasks[name]
    except KeyError:
        raise UnknownNameError("task", name, list(tasks)) from None
