"""Load and validate a recipe file (``model.py``), as docs/recipe.md describes it.

Every problem is a :class:`~recon._errors.ReconError` with one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import importlib.util
import keyword
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from recon._errors import ReconError
from recon._outputs import call_model, describe, task_outputs

LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], float]


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe: the model builder, the losses, the data and the optional parts."""

    path: Path
    module: ModuleType
    build_model: Callable[[], torch.nn.Module]
    losses: dict[str, LossFn]
    train_data: Callable[[], Iterable]
    val_data: Callable[[], Iterable] | None = None
    metrics: dict[str, dict[str, tuple[MetricFn, str]]] | None = None
    optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.losses)

    def make_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The recipe's optimizer, or Adam(lr=1e-3) as docs/recipe.md fixes."""
        params = list(params)
        if self.optimizer is None:
            return torch.optim.Adam(params, lr=1e-3)
        opt = self.optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ReconError(f"{self.path}: optimizer(params) returned {describe(opt)}; return a torch.optim.Optimizer")
        return opt

    def first_batch(self, which: str = "train_data") -> tuple[Any, dict[str, Any]]:
        """The first ``(inputs, targets)`` batch of ``train_data`` (or ``val_data``), checked for form."""
        return first_batch(self, which)

    def example_args(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the first training batch's inputs: the example ``recon.split`` and
        ``recon.load_split`` capture a model with when torch.fx cannot trace it."""
        from recon._capture import example_args

        return example_args(self.first_batch()[0])

    def check(self, *, device: torch.device | str | None = None) -> torch.nn.Module:
        """Build the model and run one forward and the losses on the first batch; returns the model.

        Fails early with one line (a ``ReconError``) naming what the recipe gets wrong (docs/recipe.md).
        """
        return check_recipe(self, device=device)


def validate_tasks(tasks: Iterable[Any], where: str) -> list[str]:
    """Task names must be Python identifiers without dots (they become submodule names)."""
    tasks = list(tasks)
    if not tasks:
        raise ReconError(f"{where}: `losses` is empty; define one loss per task, e.g. {{'left': F.cross_entropy}}")
    bad = [t for t in tasks if not isinstance(t, str) or not t.isidentifier() or keyword.iskeyword(t)]
    if bad:
        raise ReconError(
            f"{where}: task name(s) {bad!r} are not valid Python identifiers; rename them "
            "(letters, digits and underscores, e.g. 'depth_l1'), they become submodule names"
        )
    return tasks


def _import(path: Path) -> ModuleType:
    name = f"recon_recipe_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ReconError(f"{path}: cannot be imported as a Python module; give a .py file")
    module = importlib.util.module_from_spec(spec)
    # The recipe's own folder goes first on sys.path so it can import its neighbours.
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ReconError(f"{path}:{e.lineno}: syntax error: {e.msg}; fix the recipe file") from e
    except ReconError:
        raise
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise ReconError(
            f"{path}: importing the recipe raised {type(e).__name__}: {e} "
            f"(at {Path(frame.filename).name}:{frame.lineno}); fix the recipe so it imports"
        ) from e
    return module


def _callable(module: ModuleType, path: Path, name: str, *, required: bool, signature: str) -> Any:
    value = getattr(module, name, None)
    if value is None:
        if required:
            raise ReconError(f"{path}: no `{name}` defined; add `def {signature}:` at module level")
        return None
    if not callable(value):
        raise ReconError(f"{path}: `{name}` is {describe(value)}, not a function; define `def {signature}:`")
    return value


def load_recipe(path: str | Path) -> Recipe:
    """Import a recipe file and check its module-level names (not yet its data or forward)."""
    path = Path(path)
    if not path.exists():
        raise ReconError(f"{path}: no such file; give the path of a recipe .py file (see examples/)")
    if path.is_dir() or path.suffix != ".py":
        raise ReconError(f"{path}: not a .py file; give the path of a recipe .py file (see examples/)")
    module = _import(path)
    build_model = _callable(module, path, "build_model", required=True, signature="build_model()")
    train_data = _callable(module, path, "train_data", required=True, signature="train_data()")
    val_data = _callable(module, path, "val_data", required=False, signature="val_data()")
    optimizer = _callable(module, path, "optimizer", required=False, signature="optimizer(params)")

    losses = getattr(module, "losses", None)
    if losses is None:
        raise ReconError(f"{path}: no `losses` defined; add `losses = {{task: loss_fn(output, target)}}`")
    if callable(losses) and not isinstance(losses, Mapping):
        losses = losses()
    if not isinstance(losses, Mapping):
        raise ReconError(f"{path}: `losses` is {describe(losses)}; make it a dict {{task: loss_fn(output, target)}}")
    tasks = validate_tasks(losses, str(path))
    not_callable = [t for t in tasks if not callable(losses[t])]
    if not_callable:
        raise ReconError(
            f"{path}: losses for {not_callable} are not functions; map each task to loss_fn(output, target)"
        )

    metrics = getattr(module, "metrics", None)
    if metrics is not None:
        metrics = _check_metrics(metrics, tasks, path)
    return Recipe(path, module, build_model, dict(losses), train_data, val_data, metrics, optimizer)


def _check_metrics(metrics: Any, tasks: list[str], path: Path) -> dict:
    if callable(metrics) and not isinstance(metrics, Mapping):
        metrics = metrics()
    if not isinstance(metrics, Mapping):
        raise ReconError(
            f"{path}: `metrics` is {describe(metrics)}; make it {{task: {{name: (fn, 'higher'|'lower')}}}}"
        )
    unknown = [t for t in metrics if t not in tasks]
    if unknown:
        raise ReconError(f"{path}: `metrics` names unknown task(s) {unknown}; use tasks from `losses`: {tasks}")
    for task, named in metrics.items():
        if not isinstance(named, Mapping):
            raise ReconError(
                f"{path}: metrics[{task!r}] is {describe(named)}; make it {{name: (fn, 'higher'|'lower')}}"
            )
        for name, spec in named.items():
            ok = isinstance(spec, (tuple, list)) and len(spec) == 2 and callable(spec[0])
            if not ok or spec[1] not in ("higher", "lower"):
                raise ReconError(
                    f"{path}: metrics[{task!r}][{name!r}] must be (fn(output, target), 'higher' or 'lower')"
                )
    return {t: {n: (s[0], s[1]) for n, s in named.items()} for t, named in metrics.items()}


def first_batch(recipe: Recipe, which: str = "train_data") -> tuple[Any, dict[str, Any]]:
    """The first ``(inputs, targets)`` batch of the recipe's data, checked for form."""
    fn = getattr(recipe, which)
    try:
        batch = next(iter(fn()))
    except StopIteration:
        raise ReconError(f"{recipe.path}: {which}() yielded no batch; return at least one (inputs, targets)") from None
    return check_batch(batch, recipe.tasks, f"{recipe.path}: {which}()")


def check_batch(batch: Any, tasks: list[str], where: str) -> tuple[Any, dict[str, Any]]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ReconError(f"{where} yielded {describe(batch)}; yield (inputs, targets) pairs")
    inputs, targets = batch
    if not isinstance(targets, Mapping):
        raise ReconError(f"{where} yielded targets as {describe(targets)}; make targets a dict {{task: tensor}}")
    missing = [t for t in tasks if t not in targets]
    if missing:
        raise ReconError(f"{where} yielded no target for task(s) {missing}; targets must have a key per task {tasks}")
    return inputs, dict(targets)


def compute_losses(
    losses: Mapping[str, LossFn],
    outputs: Mapping[str, Any],
    targets: Mapping[str, Any],
    where: str = "recipe",
) -> dict[str, torch.Tensor]:
    """Evaluate every task's loss and check each one is a scalar tensor."""
    values = {}
    for task, fn in losses.items():
        value = fn(outputs[task], targets[task])
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ReconError(
                f"{where}: loss of task {task!r} returned {describe(value)}, not a scalar tensor; "
                "reduce it (e.g. .mean()) so each loss is one number"
            )
        values[task] = value.reshape(())
    return values


def check_recipe(recipe: Recipe, *, device: torch.device | str | None = None) -> torch.nn.Module:
    """Build the model and run one forward and the losses on the first batch: fail early with a clear line."""
    from recon._outputs import move_to

    model = recipe.build_model()
    if not isinstance(model, torch.nn.Module):
        raise ReconError(f"{recipe.path}: build_model() returned {describe(model)}; return an nn.Module")
    if device is not None:
        model.to(device)
    inputs, targets = first_batch(recipe)
    try:
        raw = call_model(model, move_to(inputs, device))
        outputs = task_outputs(raw, recipe.tasks)
    except ReconError as e:
        raise ReconError(f"{recipe.path}: {e}") from None
    compute_losses(recipe.losses, outputs, move_to(targets, device), str(recipe.path))
    return model


def batches(data: Any) -> Iterable:
    """The batches of ``data``: an iterable, or a function returning one (called once per epoch)."""
    return data() if callable(data) else data


def batch_count(data: Any) -> int | None:
    """Batches per epoch when ``data`` has a length (a DataLoader, a list), else None."""
    try:
        return len(batches(data))  # type: ignore[arg-type]
    except TypeError:
        return None
