"""Normalise what a model's forward returns into ``{task: output}``.

docs/recipe.md: the forward returns a dict ``{task: output}`` (canonical) or a tuple/list whose positions follow
the order of ``losses``. Anything else is a clear error that says what was returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from recon._errors import ReconError


def describe(value: Any) -> str:
    """A short human description of a forward's return value, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


def task_outputs(output: Any, tasks: Sequence[str]) -> dict[str, Any]:
    """Map a forward's return value to ``{task: output}`` in the order of ``tasks``."""
    tasks = list(tasks)
    if isinstance(output, Mapping):
        missing = [t for t in tasks if t not in output]
        if missing:
            raise ReconError(
                f"the model returned {describe(output)} but no output for task(s) {missing}; "
                f"return a dict with one entry per task {tasks}"
            )
        return {t: output[t] for t in tasks}
    if isinstance(output, (tuple, list)):
        if len(output) != len(tasks):
            raise ReconError(
                f"the model returned {describe(output)} but there are {len(tasks)} tasks {tasks}; "
                "return one output per task, in the order of `losses`, or a dict {task: output}"
            )
        return dict(zip(tasks, output, strict=True))
    raise ReconError(
        f"the model returned {describe(output)}; return a dict {{task: output}} "
        f"or a tuple/list in the order of `losses` {tasks}"
    )


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a batch's inputs: a tensor, a tuple/list (``*args``) or a dict (``**kwargs``)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def move_to(value: Any, device: torch.device | str | None) -> Any:
    """Move a tensor, or tensors nested in dicts/tuples/lists, to ``device``."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: move_to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(v, device) for v in value)
    return value
