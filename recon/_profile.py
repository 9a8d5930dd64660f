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
from recon._backward import TaskGradients
from recon._confidence import CONFIDENCE_K, top_k_probability
from recon._cosines import (
    ConflictCounts,
    CosineRecorder,
    GramRecorder,
    GramSums,
    gram_rows,
    open_array,
    open_cosines,
    read_shape,
)
from recon._errors import NonFiniteLossError, ReconError, did_you_mean
from recon._gram import LayerCosines, gram_cosines
from recon._loop import Observer, ProgressObserver, StepEngine
from recon._precision import Precision
from recon._progress import progress_bar
from recon._recipe import batch_count, validate_tasks
from recon.methods import resolve, spec_of

PROFILE_FILE = "profile.json"
COSINES_FILE = "cosines.npy"
GRAM_FILE = "gram.npy"
SCORES = ("s-conflict", "interference")
_NO_GRAM = "this profile has no Gram matrices (gram.npy); re-run `recon profile` to score interference"
LOSSES_FILE = "losses.csv"


def check_threshold(S: float) -> float:
    """The S-conflict threshold must satisfy ``-1 < S <= 0`` (Definition 3 of the Recon paper; docs/cli.md)."""
    S = float(S)
    if not (-1.0 < S <= 0.0):
        raise ReconError(f"S = {S} is out of range; the S-conflict threshold must satisfy -1 < S <= 0")
    return S


def check_score(score: str) -> str:
    if score not in SCORES:
        raise ReconError(f"score={score!r} is not one of {list(SCORES)} (--score s-conflict|interference)")
    return score


def owner_name(param_name: str) -> str:
    """The layer (module) that directly owns a parameter: ``layer1.0.bn1.weight`` -> ``layer1.0.bn1``."""
    return param_name.rpartition(".")[0]


@dataclass
class ConflictProfile:
    """The result of stage 1: every shared layer's recorded layer-wise cosines, and scores derived from them.

    ``cosines`` is the long table of every record; ``scores(S)`` recomputes S-conflict scores for any threshold
    from the stored cosines, without re-profiling; ``scores(score="interference")`` reads the stored per-step
    Gram matrices (``gram.npy``; a profile made before they were recorded has none).
    """

    tasks: list[str]
    layers: list[str]
    folder: Path | None
    S: float = 0.0
    layer_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    partial: bool = False
    discovery: str = "fx"
    meta: dict[str, Any] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    #: the counts kept while the cosines streamed to disk (at ``S``): scores at ``S`` need no pass over the file
    _running: ConflictCounts | None = field(default=None, repr=False, compare=False)
    _loss_frame: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    #: the Gram sums kept while the Gram rows streamed to disk
    _gram_sums: GramSums | None = field(default=None, repr=False, compare=False)
    _cache: dict[float, ConflictCounts] = field(default_factory=dict, repr=False, compare=False)
    _n_steps: int | None = field(default=None, repr=False, compare=False)
    _p_cache: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._running is not None:
            self._cache[self._running.S] = self._running
            self._n_steps = self._running.steps

    def _cosine_file(self) -> Path:
        if self.folder is None:
            raise ReconError(
                "this process holds no cosines: under torchrun only rank 0 writes them; read them on rank 0"
            )
        return self.folder / COSINES_FILE

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(combinations(self.tasks, 2))

    @property
    def cosine_array(self) -> np.ndarray:
        """``(steps, layers, pairs)`` float32 (memory-mapped); NaN where a task's layer gradient was zero."""
        return open_cosines(self._cosine_file())

    @property
    def has_gram(self) -> bool:
        """Whether the profile recorded the per-step Gram matrices (the interference score needs them)."""
        return self._gram_sums is not None or (self.folder is not None and (self.folder / GRAM_FILE).exists())

    @property
    def gram_array(self) -> np.ndarray:
        """``(steps, layers, K + pairs)`` float32 (memory-mapped): per step and shared layer, the K squared
        gradient norms ``<g_i, g_i>``, then the pairs' dot products ``<g_i, g_j>`` in :attr:`pairs` order."""
        if not self.has_gram:
            raise ReconError(_NO_GRAM)
        return open_array(self._cosine_file().parent / GRAM_FILE)  # no folder: the rank-0 message

    def _gram(self) -> GramSums:
        if self._gram_sums is None:
            self._gram_sums = GramSums.of(self.gram_array, len(self.tasks))
        return self._gram_sums

    @property
    def steps(self) -> int:
        if self._n_steps is None:  # read from the file's header once
            self._n_steps = int(read_shape(self._cosine_file())[0])
        return self._n_steps

    @property
    def total_steps(self) -> int:
        """Training steps the profile ran; :attr:`steps` of them recorded cosines (all unless sampled)."""
        return int(self.meta.get("total_steps", self.steps))

    @property
    def every(self) -> int:
        """The sampling period: cosines were recorded on every ``every``-th step (1: every step)."""
        return int(self.meta.get("every", 1))

    def steps_text(self) -> str:
        """``"40 steps"``, or ``"2 recorded of 40 steps (1 in 39)"`` for a sampled profile."""
        if self.every == 1 and self.total_steps == self.steps:
            return f"{self.steps} steps"
        return f"{self.steps} recorded of {self.total_steps} steps (1 in {self.every})"

    @property
    def cosines(self) -> pd.DataFrame:
        """Every record: columns ``step, layer, task_a, task_b, cos`` (NaN = skipped, zero gradient)."""
        arr = np.asarray(self.cosine_array)
        T, L, P = arr.shape
        pairs = self.pairs
        steps = np.asarray(self.meta.get("recorded", np.arange(T)))[:T]  # training steps of a sampled profile
        return pd.DataFrame(
            {
                "step": np.repeat(steps, L * P),
                "layer": pd.Categorical(np.tile(np.repeat(np.array(self.layers, dtype=object), P), T)),
                "task_a": np.tile(np.array([a for a, _ in pairs], dtype=object), T * L),
                "task_b": np.tile(np.array([b for _, b in pairs], dtype=object), T * L),
                "cos": arr.reshape(-1),
            }
        )

    @property
    def losses(self) -> pd.DataFrame:
        """Per-step training loss of every task (columns ``step`` and one per task)."""
        if self._loss_frame is not None:
            return self._loss_frame.copy()
        path = self.folder / LOSSES_FILE if self.folder is not None else None
        if path is None or not path.exists():
            return pd.DataFrame(columns=["step", *self.tasks])
        return pd.read_csv(path)

    def _counts(self, S: float, block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per layer: count of cos < S, count of recorded (non-skipped) cosines, sum of cosines; per pair, the
        conflict rate. At the profiled S from the counts kept while streaming; at another S from one pass over
        the file (then kept)."""
        counts = self._cache.get(float(S))
        if counts is None:
            counts = self._cache[float(S)] = ConflictCounts.of(self.cosine_array, S, block)
        below, valid = counts.below, counts.valid
        return below.sum(axis=1), valid.sum(axis=1), counts.total.sum(axis=1), below / np.maximum(valid, 1)

    def interference(self) -> np.ndarray:
        """``(layers, pairs)``: the mean over recorded steps of ``-<g_i, g_j>`` per shared layer and task pair
        (see :meth:`scores`); a :class:`ReconError` on a profile without Gram matrices."""
        sums = self._gram()
        return -sums.dots / max(sums.steps, 1)

    def per_step_scores(self, S: float | None = None, *, score: str = "s-conflict") -> np.ndarray:
        """``(steps, layers)``: each recorded step's contribution to each layer's score (summed over steps, the
        S-conflict score; averaged, the interference), the rows :func:`recon._confidence.top_k_probability`
        resamples."""
        if check_score(score) == "interference":
            return self._gram().per_step
        S = self.S if S is None else check_threshold(S)
        self._counts(S)
        return self._cache[float(S)].per_step

    def confidence(self, k: int = CONFIDENCE_K, S: float | None = None, *, score: str = "s-conflict") -> pd.Series:
        """Per layer, ``p_top_k``: the share of 1,000 bootstrap resamples of the recorded steps (seed 0) in
        which the layer ranks among the ``k`` highest by ``score`` (:mod:`recon._confidence`)."""
        S = self.S if S is None else check_threshold(S)
        key = (check_score(score), float(S), int(k))
        if key not in self._p_cache:
            self._p_cache[key] = top_k_probability(self.per_step_scores(S, score=score), k)
        return pd.Series(self._p_cache[key], index=pd.Index(self.layers, name="layer"), name="p_top_k")

    def scores(self, S: float | None = None, *, score: str = "s-conflict", k: int | None = None) -> pd.DataFrame:
        """Layer scores, indexed by layer, sorted by ``score`` descending (ties keep the model's layer order).

        ``score="s-conflict"`` (default): the S-conflict score (Definition 3 of the paper), the count of
        recorded ``cos_ij < S`` over steps and pairs (int). ``score="interference"``: the mean over recorded
        steps of ``sum_{i<j} -<g_i, g_j>``, the first-order amount by which one joint step's cross-task terms
        raise the summed task losses and per-task copies of the layer remove (positive: splitting lowers the
        summed losses to first order; negative: the layer carries positive transfer a split would lose).

        Columns: ``score``, ``conflict_rate`` (share of recorded pairs with cos < S), ``mean_cos``, ``params``,
        ``type``, ``tasks``; ``interference`` when the profile has Gram matrices (and ``s_conflict``, the count,
        when ranking by interference); ``p_top_k``: the bootstrap probability that the layer is among the ``k``
        highest by ``score`` (:meth:`confidence`; ``k`` defaults to 4, or the number of layers when fewer;
        ``frame.attrs["k"]`` says which).
        """
        S = self.S if S is None else check_threshold(S)
        if check_score(score) == "interference" and not self.has_gram:
            raise ReconError(_NO_GRAM)
        below, valid, total, _ = self._counts(S)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(valid > 0, below / np.maximum(valid, 1), np.nan)
            mean = np.where(valid > 0, total / np.maximum(valid, 1), np.nan)
        info = [self.layer_info.get(n, {}) for n in self.layers]
        columns: dict[str, Any] = {
            "score": below.astype(int),
            "conflict_rate": rate,
            "mean_cos": mean,
            "params": [int(i.get("params", 0)) for i in info],
            "type": [i.get("type", "") for i in info],
            "tasks": [",".join(i.get("tasks", self.tasks)) for i in info],
        }
        if self.has_gram:
            columns["interference"] = self.interference().sum(axis=1)
            if score == "interference":
                columns["s_conflict"], columns["score"] = columns["score"], columns["interference"]
        k = min(CONFIDENCE_K if k is None else k, len(self.layers))
        columns["p_top_k"] = self.confidence(k, S, score=score).to_numpy()
        frame = pd.DataFrame(columns, index=pd.Index(self.layers, name="layer"))
        frame = frame.sort_values("score", ascending=False, kind="stable")
        frame.attrs.update(score=score, k=k, S=S)
        return frame

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
            hint = did_you_mean(layer, self.layers)
            raise ReconError(f"unknown layer {layer!r}{hint}; the profiled shared layers are {self.layers}")
        column = np.asarray(self.cosine_array[:, self.layers.index(layer), :], dtype=np.float32)
        below = (column < S).sum(axis=0)  # NaN compares False: skipped pairs never count
        valid = (~np.isnan(column)).sum(axis=0)
        K = len(self.tasks)
        out = np.zeros((K, K), dtype=np.int64 if counts else np.float64)
        for p, (a, b) in enumerate(combinations(range(K), 2)):
            out[a, b] = out[b, a] = below[p] if counts else (below[p] / valid[p] if valid[p] else 0.0)
        return pd.DataFrame(out, index=pd.Index(self.tasks, name="task"), columns=list(self.tasks))

    def interference_matrix(self, layer: str) -> pd.DataFrame:
        """``K x K`` (tasks x tasks, symmetric, zero diagonal): the mean over recorded steps of
        ``-<g_i, g_j>`` on ``layer``; summed over the pairs a split separates, the interference it removes."""
        if layer not in self.layers:
            raise ReconError(f"unknown layer {layer!r}; the profiled shared layers are {self.layers}")
        row = self.interference()[self.layers.index(layer)]
        K = len(self.tasks)
        out = np.zeros((K, K))
        for p, (a, b) in enumerate(combinations(range(K), 2)):
            out[a, b] = out[b, a] = row[p]
        return pd.DataFrame(out, index=pd.Index(self.tasks, name="task"), columns=list(self.tasks))

    def top_layers(self, k: int, S: float | None = None, *, score: str = "s-conflict") -> list[str]:
        """The ``k`` layers with the highest scores (S-conflict, or ``score="interference"``)."""
        if not isinstance(k, int) or k < 0:
            raise ReconError(f"top-k = {k!r} must be a non-negative integer")
        if k > len(self.layers):
            raise ReconError(
                f"top-k = {k} exceeds the {len(self.layers)} shared layers; choose k <= {len(self.layers)} "
                f"(shared layers: {', '.join(self.layers)})"
            )
        return list(self.scores(S, score=score).index[:k])

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
        """Write ``profile.json``, ``cosines.npy``, ``gram.npy``, ``losses.csv``, ``scores.csv`` and
        ``scores.json``."""
        path = Path(path)
        home = self._cosine_file().parent
        path.mkdir(parents=True, exist_ok=True)
        for name in (COSINES_FILE, GRAM_FILE, LOSSES_FILE):
            src = home / name
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
        for name in (COSINES_FILE, GRAM_FILE):  # a truncated array: one line naming it, here rather than later
            if (path / name).exists():
                read_shape(path / name)
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
    """Per layer, the tasks whose output it reaches in the torch.fx graph (raises ``TraceError``); a ReconError
    too when leaves are involved: the graph cannot tell which task reaches a parameter inside one, autograd can."""
    from recon._capture import capture
    from recon._graph import layer_names

    captured = capture(model, leaf_modules=tuple(leaf_modules), mode="fx")
    if captured.leaves:
        raise ReconError(f"leaves {captured.leaves}: discover the shared layers with autograd")
    return captured.layer_tasks(list(tasks), layer_names(model))


def layer_usage_captured(
    model: nn.Module, tasks: Sequence[str], leaf_modules: Sequence[str], data: Any
) -> tuple[dict[str, frozenset], str]:
    """``(usage, how)``: per layer, the tasks whose output it reaches in the captured graph, and how it was
    captured (``"fx"`` or ``"export"``). Where the data can be read twice (a function or a re-iterable
    loader) its first batch is at hand and the model is captured as ``recon split`` captures it: torch.fx
    with the arguments the batch leaves out at their defaults, else torch.export. With leaves (the graph cannot
    tell which task reaches a parameter inside one) a ReconError: autograd discovers them on the first step."""
    from recon._capture import capture
    from recon._graph import layer_names
    from recon._outputs import move_to

    try:  # fx needs no batch: reading one has side effects on real loaders (workers, samplers, counters)
        return layer_usage_fx(model, tasks, leaf_modules), "fx"
    except ReconError:
        inputs = _first_inputs(data)
        if inputs is None:
            raise
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    captured = capture(model, example_inputs=move_to(inputs, device), leaf_modules=tuple(leaf_modules))
    if captured.leaves:
        raise ReconError(f"leaves {captured.leaves}: discover the shared layers with autograd")
    return captured.layer_tasks(list(tasks), layer_names(model)), captured.how


def _first_inputs(data: Any) -> Any:
    """The inputs of the first batch, when reading it does not use up the data (None otherwise)."""
    try:
        source = data() if callable(data) else data
        iterator = iter(source)
        if iterator is source:  # a one-shot iterator: peeking would lose a batch
            return None
        batch = next(iterator)
    except Exception:  # noqa: BLE001 - no batch at hand: autograd discovery, as before
        return None
    return batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None


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
    m = resolve(method)
    if m.kind not in ("gradient",):
        raise ReconError(
            f"the profiling warm-up aggregates task gradients; {method!r} is a {m.kind} method. "
            "Use a gradient method (joint, pcgrad, cagrad, ...; see `recon methods`)"
        )
    return m.bind(tasks)


class _Profiler(Observer):
    """The profiler's side of a run of the step engine: finds the shared layers (torch.fx before the first step,
    else autograd on it), records every step's layer-wise cosines and losses, and makes the
    :class:`ConflictProfile`. Only rank 0 has a ``folder``; the other processes keep running counts only."""

    wants_gradients = True

    def __init__(
        self,
        model: nn.Module,
        tasks: list[str],
        *,
        S: float,
        folder: Path | None,
        chunk: int,
        meta: dict[str, Any],
        tmp: tempfile.TemporaryDirectory | None = None,
        save: bool = False,
    ) -> None:
        self.model, self.tasks, self.S, self.folder, self.chunk = model, tasks, S, folder, chunk
        self.meta, self.tmp, self.save = meta, tmp, save and folder is not None
        self.usage: Mapping[str, frozenset] | None = None
        self.layers: list[str] = []
        self.cosines: LayerCosines | None = None
        self.recorder: CosineRecorder | None = None
        self.gram_recorder: GramRecorder | None = None
        self.loss_log: list[list[float]] = []
        self.recorded: list[int] = []  # the engine steps whose cosines were recorded

    @property
    def n_pairs(self) -> int:
        return len(self.tasks) * (len(self.tasks) - 1) // 2

    def setup(self, engine: StepEngine, usage: Mapping[str, frozenset]) -> None:
        """The shared layers of ``usage`` and their parameters: J's columns, the cosine kernel, the recorder."""
        self.usage = usage
        self.layers, layer_params = shared_layer_params(engine.names, usage)
        if engine.shared_idx is None:  # fx: the shared layers' parameters; autograd: those 2+ tasks reached
            engine.shared_idx = [i for _, i in layer_params]
        self.cosines = LayerCosines(engine.params, layer_params, len(self.layers), len(self.tasks))
        self._recorders(engine.device, len(self.layers), self.chunk)

    def _recorders(self, device: torch.device, n_layers: int, chunk: int) -> None:
        def path(name: str) -> Path | None:
            return self.folder / name if self.folder is not None else None

        self.recorder = CosineRecorder(path(COSINES_FILE), n_layers, self.n_pairs, device=device, chunk=chunk, S=self.S)
        self.gram_recorder = GramRecorder(path(GRAM_FILE), n_layers, len(self.tasks), device=device, chunk=chunk)

    def on_gradients(self, engine: StepEngine, grads: TaskGradients) -> None:
        if self.recorder is None:  # autograd discovery, on the first step
            self.setup(engine, layer_usage_autograd(engine.names, [[self.tasks[k] for k in u] for u in grads.users]))
        self.record(engine, grads)

    def record(self, engine: StepEngine, grads: TaskGradients) -> None:
        """What a recorded step keeps: each shared layer's K x K Gram matrix of the task gradients (``gram.npy``,
        the interference score) and the layer-wise cosines computed from it (``cosines.npy``, S-conflict)."""
        gram = self.cosines.grams(grads, engine.device)
        self.recorder.append(gram_cosines(gram))
        self.gram_recorder.append(gram_rows(gram))
        self.recorded.append(engine.step)

    def on_step(self, engine: StepEngine, losses: list[float]) -> None:
        self.loss_log.append(losses)

    def close(self) -> None:
        for recorder in (self.recorder, self.gram_recorder):
            if recorder is not None:
                recorder.close()

    def run(self, engine: StepEngine, data: Any, *, epochs: int | None, max_steps: int | None) -> ConflictProfile:
        """Run the engine and make the profile. On Ctrl-C or a non-finite loss the partial profile is attached to
        the exception as ``exc.profile``."""
        try:
            done = engine.run(data, epochs=epochs, max_steps=max_steps)
        except (KeyboardInterrupt, NonFiniteLossError) as e:
            e.profile = self.result(engine, partial=True)  # type: ignore[attr-defined]
            raise
        except BaseException:
            self.close()
            raise
        if done == 0:
            self.close()
            raise ReconError("the data yielded no batch; give at least one (inputs, targets) batch")
        asked = self.meta.get("steps_asked")
        return self.result(engine, partial=asked is not None and engine.step < asked)

    def result(self, engine: StepEngine, *, partial: bool) -> ConflictProfile:
        """Close the record (an empty but valid one if no step completed), make the profile, save it when
        asked."""
        if self.recorder is None:
            self._recorders(engine.device, 0, 1)
        self.close()
        losses = pd.DataFrame(self.loss_log, columns=self.tasks).rename_axis("step")
        if self.folder is not None:
            _io.write_text(self.folder / LOSSES_FILE, losses.to_csv(float_format="%.6g"))
        modules = dict(self.model.named_modules())
        usage = self.usage or {}
        info = {
            ln: {
                "params": sum(p.numel() for p in modules[ln].parameters(recurse=False)),
                "type": type(modules[ln]).__name__,
                "tasks": sorted(usage.get(ln, ()), key=self.tasks.index),
            }
            for ln in self.layers
        }
        meta = dict(self.meta)
        meta["total_steps"] = len(self.loss_log)
        if meta.get("every", 1) > 1:
            meta["recorded"] = self.recorded[: self.recorder.steps]
        if getattr(engine.precision, "scaling", False):
            meta["skipped_steps"] = engine.precision.skipped  # fp16 steps skipped for overflowing gradients
        prof = ConflictProfile(
            tasks=self.tasks, layers=self.layers, folder=self.folder, S=self.S, layer_info=info, partial=partial,
            discovery=meta.pop("discovery"), meta=meta, _tmp=self.tmp, _running=self.recorder.counts,
            _gram_sums=self.gram_recorder.sums, _loss_frame=losses.reset_index(),
        )  # fmt: skip
        if self.save:
            prof.save(self.folder)
        return prof


def _discover(model: nn.Module, tasks: list[str], leaf_modules: Sequence[str], data: Any) -> tuple[Mapping | None, str]:
    """The shared layers from the captured graph (:func:`layer_usage_captured`), or None to find them with
    autograd on the first step."""
    try:
        return layer_usage_captured(model, tasks, leaf_modules, data)
    except (ReconError, ImportError):  # TraceError is a ReconError
        return None, "autograd"


def _check_profile_args(
    loss_fns: dict, tasks: Sequence[str] | None, S: float, steps: int | None, epochs: int, every: int | str
):
    task_names = validate_tasks(tasks if tasks is not None else list(loss_fns), "profile")
    missing = [t for t in task_names if t not in loss_fns]
    if missing:
        raise ReconError(f"no loss for task(s) {missing}; `losses` must have one entry per task")
    if len(task_names) < 2:
        raise ReconError(f"profiling needs at least two tasks, got {task_names}; conflicts are between tasks")
    if steps is not None and steps < 1:
        raise ReconError(f"steps = {steps} must be at least 1")
    if epochs < 1:
        raise ReconError(f"epochs = {epochs} must be at least 1")
    return task_names, check_threshold(S), sampling_period(every, len(task_names))


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
    precision: str | int | Precision = "32",
    batched: bool | str = "auto",
    every: int | str = 1,
    task_chunk: int | str = "auto",
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
            Under torchrun only rank 0 writes; the other processes' profiles hold the scores at ``S`` only.
        precision: ``"32"``, ``"bf16"`` or ``"fp16"`` (autocast on the model's device; fp16 with one loss scale
            for the K task passes; a step whose gradients overflow is skipped and records no cosines).
        batched: the K task gradients in one vectorised backward (``True``), K passes (``False``) or batched on
            CUDA only (``"auto"``); see docs/scaling.md.
        every: record task gradients and cosines on every N-th step only (the first always; the others train
            with one backward of the mean loss); ``"auto"``: :func:`auto_every`. Scores count recorded steps.
        task_chunk: tasks per chunk of task gradients (:mod:`recon._chunks`); ``"auto"``: all K when they fit.

    On Ctrl-C or a non-finite loss, what was recorded is kept: the exception is re-raised with the partial
    profile attached as ``exc.profile``.
    """
    if callable(losses) and not isinstance(losses, Mapping):
        losses = losses()
    loss_fns = dict(losses)
    task_names, S, n_every = _check_profile_args(loss_fns, tasks, S, steps, epochs, every)

    torch.manual_seed(seed)
    if device is not None:
        model.to(_distributed.local_device(torch.device(device)))
    dev = next(model.parameters()).device
    _distributed.broadcast_parameters(model)
    main = _distributed.is_main()  # only rank 0 writes files and prints
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=1e-3)
    engine = StepEngine(
        model, loss_fns, task_names, method=_warmup_method(method, task_names), optimizer=opt, device=dev,
        precision=Precision.of(precision, dev), batched=batched, every=n_every, task_chunk=task_chunk,
    )  # fmt: skip
    data = _distributed.shard_data(data, "data")
    usage, discovery = _discover(model, task_names, leaf_modules, data)
    tmp, folder = _home(out) if main else (None, None)
    meta = {"method": spec_of(method), "seed": seed, "leaf_modules": list(leaf_modules), "discovery": discovery}
    n = batch_count(data)
    total = steps if steps is not None else (None if n is None else n * epochs)  # fewer steps done: partial
    meta.update(precision=engine.precision.mode, every=n_every, every_auto=every == "auto", steps_asked=total)
    profiler = _Profiler(model, task_names, S=S, folder=folder, chunk=chunk, meta=meta, tmp=tmp, save=out is not None)
    if usage is not None:
        profiler.setup(engine, usage)
    engine.observers.append(profiler)
    with progress_bar(total, "profiling", enabled=progress and main) as bar:
        engine.observers.append(ProgressObserver(bar))
        return profiler.run(engine, data, epochs=epochs if steps is None else None, max_steps=steps)


def auto_every(n_tasks: int) -> int:
    """The sampling period of ``every="auto"``: ``K - 1``. A recorded step costs one forward and K backward
    passes, another step one of each, so a period N costs ``1 + (K - 1) / N`` plain backward passes per step on
    average: at most twice a plain training step (less, counting the forward pass)."""
    return max(1, n_tasks - 1)


def sampling_period(every: int | str, n_tasks: int) -> int:
    """``every`` as a period: a positive integer, or ``"auto"`` (:func:`auto_every`)."""
    if every == "auto":
        return auto_every(n_tasks)
    if isinstance(every, str) and every.isdigit():
        every = int(every)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ReconError(f"every = {every!r} must be a positive integer or 'auto' (record every N-th step)")
    return every


def _home(out: str | os.PathLike | None) -> tuple[tempfile.TemporaryDirectory | None, Path]:
    """Where rank 0 streams the cosines: ``out``, or a temporary folder the profile owns until saved."""
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="recon-profile-")
        return tmp, Path(tmp.name)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return None, folder
