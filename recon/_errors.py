"""The one exception type for bad input.

A :class:`ReconError` carries a single line that says what is wrong and how to fix it; the CLI prints it
without a traceback and exits with code 2. Failures during the work itself are ordinary exceptions (exit 1).
"""

from __future__ import annotations

from collections.abc import Iterable


class ReconError(ValueError):
    """Bad input from the user (recipe, flag, layer or method name): one line, what is wrong and the fix."""


class NonFiniteLossError(RuntimeError):
    """A task's loss became NaN or infinite during training; names the task and the step."""

    def __init__(self, task: str, step: int, value: float) -> None:
        super().__init__(f"loss of task {task!r} is {value} at step {step}; lower the learning rate or check the data")
        self.task = task
        self.step = step
        self.value = value


def check_finite(tasks: list[str], values: list[float], step: int) -> None:
    """Raise :class:`NonFiniteLossError` for the first task whose loss value is NaN or infinite."""
    import math

    for task, value in zip(tasks, values, strict=True):
        if not math.isfinite(value):
            raise NonFiniteLossError(task, step, value)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``name``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name).lower(), [str(c).lower() for c in choices], n=1, cutoff=0.6)
    if not close:
        return ""
    original = {str(c).lower(): str(c) for c in choices}
    return f" (did you mean {original[close[0]]!r}?)"
