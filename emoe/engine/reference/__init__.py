"""The project's reference MoE model, trained here on generated multi-task text.

No model hub is reachable and a randomly initialised model routes at random, so emoe trains
its own small Mixtral-architecture model whose routing depends on the task: ``data`` generates
the five task types, ``tokenizer`` trains the BPE tokenizer, ``train`` the model, ``evaluate``
measures quality and task-dependent routing, ``artifact`` writes the checkpoint folder.
The built model ships in ``emoe-tiny/`` (Hugging Face layout); see docs/reference-model.md.
"""

from pathlib import Path

REFERENCE_MODEL_DIR = Path(__file__).parent / "emoe-tiny"
