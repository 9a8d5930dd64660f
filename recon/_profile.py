"""Stage 1: the conflict profiler and :class:`ConflictProfile`.

Recon (Shi et al., "Recon: Reducing Conflicting Gradients From the Root for Multi-Task Learning", ICLR 2023)
measures, during a warm-up run, the layer-wise cosine ``cos_ij^(k)`` between task i's and task j's gradients
w.r.t. every shared layer k, and scores each layer by how often it falls below a threshold S (Definition 3,
the S-conflict score): ``score_k = sum_t sum_{i<j} 1[cos_ij^(k)(t) < S]``.

Per step the profiler runs one forward and one backward per task (the floor any exact profiler pays); each
task's shared-parameter gradients accumulate in place into row k of one ``(K, P)`` matrix J
(:func:`recon._backward.task_gradients`), each shared layer's K x K Gram matrix is read from its column spans of
J (:class:`recon._gram.LayerCosines`), the warm-up update is computed from the same J, and the cosines stay on
the device until a chunk is full. Nothing is cloned per parameter and nothing moves to the host per layer,
unlike the official code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from recon import _distributed, _io
from recon._backward import apply_task_gradients, task_gradients
from recon._cosines import CosineRecorder, open_cosines
from recon._errors import NonFiniteLossError, ReconError, check_finite
from recon._gram import LayerCosines
from recon._outputs import call_model, move_to, task_outputs
from recon._progress import progress_bar
from recon._recipe import batch_count, batches, check_batch, compute_losses, validate_tasks

PROFILE_FILE = "profile.json"
COSINES_FILE = "cosines.npy"
LOSSES_FILE = "losses.csv"


def check_threshold(S: float) -> float:
    """CONTRACT.md: ``-1 < S <= 0``."""
    S = float(S)
    if not (-1.0 < S <= 0.0):
        raise ReconError(f"S = {S} is out of range; the S-conflict threshold must satisfy -1 < S <= 0")
    return S


def owner_name(param_name: str) -> str:
    """The layer (module) that directly owns a parameter: ``layer1.0.bn1.weight`` -> ``layer1.0.bn1``."""
    return param_name.rpartition(".")[0]


@dataclass
class ConflictProfile:
    """The result of stage 1: every shared layer's recorded layer-wise cosines, and scores derived from them.

    ``cosines`` is the long table of every record; ``scores(S)`` recomputes S-conflict scores for any threshold
    from the stored cosines, without re-profiling.
    """

    tasks: list[str]
    layers: list[str]
    folder: Path
    S: float = 0.0
    layer_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    partial: bool = False
    discovery: str = "fx"
    meta: dict[str, Any] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(combinations(self.tasks, 2))

    @property
    def cosine_array(self) -> np.ndarray:
        """``(steps, layers, pairs)`` float32 (memory-mapped); NaN where a task's layer gradient was zero."""
        return open_cosines(self.folder / COSINES_FILE)

    @property
    def steps(self) -> int:
        return int(self.cosine_array.shape[0])

    @property
    def cosines(self) -> pd.DataFrame:
        """Every record: columns ``step, layer, task_a, task_b, cos`` (NaN = skipped, zero gradient)."""
        arr = np.asarray(self.cosine_array)
        T, L, P = arr.shape
        pairs = self.pairs
        return pd.DataFrame(
            {
                "step": np.repeat(np.arange(T), L * P),
                "layer": pd.Categorical(np.tile(np.repeat(np.array(self.layers, dtype=object), P), T)),
                "task_a": np.tile(np.array([a for a, _ in pairs], dtype=object), T * L),
                "task_b": np.tile(np.array([b for _, b in pairs], dtype=object), T * L),
                "cos": arr.reshape(-1),
            }
        )

    @property
    def losses(self) -> pd.DataFrame:
        """Per-step training loss of every task (columns ``step`` and one per task)."""
        path = self.folder / LOSSES_FILE
        if not path.exists():
            return pd.DataFrame(columns=["step", *self.tasks])
        return pd.read_csv(path)

    def _counts(self, S: float, block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per layer: count of cos < S, count of recorded (non-skipped) cosines, sum of cosines; per pair too."""
        arr = self.cosine_array
        L, P = arr.shape[1:]
        below = np.zeros(L, dtype=np.int64)
        valid = np.zeros(L, dtype=np.int64)
        total = np.zeros(L, dtype=np.float64)
        below_pair = np.zeros((L, P), dtype=np.int64)
        valid_pair = np.zeros((L, P), dtype=np.int64)
        for start in range(0, arr.shape[0], block):
            chunk = np.asarray(arr[start : start + block], dtype=np.float32)
            ok = ~np.isnan(chunk)
            hit = chunk < S  # NaN compares False: skipped pairs never count (CONTRACT.md)
            below_pair += hit.sum(axis=0)
            valid_pair += ok.sum(axis=0)
            total += np.where(ok, chunk, 0.0).sum(axis=(0, 2))
        below[:] = below_pair.sum(axis=1)
        valid[:] = valid_pair.sum(axis=1)
        return below, valid, total, below_pair / np.maximum(valid_pair, 1)

    def scores(self, S: float | None = None) -> pd.DataFrame:
        """S-conflict scores (Definition 3 of the paper), indexed by layer, sorted by ``score`` descending.

        Columns: ``score`` (int), ``conflict_rate`` (share of recorded pairs with cos < S), ``mean_cos``,
        ``params``, ``type`` and ``tasks``. Ties keep the model's layer order.
        """
        S = self.S if S is None else check_threshold(S)
        below, valid, total, _ = self._counts(S)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(valid > 0, below / np.maximum(valid, 1), np.nan)
            mean = np.where(valid > 0, total / np.maximum(valid, 1), np.nan)
        frame = pd.DataFrame(
            {
                "score": below.astype(int),
                "conflict_rate": rate,
                "mean_cos": mean,
                "params": [int(self.layer_info.get(n, {}).get("params", 0)) for n in self.layers],
                "type": [self.layer_info.get(n, {}).get("type", "") for n in self.layers],
                "tasks": [",".join(self.layer_info.get(n, {}).get("tasks", self.tasks)) for n in self.layers],
            },
            index=pd.Index(self.layers, name="layer"),
        )
        return frame.sort_values("score", ascending=False, kind="stable")

    def conflict_rates(self, S: float | None = None) -> pd.DataFrame:
        """Layers x task pairs: the share of recorded steps where ``cos < S`` (the heatmap's data)."""
        S = self.S if S is None else check_threshold(S)
        rates = self._counts(S)[3]
        cols = [f"{a}-{b}" for a, b in self.pairs]
        return pd.DataFrame(rates, index=pd.Index(self.layers, name="layer"), columns=cols)

    def conflict_matrix(self, layer: str, S: float | None = None, *, counts: bool = False) -> pd.DataFrame:
        """``K x K`` (tasks x tasks, symmetric, zero diagonal): the share of recorded steps where task i's and
        task j's gradients on ``layer`` have ``cos < S``; with ``counts=True`` the number of such steps, whose
        sum over the pairs a split separates is the S-conflict score it removes (the layer's score, Definition
        3 of the paper, for a per-task split; none for one group)."""
        S = self.S if S is None else check_threshold(S)
        if layer not in self.layers:
            raise ReconError(f"unknown layer {layer!r}; the profiled shared layers are {self.layers}")
        column = np.asarray(self.cosine_array[:, self.layers.index(layer), :], dtype=np.float32)
        below = (column < S).sum(axis=0)  # NaN compares False: skipped pairs never count
        valid = (~np.isnan(column)).sum(axis=0)
        K = len(self.tasks)
        out = np.zeros((K, K), dtype=np.int64 if counts else np.float64)
        for p, (a, b) in enumerate(combinations(range(K), 2)):
            out[a, b] = out[b, a] = below[p] if counts else (below[p] / valid[p] if valid[p] else 0.0)
        return pd.DataFrame(out, index=pd.Index(self.tasks, name="task"), columns=list(self.tasks))

    def top_layers(self, k: int, S: float | None = None) -> list[str]:
        """The ``k`` layers with the highest S-conflict scores."""
        if not isinstance(k, int) or k < 0:
            raise ReconError(f"top-k = {k!r} must be a non-negative integer")
        if k > len(self.layers):
            raise ReconError(
                f"top-k = {k} exceeds the {len(self.layers)} shared layers; choose k <= {len(self.layers)} "
                f"(shared layers: {', '.join(self.layers)})"
            )
        return list(self.scores(S).index[:k])

    # --- persistence -------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "format": 1,
            "tasks": self.tasks,
            "layers": self.layers,
            "pairs": [list(p) for p in self.pairs],
            "S": self.S,
            "steps": self.steps,
            "partial": self.partial,
            "discovery": self.discovery,
            "layer_info": self.layer_info,
            **{k: v for k, v in self.meta.items() if k not in {"tasks", "layers", "pairs", "S", "steps"}},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``profile.json``, ``cosines.npy``, ``losses.csv``, ``scores.csv`` and ``scores.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in (COSINES_FILE, LOSSES_FILE):
            src = self.folder / name
            if src.exists() and src.resolve() != (path / name).resolve():
                _copy(src, path / name)
        scores = self.scores()
        _io.write_text(path / "scores.csv", scores.to_csv(float_format="%.6g"))
        self.export_scores_json(path / "scores.json")
        _io.write_json(path / PROFILE_FILE, self._meta())
        if self._tmp is None:
            return path
        self.folder, self._tmp = path, None  # the saved copy becomes the home; the temporary one goes
        return path

    def export_scores_json(self, path: str | os.PathLike, S: float | None = None) -> Path:
        """The official Recon code's format: ``{layer: score}``, sorted descending."""
        scores = self.scores(S)["score"]
        return _io.write_json(path, {layer: int(v) for layer, v in scores.items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConflictProfile:
        path = Path(path)
        file = path / PROFILE_FILE
        if not file.exists():
            raise ReconError(f"{path} holds no profile ({PROFILE_FILE} missing); run `recon profile MODEL_PY`")
        meta = json.loads(file.read_text())
        if not (path / COSINES_FILE).exists():
            raise ReconError(f"{path}/{COSINES_FILE} is missing; the profile is incomplete, profile again")
        known = {"tasks", "layers", "S", "layer_info", "partial", "discovery"}
        return cls(
            tasks=list(meta["tasks"]),
            layers=list(meta["layers"]),
            folder=path,
            S=float(meta.get("S", 0.0)),
            layer_info=meta.get("layer_info", {}),
            partial=bool(meta.get("partial", False)),
            discovery=meta.get("discovery", "fx"),
            meta={k: v for k, v in meta.items() if k not in known},
        )


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def read_scores_json(path: str | os.PathLike) -> dict[str, int]:
    """Read an official-format ``{layer: score}`` file, sorted by score descending."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReconError(f"{path}: no such file; pass a scores.json written by `recon profile`") from None
    except json.JSONDecodeError as e:
        raise ReconError(f"{path} is not valid JSON ({e}); pass a {{layer: score}} file") from None
    if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) for v in raw.values()):
        raise ReconError(f"{path} is not a {{layer: score}} mapping; pass the official scores format")
    return dict(sorted(((str(k), int(v)) for k, v in raw.items()), key=lambda kv: -kv[1]))


# --- shared-layer discovery --------------------------------------------------------------------------------
def layer_usage_fx(model: nn.Module, tasks: Sequence[str], leaf_modules: Sequence[str] = ()) -> dict[str, frozenset]:
    """Per layer, the tasks whose output it reaches in the torch.fx graph (raises ``TraceError``)."""
    from recon._graph import layer_tasks

    return layer_tasks(model, list(tasks), leaf_modules=tuple(leaf_modules))


def layer_usage_autograd(names: Sequence[str], users: Sequence[Sequence[str]]) -> dict[str, frozenset]:
    """Per layer, the tasks that give any of its parameters a gradient (autograd fallback for any module);
    ``users[i]``: the tasks whose gradient reached parameter ``names[i]``."""
    usage: dict[str, set[str]] = {}
    for name, tasks in zip(names, users, strict=True):
        usage.setdefault(owner_name(name), set()).update(tasks)
    return {layer: frozenset(tasks) for layer, tasks in usage.items()}


# --- the profiler -----------------------------------------------------------------------------------------
def shared_layer_params(
    names: Sequence[str], usage: Mapping[str, frozenset]
) -> tuple[list[str], list[tuple[int, int]]]:
    """The layers 2+ tasks use (in parameter order), and ``(layer index, parameter index)`` of their parameters."""
    owners = [owner_name(n) for n in names]
    layers = [ln for ln in dict.fromkeys(owners) if len(usage.get(ln, ())) >= 2]
    index = {ln: k for k, ln in enumerate(layers)}
    return layers, [(index[o], i) for i, o in enumerate(owners) if o in index]


def _warmup_method(method: Any, tasks: list[str]) -> Any:
    """The warm-up update: a gradient method of ``recon.methods`` (default: the joint mean)."""
    from recon.methods import resolve

    m = resolve("mean" if method == "joint" else method)
    if m.kind not in ("gradient",):
        raise ReconError(
            f"the profiling warm-up aggregates task gradients; {method!r} is a {m.kind} method. "
            "Use a gradient method (joint, pcgrad, cagrad, ...; see `recon methods`)"
        )
    return m.bind(tasks)


def profile(
    model: nn.Module,
    data: Any,
    losses: Mapping[str, Callable] | Callable[[], Mapping[str, Callable]],
    *,
    steps: int | None = None,
    epochs: int = 1,
    S: float = 0.0,
    method: Any = "joint",
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    tasks: Sequence[str] | None = None,
    leaf_modules: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    progress: bool = False,
    chunk: int = 256,
) -> ConflictProfile:
    """Warm-up training that records every shared layer's pairwise layer-wise cosines (Recon, stage 1).

    Args:
        model: any ``nn.Module`` whose forward returns ``{task: output}`` or a tuple in the order of ``losses``.
        data: an iterable of ``(inputs, {task: target})`` batches, or a function returning one (called per epoch).
        losses: ``{task: loss_fn(output, target)}``.
        steps: stop after this many steps (cycling over epochs as needed); default: ``epochs`` full passes.
        S: default threshold of :meth:`ConflictProfile.scores`, ``-1 < S <= 0``.
        method: the warm-up update of the shared parameters: ``"joint"`` (mean of task gradients) or any method
            accepted by :func:`recon.methods.get` / a callable ``(K, P) -> (P,)``.
        optimizer: default Adam(lr=1e-3) over the model's parameters.
        device: where to profile; default: where the model's parameters are.
        out: folder to stream ``cosines.npy`` into (default: a temporary folder; :meth:`ConflictProfile.save`).

    On Ctrl-C or a non-finite loss, what was recorded is kept: the exception is re-raised with the partial
    profile attached as ``exc.profile``.
    """
    if callable(losses) and not isinstance(losses, Mapping):
        losses = losses()
    loss_fns = dict(losses)
    task_names = validate_tasks(tasks if tasks is not None else list(loss_fns), "profile")
    missing = [t for t in task_names if t not in loss_fns]
    if missing:
        raise ReconError(f"no loss for task(s) {missing}; `losses` must have one entry per task")
    if len(task_names) < 2:
        raise ReconError(f"profiling needs at least two tasks, got {task_names}; conflicts are between tasks")
    S = check_threshold(S)
    if steps is not None and steps < 1:
        raise ReconError(f"steps = {steps} must be at least 1")
    if epochs < 1:
        raise ReconError(f"epochs = {epochs} must be at least 1")

    torch.manual_seed(seed)
    if device is not None:
        model.to(_distributed.local_device(torch.device(device)))
    dev = next(model.parameters()).device
    _distributed.broadcast_parameters(model)
    if not _distributed.is_main():
        out, progress = None, False  # only rank 0 writes files and prints
    model.train()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    names, params = list(names), list(params)
    opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=1e-3)
    method_obj = _warmup_method(method, task_names)

    try:
        usage = layer_usage_fx(model, task_names, leaf_modules)
        discovery = "fx"
    except (ReconError, ImportError):  # TraceError is a ReconError: fall back to autograd on the first step
        usage = None
        discovery = "autograd"

    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="recon-profile-")
        folder = Path(tmp.name)
    else:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)

    K = len(task_names)
    n_pairs = K * (K - 1) // 2
    recorder: CosineRecorder | None = None
    layer_params: list[tuple[int, int]] = []  # (layer index, parameter index) for parameters of shared layers
    shared_layers: list[str] = []
    shared_idx: list[int] | None = None  # the parameters whose task gradients go into J (found on step 1)
    cosines: LayerCosines | None = None
    loss_log: list[list[float]] = []
    n = batch_count(data)
    total = steps if steps is not None else (None if n is None else n * epochs)

    def setup() -> None:
        nonlocal recorder, shared_layers, shared_idx, cosines
        shared_layers, found = shared_layer_params(names, usage)
        layer_params.extend(found)
        if shared_idx is None:  # fx: the shared layers' parameters; autograd: those 2+ tasks reached
            shared_idx = [i for _, i in layer_params]
        cosines = LayerCosines(params, layer_params, len(shared_layers), K)
        recorder = CosineRecorder(folder / "cosines.npy", len(shared_layers), n_pairs, device=dev, chunk=chunk)

    def result(partial: bool) -> ConflictProfile:
        if recorder is not None:
            recorder.close()
        else:  # interrupted before the first step completed: an empty but valid record
            CosineRecorder(folder / "cosines.npy", 0, n_pairs, device=dev).close()
        _io.write_text(
            folder / LOSSES_FILE,
            pd.DataFrame(loss_log, columns=task_names).rename_axis("step").to_csv(float_format="%.6g"),
        )
        modules = dict(model.named_modules())
        info = {
            ln: {
                "params": sum(p.numel() for p in modules[ln].parameters(recurse=False)),
                "type": type(modules[ln]).__name__,
                "tasks": sorted(usage.get(ln, ()), key=task_names.index) if usage else [],
            }
            for ln in shared_layers
        }
        prof = ConflictProfile(
            tasks=task_names,
            layers=shared_layers,
            folder=folder,
            S=S,
            layer_info=info,
            partial=partial,
            discovery=discovery,
            meta={
                "method": method if isinstance(method, str) else type(method).__name__,
                "seed": seed,
                "leaf_modules": list(leaf_modules),
            },
            _tmp=tmp,
        )
        if out is not None:
            prof.save(folder)
        return prof

    if usage is not None:
        setup()
    step = 0
    try:
        with progress_bar(total, "profiling", enabled=progress) as bar:
            for _epoch in range(epochs if steps is None else 10**12):
                epoch_start = step
                for batch in batches(data):
                    if steps is not None and step >= steps:
                        break
                    inputs, targets = check_batch(batch, task_names, "data")
                    inputs, targets, weight = _distributed.shard(inputs, targets)
                    outputs = task_outputs(call_model(model, move_to(inputs, dev)), task_names)
                    values = compute_losses(loss_fns, outputs, move_to(targets, dev), "losses")
                    loss_vector = torch.stack(list(values.values())).detach()
                    grads = task_gradients(list(values.values()), params, shared_idx=shared_idx)
                    # under torchrun: the global batch's task gradients, before any cosine or aggregation
                    _distributed.average_([*grads.tensors(), loss_vector], weight)
                    row = loss_vector.tolist()
                    check_finite(task_names, row, step)
                    if recorder is None:  # autograd discovery, on the first step
                        usage = layer_usage_autograd(names, [[task_names[k] for k in u] for u in grads.users])
                        shared_idx = grads.shared_idx
                        setup()
                    recorder.append(cosines(grads, dev))
                    opt.zero_grad(set_to_none=True)
                    apply_task_gradients(grads, params, method_obj, loss_vector)
                    del grads
                    opt.step()
                    opt.zero_grad(set_to_none=True)  # .grad is not kept between steps: memory for J
                    loss_log.append(row)
                    step += 1
                    bar.advance(dict(zip(task_names, row, strict=True)))
                else:
                    if step > epoch_start:
                        continue  # a one-shot iterator that is used up yields nothing: stop, don't spin
                break
    except (KeyboardInterrupt, NonFiniteLossError) as e:
        e.profile = result(partial=True)  # type: ignore[attr-defined]
        raise
    except BaseException:
        if recorder is not None:
            recorder.close()
        raise
    if step == 0:
        raise ReconError("the data yielded no batch; give at least one (inputs, targets) batch")
    return result(partial=False)
