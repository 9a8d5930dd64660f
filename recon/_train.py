"""Stage 3: train a (split) network from scratch with any gradient method; evaluation and Δm%.

``recon.train`` is a plain epoch loop around :func:`recon.backward`: forward, per-task losses, the method's
update of the shared parameters (task-specific parameters get their own task's gradient), optimizer step.
Each epoch it evaluates on ``val_data`` with the recipe's metrics and, given ``out``, writes ``metrics.csv``,
``checkpoint.pt`` and ``summary.json`` atomically; ``resume=True`` continues from the checkpoint and ends
exactly where an uninterrupted run ends (model, optimizer, method state and every RNG are restored).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from recon import _distributed, _io
from recon._backward import TaskGradients
from recon._errors import NonFiniteLossError, ReconError
from recon._gram import LayerCosines
from recon._loop import Observer, ProgressObserver, StepEngine
from recon._outputs import call_model, move_to, task_outputs
from recon._precision import Precision
from recon._profile import layer_usage_autograd, shared_layer_params
from recon._progress import progress_bar
from recon._recipe import batch_count, batches, check_batch, compute_losses, validate_tasks
from recon.methods import resolve, spec_of

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
SUMMARY = "summary.json"

Metrics = Mapping[str, Mapping[str, tuple[Callable[[Any, Any], float], str]]]


@dataclass
class TrainResult:
    """What :func:`train` returns: the per-epoch history and the final validation metrics."""

    history: pd.DataFrame
    final: dict[str, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    #: every recorded layer-wise cosine of the still-shared layers, ``(steps, layers, pairs)``, when asked for
    cosines: np.ndarray | None = None


class ConflictMeter(Observer):
    """Layer-wise cosines of the shared layers at each training step (the paper's Figures 1 and 3).

    An observer of the step engine: shared layers are found with autograd on the first step (any module, split
    or not). With a gradient method the meter reads the step's own task gradients; other methods compute none,
    so the engine then takes one more backward pass per task for it: off unless asked for.
    """

    wants_gradients = True

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.layers: list[str] | None = None
        self._cosines: LayerCosines | None = None
        self.rows: list[np.ndarray] = []
        self._blocks: list[np.ndarray] = []

    def on_gradients(self, engine: StepEngine, grads: TaskGradients) -> None:
        """Record the shared layers' cosines of one step's (averaged) task gradients."""
        if self._cosines is None:
            usage = layer_usage_autograd(engine.names, [[self.tasks[k] for k in u] for u in grads.users])
            self.layers, layer_params = shared_layer_params(engine.names, usage)
            self._cosines = LayerCosines(engine.params, layer_params, len(self.layers), len(self.tasks))
        self.rows.append(self._cosines(grads, engine.device).cpu().numpy())

    def take_epoch(self) -> float:
        """Share of this epoch's recorded cosines below 0 (skipped pairs excluded); resets the epoch."""
        if not self.rows:
            return float("nan")
        block = np.stack(self.rows)
        self._blocks.append(block)
        self.rows = []
        valid = ~np.isnan(block)
        return float((block < 0).sum() / max(valid.sum(), 1))

    def all(self) -> np.ndarray | None:
        return np.concatenate(self._blocks) if self._blocks else None


class _Epochs(Observer):
    """The training loop's side of the step engine: per-epoch mean losses, the method's epoch end, evaluation,
    the history, ``metrics.csv`` and ``checkpoint.pt`` (rank 0), then the user's ``on_epoch``."""

    def __init__(self, run: _TrainRun, history: list[dict[str, Any]]) -> None:
        self.run = run
        self.history = history
        self._start()

    def _start(self) -> None:
        self.t0 = time.perf_counter()
        self.sums = dict.fromkeys(self.run.tasks, 0.0)

    def on_step(self, engine: StepEngine, losses: list[float]) -> None:
        for t, v in zip(self.run.tasks, losses, strict=True):
            self.sums[t] += v

    def on_epoch_end(self, engine: StepEngine, epoch: int, n_steps: int) -> None:
        run = self.run
        if n_steps == 0:
            raise ReconError("train_data yielded no batch; give at least one (inputs, targets) batch")
        mean_losses = {t: s / n_steps for t, s in self.sums.items()}
        run.method.end_epoch(mean_losses)
        record: dict[str, Any] = {"epoch": epoch + 1}
        record.update({f"train_loss_{t}": v for t, v in mean_losses.items()})
        if run.meter is not None:
            record["conflict_share"] = run.meter.take_epoch()
        if run.val_data is not None:
            scores = evaluate(engine.model, run.val_data, run.tasks, run.metrics, device=engine.device)
            for t in run.tasks:
                record.update({f"val_{t}_{k}": v for k, v in scores[t].items()})
        record["seconds"] = time.perf_counter() - self.t0
        self.history.append(record)
        if run.folder is not None:  # checkpoint first: after a kill, metrics.csv never runs ahead of it
            _save_checkpoint(
                run.folder, epoch + 1, engine.model, engine.optimizer, run.method, self.history, run.meta,
                engine.precision,
            )  # fmt: skip
            _io.write_text(run.folder / METRICS, pd.DataFrame(self.history).to_csv(index=False, float_format="%.6g"))
        if run.on_epoch is not None:
            run.on_epoch(epoch + 1, record)
        engine.model.train()
        self._start()


def delta_m(
    final: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    directions: Mapping[str, Mapping[str, str]],
) -> float:
    """Δm% (Maninis et al. 2019; as in MTAN, CAGrad, Nash-MTL and Recon): lower is better.

    ``Δm% = 100/N * sum_{task, metric} (-1)^{h} (M - M_b) / M_b`` over the N (task, metric) pairs, where
    ``h = 1`` when higher is better for that metric and ``M_b`` is the single-task baseline's value.
    """
    terms = []
    for task, named in directions.items():
        for metric, direction in named.items():
            m, b = final[task][metric], baseline[task][metric]
            if b == 0:
                raise ReconError(f"baseline {task}/{metric} is 0: Δm% divides by it; use a metric that is never 0")
            sign = -1.0 if direction == "higher" else 1.0
            terms.append(sign * (m - b) / abs(b))
    if not terms:
        raise ReconError("Δm% needs at least one metric; define `metrics` in the recipe")
    return 100.0 * float(np.mean(terms))


@torch.no_grad()
def evaluate(
    net: nn.Module, data: Iterable, tasks: Sequence[str], metrics: Metrics | None, *, device=None
) -> dict[str, dict[str, float]]:
    """Every metric over the whole of ``data``, in eval mode.

    A plain metric ``fn(output, target) -> float`` is averaged over batches weighted by batch size; a metric
    object with ``reset()``, ``update(output, target)`` and ``compute()`` (e.g. ``recon.dense``'s whole-set
    mIoU) accumulates over the set instead. On data sharded across torchrun processes the sums and counts are
    all-reduced and stateful metrics see every process's batches (:class:`recon._distributed.GatheredMetric`).
    """
    was_training = net.training
    net.eval()
    iterable = batches(data)
    sharded = _distributed.is_sharded(data)
    named = {t: dict((metrics or {}).get(t, {})) for t in tasks}
    if sharded:
        named = {t: {k: (_distributed.gathered(fn) if _stateful(fn) else fn, d) for k, (fn, d) in m.items()}
                 for t, m in named.items()}  # fmt: skip
    for t in tasks:
        for fn, _ in named[t].values():
            if hasattr(fn, "update") and hasattr(fn, "compute"):
                fn.reset()
    sums: dict[str, dict[str, float]] = {t: {} for t in tasks}
    count = 0
    try:
        for batch in iterable:
            inputs, targets = check_batch(batch, list(tasks), "val_data")
            outputs = task_outputs(call_model(net, move_to(inputs, device)), tasks)
            targets = move_to(targets, device)
            n = _batch_size(targets[tasks[0]])
            count += n
            for t in tasks:
                for name, (fn, _) in named[t].items():
                    if hasattr(fn, "update") and hasattr(fn, "compute"):
                        fn.update(outputs[t], targets[t])
                    else:
                        sums[t][name] = sums[t].get(name, 0.0) + float(fn(outputs[t], targets[t])) * n
    finally:
        net.train(was_training)
    if sharded:
        keys = [(t, k) for t in tasks for k, (fn, _) in named[t].items() if not _stateful(fn)]
        *totals, count = _distributed.sum_([*(sums[t].get(k, 0.0) for t, k in keys), count])
        for (t, k), v in zip(keys, totals, strict=True):
            sums[t][k] = v
    out: dict[str, dict[str, float]] = {}
    for t in tasks:
        out[t] = {}
        for name, (fn, _) in named[t].items():
            stateful = hasattr(fn, "update") and hasattr(fn, "compute")
            out[t][name] = float(fn.compute()) if stateful else sums[t].get(name, float("nan")) / max(count, 1)
    return out


def _stateful(fn: Any) -> bool:
    return hasattr(fn, "update") and hasattr(fn, "compute")


def _batch_size(target: Any) -> int:
    return int(target.shape[0]) if isinstance(target, torch.Tensor) and target.dim() > 0 else 1


def _rng_state() -> dict[str, Any]:
    """Every RNG, as tensors and plain Python values so ``torch.load(weights_only=True)`` reads it back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(py_state), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python's ``random`` alike: the model a recipe builds next is the same each run."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass
class _TrainRun:
    """What the epoch end of :func:`train` needs besides the engine."""

    tasks: list[str]
    method: Any
    meter: ConflictMeter | None
    val_data: Any
    metrics: Metrics | None
    folder: Path | None  # None on processes other than rank 0: only rank 0 writes
    meta: Mapping[str, Any] | None
    on_epoch: Callable[[int, dict[str, Any]], None] | None


def _check_train_args(losses: Any, tasks: Sequence[str] | None, epochs: int, resume: bool, out: Any):
    """The loss functions and the trained tasks, checked."""
    if callable(losses) and not isinstance(losses, Mapping):
        losses = losses()
    loss_fns = dict(losses)
    task_names = validate_tasks(tasks if tasks is not None else list(loss_fns), "train")
    unknown = [t for t in task_names if t not in loss_fns]
    if unknown:
        raise ReconError(f"no loss for task(s) {unknown}; tasks must be keys of `losses`: {list(loss_fns)}")
    if epochs < 1:
        raise ReconError(f"epochs = {epochs} must be at least 1")
    if resume and out is None:
        raise ReconError("resume=True needs `out`, the folder holding checkpoint.pt")
    return loss_fns, task_names


def train(
    net: nn.Module,
    data: Any,
    losses: Mapping[str, Callable] | Callable[[], Mapping[str, Callable]],
    *,
    method: Any = "joint",
    epochs: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    val_data: Any = None,
    metrics: Metrics | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    tasks: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
    sparse: Any = None,
    meta: Mapping[str, Any] | None = None,
    record_cosines: bool = False,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    precision: str | int | Precision = "32",
    batched: bool | str = "auto",
    task_chunk: int | str = "auto",
) -> TrainResult:
    """Train ``net`` from its current parameters with a gradient method (Recon, stage 3).

    Args:
        net: the model (original or split by :func:`recon.split`).
        data: iterable of ``(inputs, {task: target})`` batches, or a function returning one (called per epoch).
        losses: ``{task: loss_fn(output, target)}``; ``tasks`` may restrict training to some of them
            (a single task gives the single-task baseline of Δm%).
        method: a name of ``recon.methods`` (with hyperparameters: ``"cagrad:c=0.4"``), a method instance, a
            torchjd ``Aggregator``, or a callable ``(K, P) -> (P,)``. Learnable method parameters (e.g.
            uncertainty weights) join the optimizer.
        optimizer: default Adam(lr=1e-3) over the network's and the method's parameters.
        val_data, metrics: evaluated after every epoch; the mean over batches, weighted by batch size.
        out: folder for ``metrics.csv``, ``checkpoint.pt`` (every epoch) and ``summary.json``.
        resume: continue from ``out/checkpoint.pt``; the result equals an uninterrupted run's.
        sparse: a ``recon.methods.SparseTraining`` (or ratio) applied to the shared parameters before training.
        record_cosines: measure the shared layers' layer-wise cosines every step (free for gradient methods,
            which compute the per-task gradients anyway; one more backward per task for the others): the history
            gets ``conflict_share`` (share of cosines < 0) and the result ``cosines``.
        precision, batched, task_chunk: as in :func:`recon.profile`; fp16's loss scale is in the checkpoint.
            Under torchrun each process loads only its shard of the data, metrics are reduced (docs/scaling.md).
    """
    loss_fns, task_names = _check_train_args(losses, tasks, epochs, resume, out)

    seed_everything(seed)
    if device is not None:
        net.to(_distributed.local_device(torch.device(device)))
    dev = next(net.parameters()).device
    amp = Precision.of(precision, dev)
    _distributed.broadcast_parameters(net)
    writes = _distributed.is_main()  # only rank 0 writes files and prints; every rank reads a resumed checkpoint
    agg, optimizer = _method_and_optimizer(method, task_names, net, optimizer, dev)
    if sparse is not None:  # masks come from the fresh weights, so a resumed run re-derives the same ones
        sparse = _attach_sparse(sparse, net, data, task_names, loss_fns, dev, optimizer)

    folder, meta = (Path(out) if out is not None else None), {**dict(meta or {}), **_provenance(method, task_names)}
    start_epoch, history = _start(folder, resume, writes, net, optimizer, agg, amp, meta)
    data, val_data = _distributed.shard_data(data, "train_data", start_epoch), _distributed.shard_data(val_data)

    meter = ConflictMeter(task_names) if record_cosines and len(task_names) > 1 else None
    run = _TrainRun(task_names, agg, meter, val_data, metrics, folder if writes else None, meta, on_epoch)
    steps_per_epoch = batch_count(data)
    engine = StepEngine(
        net, loss_fns, task_names, method=agg, optimizer=optimizer, device=dev, output_tasks=list(loss_fns),
        where="train_data", observers=[o for o in (meter, _Epochs(run, history)) if o is not None],
        step=start_epoch * (steps_per_epoch or 0), precision=amp, batched=batched, task_chunk=task_chunk,
    )  # fmt: skip
    total = None if steps_per_epoch is None else steps_per_epoch * (epochs - start_epoch)
    net.train()
    with progress_bar(total, f"training {spec_of(method)}", enabled=progress and writes) as bar:
        engine.observers.append(ProgressObserver(bar))
        _run_marked(engine, data, epochs, start_epoch, run, history, seed)
    if sparse is not None:
        sparse.remove()  # the returned network carries no hooks
    run.meta = {**dict(meta or {}), **amp.summary()}
    return _finish(run, history, net, method, epochs, seed)


def _provenance(method: Any, tasks: Sequence[str]) -> dict[str, Any]:
    """What a checkpoint records of its run for ``--resume`` to compare (with the caller's digests)."""
    return {"method": spec_of(method), "tasks": list(tasks)}


def _start(folder, resume, writes, net, optimizer, agg, precision, meta) -> tuple[int, list[dict[str, Any]]]:
    """The epoch to start from and the history so far: a resumed checkpoint's, or 0 and a fresh folder."""
    if resume:
        return _load_checkpoint(folder, net, optimizer, agg, precision, meta)
    if folder is not None and writes:
        folder.mkdir(parents=True, exist_ok=True)
    return 0, []


def _method_and_optimizer(method: Any, tasks: list[str], net: nn.Module, optimizer, device):
    """The resolved method, bound to the tasks (methods with learnable weights create them here, before the
    optimizer sees them), and the optimizer that also trains those weights."""
    agg = resolve(method)
    agg.bind(tasks)
    agg.to(device)
    extra = list(agg.parameters())
    if optimizer is None:
        optimizer = torch.optim.Adam([*net.parameters(), *extra], lr=1e-3)
    elif extra:
        optimizer.add_param_group({"params": extra})
    return agg, optimizer


def _finish(run: _TrainRun, history: list[dict[str, Any]], net: nn.Module, method, epochs: int, seed: int):
    """The result and ``summary.json`` (and the recorded cosines, when asked for)."""
    frame = pd.DataFrame(history)
    tasks = run.tasks
    directions = {t: {n: d for n, (_, d) in (run.metrics or {}).get(t, {}).items()} for t in tasks}
    final = _final_metrics(frame, tasks, directions)
    summary = {
        "method": spec_of(method),
        "epochs": epochs,
        "seed": seed,
        "tasks": tasks,
        "params": sum(p.numel() for p in net.parameters()),
        "final": final,
        "directions": directions,
        "train_loss": {t: float(frame[f"train_loss_{t}"].iloc[-1]) for t in tasks},
        **dict(run.meta or {}),
    }
    cosines = run.meter.all() if run.meter is not None else None
    if run.meter is not None:
        summary["conflict_share"] = float(np.nanmean(frame["conflict_share"]))
        if run.folder is not None and cosines is not None:
            _io.write_bytes(run.folder / "cosines.npy", _npy_bytes(cosines))
    if run.folder is not None:
        _io.write_json(run.folder / SUMMARY, summary)
    return TrainResult(frame, final, summary, cosines)


def _run_marked(engine: StepEngine, data, epochs: int, start_epoch: int, run: _TrainRun, history, seed: int) -> None:
    """The epochs; an interrupted run leaves a summary.json marked partial."""
    try:
        engine.run(data, epochs=epochs, start_epoch=start_epoch)
    except (KeyboardInterrupt, NonFiniteLossError):
        if run.folder is not None:
            _write_partial(run, history, engine.model, epochs, seed)
        raise


def _write_partial(run: _TrainRun, history: list[dict[str, Any]], net: nn.Module, epochs: int, seed: int) -> None:
    """summary.json of an interrupted run: marked partial with the epochs done, the last finished epoch's
    metrics (none before the first); ``recon report`` shows the mark and keeps it out of means over seeds."""
    directions = {t: {n: d for n, (_, d) in (run.metrics or {}).get(t, {}).items()} for t in run.tasks}
    frame = pd.DataFrame(history)
    summary = {
        **dict(run.meta or {}),
        "epochs": epochs,
        "epochs_done": len(history),
        "partial": True,
        "seed": seed,
        "tasks": run.tasks,
        "params": sum(p.numel() for p in net.parameters()),
        "final": _final_metrics(frame, run.tasks, directions) if history else {},
        "directions": directions,
    }
    _io.write_json(run.folder / SUMMARY, summary)


def _final_metrics(frame: pd.DataFrame, tasks: Sequence[str], directions) -> dict[str, dict[str, float]]:
    last = frame.iloc[-1]
    return {t: {m: float(last[f"val_{t}_{m}"]) for m in directions[t] if f"val_{t}_{m}" in last} for t in tasks}


def _save_checkpoint(folder, epoch, net, optimizer, agg, history, meta, precision=None) -> None:
    _io.save_torch(
        folder / CHECKPOINT,
        {
            "epoch": epoch,
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "method": agg.state_dict(),
            "history": json.dumps(history),
            "rng": _rng_state(),
            "meta": json.dumps(dict(meta or {}), default=str),
            "precision": precision.state_dict() if isinstance(precision, Precision) else None,
        },
    )


#: What a checkpoint must share with the command resuming it, and how a mismatch names it.
RESUME_CHECKS = {"method": "method", "tasks": "tasks", "plan_digest": "split plan", "recipe_digest": "recipe file"}


def check_resume(path: Path, saved: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """One line naming what differs between the checkpoint's provenance and this run's (keys both record)."""
    differs = [
        f"{name} (checkpoint: {saved[key]}, now: {meta[key]})"
        for key, name in RESUME_CHECKS.items()
        if key in saved and key in meta and saved[key] != meta[key]
    ]
    if differs:
        raise ReconError(
            f"cannot resume {path}: {'; '.join(differs)}; resume with the checkpoint's, or start over without "
            "--resume (--force)"
        )


def _load_checkpoint(folder, net, optimizer, agg, precision=None, meta=None) -> tuple[int, list[dict[str, Any]]]:
    path = Path(folder) / CHECKPOINT
    if not path.exists():
        raise ReconError(f"{path} does not exist; nothing to resume, train without --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ReconError(f"{path} cannot be read ({reason}); start over without --resume (--force)") from None
    check_resume(path, json.loads(ckpt.get("meta") or "{}"), meta or {})
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ReconError(
            f"{path} does not fit this model ({str(e).splitlines()[0]}); resume with the split it was trained "
            "with, or start over without --resume (--force)"
        ) from None
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("method") is not None:
        agg.load_state_dict(ckpt["method"])
    _set_rng_state(ckpt["rng"])
    if ckpt.get("precision") is not None and precision is not None:
        precision.load_state_dict(ckpt["precision"])
    return int(ckpt["epoch"]), json.loads(ckpt["history"])


def _attach_sparse(sparse: Any, net: nn.Module, data: Any, tasks, loss_fns, device, optimizer) -> Any:
    """Sparse training on the shared parameters (found with autograd on the first batch)."""
    from recon.methods import SparseTraining

    if isinstance(sparse, (int, float)):
        sparse = SparseTraining(ratio=float(sparse))
    inputs, targets = check_batch(next(iter(batches(data))), list(tasks), "train_data")
    outputs = task_outputs(call_model(net, move_to(inputs, device)), list(loss_fns))
    values = compute_losses({t: loss_fns[t] for t in tasks}, outputs, move_to(targets, device), "losses")
    params = [p for p in net.parameters() if p.requires_grad]
    used = [torch.autograd.grad(values[t], params, retain_graph=True, allow_unused=True) for t in tasks]
    shared = [p for i, p in enumerate(params) if sum(g[i] is not None for g in used) >= 2]
    return sparse.attach(shared, optimizer)


def load_baselines(train_dir: str | os.PathLike, tasks: Sequence[str]) -> dict[str, dict[str, float]] | None:
    """The single-task baselines' final metrics ``{task: {metric: value}}``, or None unless every task has one."""
    found: dict[str, dict[str, float]] = {}
    for file in sorted(Path(train_dir).glob(f"single-*/{SUMMARY}")):
        summary = json.loads(file.read_text())
        task = summary.get("single_task")
        if task and summary.get("final", {}).get(task):
            found[task] = summary["final"][task]
    return found if all(t in found for t in tasks) else None


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    return buffer.getvalue()
