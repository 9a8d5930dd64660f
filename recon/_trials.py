"""Paired trials: compare candidate models of one task set fairly, at equal cost, with paired statistics.

What ``benchmarks/evidence.py`` (the equal-cost study) and ``recon search`` share:

* **paired trials** (:func:`run_trial`): every candidate of one seed is built from the *same* unsplit model (built
  under the seed, then split with ``init="copy"``, or, for a wider model, given every parameter whose name and
  shape it shares with the unsplit one), and sees the same batches in the same order (:class:`PairedBatches`
  draws the data with a random stream of its own, fixed by the seed and the epoch, that the model's training
  never touches). The differences between candidates of one seed are then differences of architecture, not
  of luck, which is what makes a paired interval over a few seeds narrow;
* **candidates at equal cost** (:class:`CostModel`): random shared-layer sets drawn by rejection sampling
  (:func:`random_layers`), the "deeper heads" a practitioner would branch without a profiler
  (:func:`deeper_heads`), and a width-matched unsplit model (:func:`match_width`);
* **paired statistics** (:func:`paired_difference`): the mean paired difference over seeds with a 95% Student-t
  interval (and a bootstrap one), "not resolved" when the interval contains zero.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from recon._errors import ReconError
from recon._graph import _layer_tasks, layer_names, node_layers, output_tasks, trace

__all__ = [
    "Candidate",
    "CostModel",
    "PairedBatches",
    "PairedDifference",
    "ShortEpochs",
    "TrialResult",
    "TrialSetup",
    "deeper_heads",
    "forward_flops",
    "match_width",
    "paired_difference",
    "paired_model",
    "random_layers",
    "run_trial",
    "step_time_ratio",
]

Spec = Mapping[str, Sequence[Sequence[str]] | None]


# ------------------------------------------------------------------------------------------- candidates
@dataclasses.dataclass(frozen=True)
class Candidate:
    """One model to try: the unsplit model (``spec=None``, ``build={}``), a split of it (``spec``: the layers,
    or ``{layer: groups}``, as :func:`recon.split` takes them), or the model built with other keyword
    arguments (``build``, e.g. ``{"hidden": 80}`` for a width-matched model)."""

    name: str
    spec: Spec | Sequence[str] | None = None
    build: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def key(self) -> str:
        """A short content hash: two candidates with the same architecture share it (whatever their names)."""
        spec = self.spec
        if spec is not None and not isinstance(spec, Mapping):
            spec = dict.fromkeys(spec)
        text = repr((sorted((spec or {}).items()), sorted(self.build.items())))
        return hashlib.sha1(text.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What a trial needs of a task set (a recipe gives all of it: :meth:`from_recipe`)."""

    build_model: Callable[..., nn.Module]
    train_data: Callable[[], Iterable]
    val_data: Callable[[], Iterable]
    losses: Mapping[str, Callable]
    metrics: Mapping[str, Mapping[str, tuple[Callable, str]]]
    example_inputs: Any
    #: ``optimizer(params)``, e.g. a recipe's; None: Adam (lr 1e-3)
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None

    @classmethod
    def from_recipe(cls, recipe: Any) -> TrialSetup:
        if recipe.val_data is None or not recipe.metrics:
            raise ReconError(f"{recipe.path}: trials compare validation metrics; define val_data() and metrics")
        x = recipe.first_batch()[0]
        return cls(recipe.build_model, recipe.train_data, recipe.val_data, recipe.losses, recipe.metrics, x)

    @property
    def tasks(self) -> list[str]:
        return list(self.losses)


def paired_model(setup: TrialSetup, candidate: Candidate, seed: int) -> nn.Module:
    """The candidate's model for ``seed``: the unsplit model built under the seed, then split with
    ``init="copy"`` (every copy starts as the shared layer it replaces) or, for ``candidate.build``, the model
    built with those arguments and given every parameter and buffer whose name and shape the unsplit one has."""
    import recon

    recon.seed_everything(seed)
    base = setup.build_model()
    if candidate.build:
        wide = setup.build_model(**candidate.build)
        own = wide.state_dict()
        shared = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
        wide.load_state_dict(shared, strict=False)
        base = wide
    if candidate.spec:
        spec = candidate.spec if isinstance(candidate.spec, Mapping) else list(candidate.spec)
        return recon.split(base, spec, init="copy")
    return base


# ----------------------------------------------------------------------------------------- paired data
class PairedBatches:
    """``train_data`` for :func:`recon.train` whose batches depend only on ``(seed, epoch)``.

    Each call returns the next epoch's batches. The data is drawn while the global torch, NumPy and Python
    random states are swapped for a stream of the data's own, seeded by ``(seed, epoch)``, and swapped back
    before each batch is handed to training: whatever the candidate's training draws (dropout, PCGrad's task
    order, a split's fresh copies) never moves the data order. ``fingerprints`` (with ``record=True``) holds a
    hash of every batch handed out, to check the pairing.
    """

    def __init__(self, data: Callable[[], Iterable], seed: int, *, record: bool = False) -> None:
        self.data, self.seed, self.epoch = data, seed, 0
        self.fingerprints: list[str] | None = [] if record else None

    def __call__(self) -> _Epoch:
        return _Epoch(self)

    def batches(self) -> Iterator[Any]:
        """The next epoch's batches (the epoch counts when iteration starts, not when the data is asked for)."""
        self.epoch += 1
        state = _seeded_state(self.seed * 1_000_003 + self.epoch)
        it: Iterator[Any] | None = None
        while True:
            outer = _get_state()
            _set_state(state)
            try:
                if it is None:
                    it = iter(self.data())
                batch = next(it, None)
            finally:
                state = _get_state()
                _set_state(outer)
            if batch is None:
                return
            if self.fingerprints is not None:
                self.fingerprints.append(_fingerprint(batch))
            yield batch

    def length(self) -> int:
        """Batches per epoch (``TypeError`` when the data has no length), read without moving any random state."""
        outer = _get_state()
        try:
            return len(self.data())  # type: ignore[arg-type]
        finally:
            _set_state(outer)


class ShortEpochs:
    """``train_data`` cut to its first ``steps`` batches per call: trials shorter than an epoch. Under
    :class:`PairedBatches` each call draws a new data order, so a shuffling loader gives each short epoch a new
    random subset (a loader with a fixed generator gives the same first batches each time)."""

    def __init__(self, data: Callable[[], Iterable], steps: int) -> None:
        self.data, self.steps = data, steps

    def __call__(self) -> Iterable:
        return itertools.islice(self.data(), self.steps)


class _Epoch:
    """One epoch of :class:`PairedBatches`: a length for progress, the batches when iterated."""

    def __init__(self, owner: PairedBatches) -> None:
        self.owner = owner

    def __len__(self) -> int:
        return self.owner.length()

    def __iter__(self) -> Iterator[Any]:
        return self.owner.batches()


def _seeded_state(seed: int) -> tuple[Any, Any, Any]:
    outer = _get_state()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    state = _get_state()
    _set_state(outer)
    return state


def _get_state() -> tuple[Any, Any, Any]:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_state(state: tuple[Any, Any, Any]) -> None:
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


def _fingerprint(batch: Any) -> str:
    digest = hashlib.sha1()
    for t in _tensors(batch):
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for k in sorted(value):
            yield from _tensors(value[k])
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


# ------------------------------------------------------------------------------------------------ cost
def forward_flops(model: nn.Module, example_inputs: Any) -> float:
    """Forward FLOPs on ``example_inputs`` (``torch.utils.flop_counter``), on a copy in eval mode (so no
    BatchNorm statistic of ``model`` moves)."""
    from torch.utils.flop_counter import FlopCounterMode

    from recon._outputs import call_model

    work = copy.deepcopy(model).eval()
    with FlopCounterMode(display=False) as mode, torch.no_grad():
        call_model(work, example_inputs)
    return float(mode.get_total_flops())


def step_time_ratio(
    reference: nn.Module, candidate: nn.Module, batch: Any, losses: Mapping[str, Callable], method: str, reps: int = 7
) -> float:
    """Median over ``reps`` of (candidate step time / reference step time), the two timed alternately on copies
    (one training step: forward, the task losses and :func:`recon.backward` with ``method``), so a change in
    machine load hits both."""
    import recon
    from recon._outputs import call_model

    x, y = batch
    nets = [copy.deepcopy(reference).train(), copy.deepcopy(candidate).train()]
    m = recon.methods.get(method)

    def step(net: nn.Module) -> float:
        net.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = call_model(net, x)
        recon.backward({t: fn(out[t], y[t]) for t, fn in losses.items()}, net, m)
        return time.perf_counter() - start

    for net in nets:  # warm-up
        step(net)
    return statistics.median(step(nets[1]) / step(nets[0]) for _ in range(reps))


class CostModel:
    """Added parameters and forward FLOPs of any split of one model, from one traced graph.

    Parameters are exact (a layer branched into ``g`` groups adds ``g - 1`` times its own); FLOPs come from
    :class:`recon._plan.FlopModel` (each node counted once, times the task classes it runs for after the split).
    """

    def __init__(self, model: nn.Module, tasks: Sequence[str], example_inputs: Any, leaf_modules: Sequence[Any] = ()):
        from recon._plan import FlopModel, _frozen_copy

        work = _frozen_copy(model)
        gm = trace(work, leaf_modules=leaf_modules)
        self.tasks = list(output_tasks(gm, tasks))
        usage = _layer_tasks(gm, self.tasks, layer_names(work))
        shared = {n for n, users in usage.items() if len(users) >= 2}
        first: dict[str, int] = {}
        for i, node in enumerate(gm.graph.nodes):
            for layer in node_layers(gm, node, shared):
                first.setdefault(layer, i)
        #: the shared layers in topological order (of their first use in the traced graph)
        self.layers = sorted(shared, key=first.__getitem__)
        self.users = {n: [t for t in self.tasks if t in usage[n]] for n in self.layers}
        self.own = {n: sum(p.numel() for p in work.get_submodule(n).parameters(recurse=False)) for n in self.layers}
        self.base_params = sum(p.numel() for p in work.parameters())
        self.flop_model = FlopModel(gm, self.tasks, self.layers, example_inputs)
        self.base_flops = float(self.flop_model.base)

    def groups(self, spec: Spec | Sequence[str]) -> dict[str, list[list[str]]]:
        """``spec`` with every per-task layer (a list entry, or ``None``) written as its groups."""
        items = spec.items() if isinstance(spec, Mapping) else ((n, None) for n in spec)
        unknown = [n for n, _ in items if n not in self.users]
        if unknown:
            raise ReconError(f"{unknown} are not shared layers of the model; shared: {self.layers}")
        items = spec.items() if isinstance(spec, Mapping) else ((n, None) for n in spec)
        return {n: [list(g) for g in g_] if g_ is not None else [[t] for t in self.users[n]] for n, g_ in items}

    def added_params(self, spec: Spec | Sequence[str]) -> int:
        return sum((len(part) - 1) * self.own[n] for n, part in self.groups(spec).items())

    def flops(self, spec: Spec | Sequence[str]) -> float:
        """Forward FLOPs of the model split with ``spec``."""
        return float(self.flop_model.count(self.groups(spec)))


def random_layers(
    cost: CostModel,
    *,
    params: float,
    flops: float,
    seed: int,
    tolerance: float = 0.1,
    floor: float = 0.01,
    avoid: Iterable[str] | None = None,
    draws: int = 200_000,
) -> list[str]:
    """A random set of shared layers (per-task copies) whose added parameters and added forward FLOPs each lie
    within ``tolerance`` of ``params`` and ``flops - base`` (the plan it controls for), by rejection sampling.

    Each proposal first draws an inclusion probability ``p ~ U(0, 1)``, then includes every shared layer
    independently with probability ``p``: every subset of a given size is equally likely, so the accepted
    draws are uniform among the matching subsets of each size (a greedy fill under a cap would instead
    favour "all the small layers", the same set every seed). A tolerance is ``tolerance x`` the target's
    added amount, but at least ``floor x`` the base model's (so "adds almost nothing" can be matched).
    ``avoid``: a set never returned (the plan's own). Raises :class:`ReconError` when ``draws`` proposals
    find no match.
    """
    rng = np.random.default_rng(seed)
    layers = cost.layers
    own = np.array([(len(cost.users[n]) - 1) * cost.own[n] for n in layers], dtype=np.float64)
    added_flops = flops - cost.base_flops
    p_tol = tolerance * max(params, floor * cost.base_params)
    f_tol = tolerance * max(added_flops, floor * cost.base_flops)
    banned = frozenset(avoid) if avoid is not None else None
    for _ in range(draws):
        mask = rng.random(len(layers)) < rng.random()
        if not mask.any() or abs(own[mask].sum() - params) > p_tol:
            continue
        pick = [n for n, m in zip(layers, mask, strict=True) if m]
        if frozenset(pick) == banned:
            continue
        if abs(cost.flops(pick) - cost.base_flops - added_flops) <= f_tol:
            return pick
    raise ReconError(
        f"no random set of shared layers within ±{tolerance:.0%} of +{params:,.0f} parameters and "
        f"+{added_flops:,.0f} FLOPs in {draws:,} draws; widen the tolerance"
    )


def deeper_heads(cost: CostModel, *, max_params: float, max_flops: float = math.inf) -> list[str]:
    """The shared layers nearest the outputs, in reverse topological order, added (per-task copies) while the
    split fits ``max_params`` added parameters and ``max_flops`` forward FLOPs: what a practitioner branches
    without a profiler (stops at the first layer that does not fit, so the set is a contiguous top of the
    trunk)."""
    chosen: list[str] = []
    for layer in reversed(cost.layers):
        trial = [*chosen, layer]
        if cost.added_params(trial) > max_params or cost.flops(trial) > max_flops:
            break
        chosen = trial
    return chosen


def match_width(
    build_model: Callable[..., nn.Module],
    options: Iterable[Mapping[str, Any]],
    *,
    params: float,
    max_flops: float,
    example_inputs: Any,
) -> tuple[dict[str, Any], int, float]:
    """Among ``build_model(**option)`` for each option, the one whose parameter count is closest to ``params``
    without exceeding it, within ``max_flops`` forward FLOPs: ``(option, params, flops)``."""
    best: tuple[dict[str, Any], int, float] | None = None
    for option in options:
        model = build_model(**option)
        n = sum(p.numel() for p in model.parameters())
        if n > params or (best is not None and n <= best[1]):
            continue
        f = forward_flops(model, example_inputs)
        if f <= max_flops:
            best = (dict(option), n, f)
    if best is None:
        raise ReconError(f"no width option fits {params:,.0f} parameters and {max_flops:,.0f} FLOPs")
    return best


# -------------------------------------------------------------------------------------------------- trial
@dataclasses.dataclass
class TrialResult:
    """One candidate trained for one seed: the validation metrics after each epoch and its cost."""

    candidate: str
    key: str
    seed: int
    method: str
    epochs: int
    tasks: list[str]
    final: dict[str, dict[str, float]]
    history: list[dict[str, float]]
    params: int
    flops: float
    step_ratio: float
    seconds: float
    delta_m: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_trial(
    setup: TrialSetup,
    candidate: Candidate,
    *,
    seed: int,
    method: str = "joint",
    epochs: int,
    tasks: Sequence[str] | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    lr_schedule: str = "cosine",
    time_steps: bool = True,
    fingerprints: list[str] | None = None,
    eval_each_epoch: bool = True,
) -> TrialResult:
    """Train ``candidate`` for ``seed`` (paired: :func:`paired_model`, :class:`PairedBatches`) with ``method``
    for ``epochs``; ``tasks`` restricts training to some tasks (one task: a single-task baseline).

    Adam (lr 1e-3) with, by default, a cosine decay of the learning rate to 0 over the run, stepped per epoch
    (Loshchilov & Hutter, SGDR, ICLR 2017, eq. 5 without restarts): the last epoch's metrics are then those of
    a settled model rather than one point of a noisy curve. Δm% against ``baselines`` when given; the step
    time ratio is measured against the unsplit model of the same seed (1.0 for the unsplit model itself).
    ``fingerprints``: a list that receives a hash of every training batch, in order (to check the pairing);
    ``eval_each_epoch=False`` evaluates once, after the last epoch (short trials), instead of after every epoch."""
    import recon

    names = list(tasks) if tasks is not None else setup.tasks
    net = paired_model(setup, candidate, seed)
    params = sum(p.numel() for p in net.parameters())
    flops = forward_flops(net, setup.example_inputs)
    ratio = 1.0
    if time_steps and (candidate.spec or candidate.build):
        batch = next(iter(PairedBatches(setup.train_data, seed)()))  # the first training batch
        ratio = step_time_ratio(paired_model(setup, Candidate("unsplit"), seed), net, batch, setup.losses, method)
    if setup.make_optimizer is not None:
        optimizer = setup.make_optimizer(net.parameters())
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = _schedule(optimizer, epochs, lr_schedule)
    data = PairedBatches(setup.train_data, seed, record=fingerprints is not None)
    start = time.perf_counter()
    result = recon.train(
        net, data, setup.losses, method=method, epochs=epochs,
        optimizer=optimizer, val_data=setup.val_data if eval_each_epoch else None, metrics=setup.metrics, seed=seed,
        tasks=names, on_epoch=lambda *_: schedule.step() if schedule is not None else None,
    )  # fmt: skip
    final = result.final if eval_each_epoch else recon.evaluate(net, setup.val_data(), names, setup.metrics)
    if fingerprints is not None:
        fingerprints.extend(data.fingerprints or [])
    history = [
        {k: float(v) for k, v in row.items() if k.startswith("val_")} for row in result.history.to_dict("records")
    ]
    dm = None
    if baselines is not None:
        directions = {t: {m: d for m, (_, d) in setup.metrics[t].items()} for t in names}
        dm = recon.delta_m(final, baselines, directions)
    return TrialResult(
        candidate.name, candidate.key(), seed, recon.methods.spec_of(method), epochs, names, final,
        history, params, flops, ratio, time.perf_counter() - start, dm,
    )  # fmt: skip


def _schedule(optimizer: torch.optim.Optimizer, epochs: int, kind: str) -> Any:
    if kind == "constant":
        return None
    if kind != "cosine":
        raise ReconError(f"lr_schedule={kind!r} is not one of ['cosine', 'constant']")
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


# ------------------------------------------------------------------------------------------- statistics
@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired seeds with a confidence interval; ``resolved`` when it excludes 0."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    how: str

    @property
    def resolved(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.2f} (n={self.n})"
        text = f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"
        return text if self.resolved else f"{text} not resolved"


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, how: str = "t", boot: int = 10_000
) -> PairedDifference:
    """The mean paired difference ``a_s - b_s`` over seeds ``s`` with a ``confidence`` interval.

    ``how="t"``: Student's t interval, ``mean ± t_{n-1, (1+c)/2} * sd / sqrt(n)`` (sd with ``n - 1``); ``"bootstrap"``:
    the percentile interval of the mean over ``boot`` resamples of the seeds (Efron & Tibshirani 1993, ch. 13;
    seeded, so reproducible).
    """
    from scipy import stats

    if len(a) != len(b):
        raise ReconError(f"paired samples differ in length ({len(a)} vs {len(b)}); pair them by seed")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ReconError("no paired samples")
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(mean, -math.inf, math.inf, n, confidence, how)
    if how == "t":
        half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
        return PairedDifference(mean, mean - half, mean + half, n, confidence, how)
    if how == "bootstrap":
        rng = np.random.default_rng(0)
        means = d[rng.integers(0, n, size=(boot, n))].mean(axis=1)
        low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
        return PairedDifference(mean, float(low), float(high), n, confidence, how)
    raise ReconError(f"how={how!r} is not one of ['t', 'bootstrap']")
