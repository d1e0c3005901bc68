"""Version-tolerant construction of ``transformers.TrainingArguments`` (5.17 .. 5.x).

transformers 5.2x renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name is
a deprecated alias there, and the only name in 5.17); this is the one place that knows.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def training_arguments(*, activation_checkpointing: bool = False, **kwargs: Any):
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if activation_checkpointing:
        key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        kwargs[key] = True
        kwargs.setdefault(f"{key}_kwargs" if f"{key}_kwargs" in names else "gradient_checkpointing_kwargs",
                          {"use_reentrant": False})
    return TrainingArguments(**kwargs)
