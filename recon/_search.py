"""``recon.search``: choose the split by measurement: short paired trials of the candidate plans, successive halving.

A score computed from one warm-up run is a hypothesis about which layers to branch; this module tests it on the
user's own model and validation data. The candidates (:func:`candidates`) are the unsplit model, the budgeted
plans of every score recon has (with and without task groups), the deeper heads at the same budget, the paper's
top-k and the user's own plans, one per distinct architecture. Every trial is a paired trial of
:mod:`recon._trials` (same seeds, same batches in the same order, shared parameters starting equal).

The bandit is successive halving (Jamieson & Talwalkar, "Non-stochastic best arm identification and
hyperparameter optimization", AISTATS 2016; Li et al., "Hyperband", JMLR 2018): rung ``r`` trains every surviving
candidate for ``steps * eta^r`` steps on ``min(seeds, 2^(r+1))`` seeds; after a rung, a candidate whose paired
difference to the leader is resolved below zero (95% Student-t interval over seeds) is dropped, and of the rest
only the best ``ceil(n / eta)`` go on. The unsplit model runs in every rung: it is the reference each
candidate's gain is paired against. A candidate's gain on one seed is ``-Δm%`` with the unsplit model of the same
seed as the baseline (Maninis et al., CVPR 2019: ``Δm% = 100/N * sum (-1)^h (M - M_b) / M_b``): positive means
better than not splitting.

Short trials rank candidates; they are not final accuracies. The choice is the best candidate of the last rung
whose interval against unsplit lies above zero, otherwise no split.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recon import _io
from recon._errors import ReconError
from recon._split_plan import SplitPlan
from recon._trials import (
    Candidate,
    CostModel,
    PairedBatches,
    ShortEpochs,
    TrialResult,
    TrialSetup,
    deeper_heads,
    paired_difference,
    paired_model,
    run_trial,
    step_time_ratio,
)

STATE, LEADERBOARD, RESULT = "state.json", "leaderboard", "result.json"
EPOCHS_PER_TRIAL = 4  # a trial's short epochs: the cosine learning-rate decay steps once per epoch
PROFILE_STEPS = 200  # the short profile run when none is given
MIN_STEPS = 16  # the shortest first-rung trial the search accepts
HONEST = "short trials: a ranking of candidates, not final accuracies"


# ------------------------------------------------------------------------------------------- durations
def parse_duration(text: str | float | int) -> float:
    """Seconds from ``"20m"``, ``"90s"``, ``"1h"``, ``"1h30m"`` or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", str(text))
        if not parts or not any(parts.groups()):
            raise ReconError(f"--time {text!r} is not a duration; write e.g. 20m, 90s, 1h or 1h30m")
        h, m, s = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + s
    if not math.isfinite(seconds) or seconds <= 0:
        raise ReconError(f"--time {text!r} must be a positive duration, e.g. 20m")
    return seconds


# ------------------------------------------------------------------------------------------- candidates
def canonical_spec(cost: CostModel, spec: Any) -> list[str] | dict[str, list[list[str]] | None]:
    """``spec`` in one form per architecture: sorted layers, and ``{layer: groups}`` only where some layer's
    copies serve more than one task (a plan whose groups are all single tasks is the plain per-task split)."""
    groups = cost.groups(spec)
    if all(len(g) == 1 for part in groups.values() for g in part):
        return sorted(groups)
    return {n: (None if all(len(g) == 1 for g in groups[n]) else groups[n]) for n in sorted(groups)}


def describe_spec(spec: Any) -> str:
    """A short text of a plan: ``layer`` for per-task copies, ``layer{a+b|c}`` for task groups."""
    if not spec:
        return "-"
    if not isinstance(spec, Mapping):
        return ", ".join(spec)
    return ", ".join(n if g is None else n + "{" + "|".join("+".join(x) for x in g) + "}" for n, g in spec.items())


@dataclasses.dataclass(frozen=True)
class Budgets:
    """What a candidate may add: ``params`` (a fraction of the model's parameters) and ``flops`` (a ratio of
    its forward FLOPs); None: no limit."""

    params: float | None
    flops: float | None

    def fits(self, cost: CostModel, spec: Any) -> bool:
        if self.params is not None and cost.added_params(spec) > self.params * cost.base_params:
            return False
        return self.flops is None or cost.flops(spec) <= self.flops * cost.base_flops


def _scores() -> list[str]:
    """The scores :func:`recon.plan_split` knows (interference only where recon has it)."""
    from recon._plan import plan_split

    if "score" not in inspect.signature(plan_split).parameters:
        return ["s-conflict"]
    from recon._profile import SCORES

    return list(SCORES)


def _score_plans(profile: Any, model: torch.nn.Module, x: Any, budgets: Budgets, notes: list[str]) -> dict:
    """``{name: spec}`` of the budgeted plans of every score, per-task and with task groups."""
    from recon._plan import plan_split

    found: dict[str, Any] = {}
    for score in _scores():
        for groups in ("none", "auto"):
            name = score + ("+groups" if groups == "auto" else "")
            kw = {"score": score} if score != "s-conflict" else {}
            try:
                plan = plan_split(
                    profile, model, budget_params=budgets.params, budget_flops=budgets.flops, groups=groups,
                    example_inputs=x if budgets.flops is not None else None, **kw,
                )  # fmt: skip
            except ReconError as e:
                notes.append(f"{name}: no plan: {e}")
                continue
            found[name] = plan.layer_spec()
    return found


def candidates(
    profile: Any,
    model: torch.nn.Module,
    tasks: Sequence[str],
    example_inputs: Any,
    *,
    budgets: Budgets,
    top_k: int = 4,
    extra: Sequence[Sequence[str]] = (),
    notes: list[str] | None = None,
) -> list[Candidate]:
    """The candidates of a search, the unsplit model first, one per distinct architecture (names of plans that
    coincide are joined with ``=``): the budgeted plans of every score with and without task groups, the deeper
    heads within the same budgets, the paper's top-k when it fits them, and the user's ``extra`` plans (layer
    lists, tried whatever their cost). Notes on what was left out go to ``notes``."""
    notes = notes if notes is not None else []
    cost = CostModel(model, tasks, example_inputs, profile.meta.get("leaf_modules", []))
    found = _score_plans(profile, model, example_inputs, budgets, notes)
    inf = math.inf
    max_params = inf if budgets.params is None else budgets.params * cost.base_params
    max_flops = inf if budgets.flops is None else budgets.flops * cost.base_flops
    heads = deeper_heads(cost, max_params=max_params, max_flops=max_flops)
    found["heads"] = heads or None
    top = [n for n in profile.scores().index if n][:top_k]
    if top and budgets.fits(cost, top):
        found[f"top-{len(top)}"] = top
    elif top:
        notes.append(f"top-{len(top)}: left out, it exceeds the budgets ({cost.added_params(top):,} parameters)")
    for i, layers in enumerate(extra, 1):
        found[f"user-{i}"] = list(layers)
    return _distinct(cost, found)


def _distinct(cost: CostModel, found: Mapping[str, Any]) -> list[Candidate]:
    names: dict[str, list[str]] = {}
    specs: dict[str, Any] = {}
    for name, spec in found.items():
        if not spec:
            continue
        canon = canonical_spec(cost, spec)
        key = Candidate(name, canon).key()
        names.setdefault(key, []).append(name)
        specs[key] = canon
    return [Candidate("unsplit")] + [Candidate("=".join(names[k]), specs[k]) for k in names]


# -------------------------------------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Successive halving's rungs for ``n_split`` split candidates (plus unsplit): rung ``r`` runs
    ``steps * eta^r`` steps on ``min(seeds, 2^(r+1))`` seeds, the last rung on all ``seeds``; nominally each
    rung keeps ``ceil(n / eta)`` candidates, until one is left (dropping more only shortens the search)."""

    steps: int
    seeds: int
    n_split: int
    eta: int = 2

    @property
    def count(self) -> int:
        return 1 + max(0, math.ceil(math.log(max(self.n_split, 1), self.eta) - 1e-9))

    def rung(self, r: int) -> tuple[int, int]:
        """``(steps, seeds)`` of rung ``r``."""
        seeds = self.seeds if r == self.count - 1 else min(self.seeds, 2 ** (r + 1))
        return self.steps * self.eta**r, seeds

    def plan(self) -> list[tuple[int, int, int]]:
        """``(split candidates, steps, seeds)`` per rung, nominally."""
        out, n = [], self.n_split
        for r in range(self.count):
            out.append((n, *self.rung(r)))
            n = max(1, math.ceil(n / self.eta))
        return out

    def steps_total(self) -> int:
        """Training steps of the whole nominal search (the unsplit model counted in every rung)."""
        return sum((n + 1) * t * s for n, t, s in self.plan())

    def trials_total(self) -> int:
        return sum((n + 1) * s for n, _, s in self.plan())


def epochs_of(steps: int, epoch_length: int | None) -> tuple[int, int]:
    """``(epochs, steps per epoch)`` of a trial of about ``steps`` steps: :data:`EPOCHS_PER_TRIAL` short
    epochs, or whole epochs when the data is shorter than that."""
    per = math.ceil(steps / EPOCHS_PER_TRIAL)
    if epoch_length is not None:
        per = max(1, min(per, epoch_length))
    return math.ceil(steps / per), per


# ---------------------------------------------------------------------------------------------- timing
def calibrate(setup: TrialSetup, method: str, reps: int = 16) -> tuple[float, float]:
    """``(seconds per training step, seconds per trial besides its steps)`` of the unsplit model, measured
    after a warm-up trial (first-use costs: caches, lazy imports): a 4-step and a ``4 + reps``-step trial
    (the difference is ``reps`` steps; the rest is building the model, counting its FLOPs, starting the loop and
    the one validation pass)."""
    cand, took = Candidate("unsplit"), []
    for steps in (1, 4, 4 + reps):
        start = time.perf_counter()
        trial(setup, cand, seed=0, steps=steps, method=method, epoch_length=None)
        took.append(time.perf_counter() - start)
    step = max((took[2] - took[1]) / reps, 1e-6)
    return step, max(took[1] - 4 * step, 0.0)


def first_rung_steps(budget_s: float, step_s: float, fixed_s: float, schedule: Schedule, overhead: float = 1.3) -> int:
    """The largest first-rung length whose nominal search fits ``budget_s`` seconds, with ``overhead`` for the
    split models' extra cost; a :class:`ReconError` when not even :data:`MIN_STEPS` fit."""
    unit = dataclasses.replace(schedule, steps=1)
    evals = overhead * fixed_s * unit.trials_total()
    per_step = overhead * step_s * unit.steps_total()
    steps = int((budget_s - evals) / per_step) if budget_s > evals else 0
    if steps < MIN_STEPS:
        need = evals + per_step * MIN_STEPS
        raise ReconError(
            f"--time {budget_s:.0f}s is too short for a search of {schedule.n_split + 1} candidates (trials of "
            f"{MIN_STEPS} steps in the first rung need about {need:.0f}s here); "
            f"give --time {math.ceil(need / 60)}m or more"
        )
    return steps


# --------------------------------------------------------------------------------------------- trials
class TrialStore:
    """Finished trials as files (``trials/<candidate key>-t<steps>-s<seed>.json``): what makes a search
    resumable and its leaderboard reproducible from disk."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.memory: dict[str, dict[str, Any]] = {}

    def name(self, cand: Candidate, steps: int, seed: int) -> str:
        return f"{cand.key()}-t{steps}-s{seed}"

    def get(self, cand: Candidate, steps: int, seed: int) -> dict[str, Any] | None:
        name = self.name(cand, steps, seed)
        if name not in self.memory and self.folder is not None:
            path = self.folder / "trials" / f"{name}.json"
            if path.exists():
                self.memory[name] = json.loads(path.read_text())
        return self.memory.get(name)

    def put(self, cand: Candidate, steps: int, seed: int, record: dict[str, Any]) -> None:
        name = self.name(cand, steps, seed)
        self.memory[name] = record
        if self.folder is not None:
            _io.write_json(self.folder / "trials" / f"{name}.json", record)


def trial(
    setup: TrialSetup,
    cand: Candidate,
    *,
    seed: int,
    steps: int,
    method: str,
    epoch_length: int | None,
    fingerprints: list[str] | None = None,
) -> dict[str, Any]:
    """One short paired trial (:func:`recon._trials.run_trial` on short epochs): its record. ``fingerprints``
    receives a hash of every training batch (to check the pairing)."""
    epochs, per = epochs_of(steps, epoch_length)
    short = dataclasses.replace(setup, train_data=ShortEpochs(setup.train_data, per))
    result: TrialResult = run_trial(
        short, cand, seed=seed, method=method, epochs=epochs, time_steps=False, fingerprints=fingerprints,
        eval_each_epoch=False,
    )  # fmt: skip
    record = result.to_dict()
    record.update(spec=cand.spec, steps=epochs * per, epochs=epochs, epoch_steps=per)
    return record


# -------------------------------------------------------------------------------------------- standings
def _directions(setup: TrialSetup) -> dict[str, dict[str, str]]:
    return {t: {m: d for m, (_, d) in setup.metrics[t].items()} for t in setup.tasks}


def gain(final: Mapping, reference: Mapping, directions: Mapping) -> float:
    """``-Δm%`` of ``final`` with ``reference`` (the unsplit model of the same seed) as the baseline: the mean
    relative improvement over every (task, metric), in percent; positive is better than not splitting."""
    from recon._train import delta_m

    return -delta_m(final, reference, directions)


@dataclasses.dataclass
class Standing:
    """One candidate at one rung: its paired gains over unsplit, seed by seed, and its trial records."""

    candidate: Candidate
    rung: int
    steps: int
    records: list[dict[str, Any]]
    gains: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.gains)) if self.gains else math.nan

    def versus(self, other: Standing) -> Any:
        """The paired difference of gains ``self - other`` over the seeds both have."""
        n = min(len(self.gains), len(other.gains))
        return paired_difference(self.gains[:n], other.gains[:n])


def standings(
    store: TrialStore, alive: Sequence[Candidate], rung: int, schedule: Schedule, directions: Mapping
) -> dict[str, Standing]:
    """Every alive candidate's standing at ``rung``, over the leading seeds where it and unsplit both finished."""
    steps, seeds = schedule.rung(rung)
    unsplit = alive[0]
    out = {}
    for cand in alive:
        records, gains = [], []
        for seed in range(seeds):
            mine, ref = store.get(cand, steps, seed), store.get(unsplit, steps, seed)
            if mine is None or ref is None:
                break
            records.append(mine)
            gains.append(gain(mine["final"], ref["final"], directions))
        out[cand.name] = Standing(cand, rung, steps, records, gains)
    return out


def survivors(alive: Sequence[Candidate], table: Mapping[str, Standing], eta: int) -> tuple[list[Candidate], dict]:
    """Successive halving's cut: drop every split candidate whose paired difference to the leader is resolved
    below zero, then keep the best ``ceil(n / eta)`` of the rest by mean gain; unsplit always stays (the
    reference). Returns the survivors and ``{name: why dropped}``."""
    leader = max(table.values(), key=lambda s: s.mean)
    dropped: dict[str, str] = {}
    rest = []
    for cand in alive[1:]:
        d = table[cand.name].versus(leader)
        if cand.name != leader.candidate.name and d.resolved and d.high < 0:
            dropped[cand.name] = f"below the leader ({leader.candidate.name}) by {-d.mean:.2f} points"
        else:
            rest.append(cand)
    rest.sort(key=lambda c: -table[c.name].mean)
    keep = rest[: math.ceil((len(alive) - 1) / eta)]
    for cand in rest[len(keep) :]:
        dropped[cand.name] = f"not in the best {len(keep)}"
    return [alive[0], *[c for c in alive[1:] if c in keep]], dropped


# ---------------------------------------------------------------------------------------------- running
class Rungs:
    """Runs the rungs of successive halving within a time budget, one trial file at a time."""

    def __init__(self, setup: TrialSetup, store: TrialStore, schedule: Schedule, *, method: str,
                 epoch_length: int | None, budget_s: float, spent_s: float, bar: Any) -> None:  # fmt: skip
        self.setup, self.store, self.schedule, self.method = setup, store, schedule, method
        self.epoch_length, self.budget_s, self.bar = epoch_length, budget_s, bar
        self.start = time.perf_counter() - spent_s
        self.history: list[dict[str, Standing]] = []
        self.dropped: dict[str, str] = {}
        self.stopped: str | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, cands: Sequence[Candidate]) -> None:
        alive = list(cands)
        for r in range(self.schedule.count):
            steps, seeds = self.schedule.rung(r)
            if not self._fits(alive, steps, seeds):
                self.stopped = f"the time budget ends before rung {r} ({steps} steps x {seeds} seeds)"
                return
            if not self._rung(alive, r, steps, seeds):
                return
            self.history.append(standings(self.store, alive, r, self.schedule, _directions(self.setup)))
            if r + 1 == self.schedule.count:
                return
            alive, cut = survivors(alive, self.history[-1], self.schedule.eta)
            self.dropped.update({name: f"dropped at rung {r}: {why}" for name, why in cut.items()})
            if len(alive) == 1:
                return

    def _rung(self, alive: Sequence[Candidate], r: int, steps: int, seeds: int) -> bool:
        """Every trial of one rung, seed by seed (so an interrupted rung still holds whole pairs)."""
        for seed in range(seeds):
            for cand in alive:
                if self.store.get(cand, steps, seed) is None:
                    if self.elapsed() > self.budget_s:
                        self.stopped = f"the time budget ran out during rung {r}"
                        self.history.append(standings(self.store, alive, r, self.schedule, _directions(self.setup)))
                        return False
                    record = trial(
                        self.setup, cand, seed=seed, steps=steps, method=self.method, epoch_length=self.epoch_length
                    )
                    self.store.put(cand, steps, seed, record)
                left = max(0.0, self.budget_s - self.elapsed()) / 60
                self.bar.advance(None, rung=r, seed=seed, budget_left_min=left)
        return True

    def _fits(self, alive: Sequence[Candidate], steps: int, seeds: int) -> bool:
        """Whether a rung fits the time left, at the seconds per step the finished trials took (the rung's
        trials already on disk cost nothing)."""
        done = [rec for rec in self.store.memory.values() if rec.get("steps")]
        if not done:
            return True
        per_step = sum(rec["seconds"] for rec in done) / sum(rec["steps"] for rec in done)
        todo = sum(self.store.get(c, steps, s) is None for c in alive for s in range(seeds))
        return self.elapsed() + todo * steps * per_step <= self.budget_s


# ------------------------------------------------------------------------------------------- leaderboard
def _last_standing(name: str, history: Sequence[Mapping[str, Standing]]) -> Standing | None:
    """A candidate's standing at the last rung where it has trials (with two paired seeds if it has them)."""
    mine = [t[name] for t in history if name in t and t[name].records]
    whole = [s for s in mine if len(s.gains) >= 2]
    return (whole or mine or [None])[-1]


def leaderboard_rows(
    cands: Sequence[Candidate],
    history: Sequence[Mapping[str, Standing]],
    ratios: Mapping[str, float],
    setup: TrialSetup,
    baselines: Mapping | None,
) -> pd.DataFrame:
    """One row per candidate that trained: its plan, cost, mean validation metrics at its last rung, gain over
    unsplit with a 95% interval, and the steps and seeds it got."""
    from recon._train import delta_m

    directions = _directions(setup)
    base = _last_standing(cands[0].name, history)
    rows = {}
    for cand in cands:
        s = _last_standing(cand.name, history)
        if s is None:
            continue
        rec = s.records
        row: dict[str, Any] = {"plan": describe_spec(cand.spec), "params": rec[0]["params"]}
        row["params +%"] = 100 * (rec[0]["params"] / base.records[0]["params"] - 1) if base else math.nan
        row["FLOPs x"] = rec[0]["flops"] / base.records[0]["flops"] if base else math.nan
        row["step time x"] = ratios.get(cand.name, math.nan)
        for t, named in directions.items():
            for m in named:
                row[f"{t}/{m}"] = float(np.mean([r["final"][t][m] for r in rec]))
        if baselines is not None:
            row["Δm% (↓)"] = float(np.mean([delta_m(r["final"], baselines, directions) for r in rec]))
        d = paired_difference(s.gains, [0.0] * len(s.gains)) if cand.spec else None
        row.update({"gain %": s.mean, "low": d.low if d else math.nan, "high": d.high if d else math.nan})
        row["vs unsplit"] = _verdict(d) if d else "reference"
        spent = sum(t[cand.name].steps * len(t[cand.name].records) for t in history if cand.name in t)
        row.update(rung=s.rung, steps=s.steps, seeds=len(s.gains), **{"steps spent": spent})
        rows[cand.name] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "candidate"
    if len(frame):
        frame = frame.sort_values(["rung", "gain %"], ascending=[False, False], kind="stable")
    return frame


def _verdict(d: Any) -> str:
    if d.n < 2:
        return "one seed: no interval"
    if not d.resolved:
        return "not resolved"
    return "better" if d.low > 0 else "worse"


def choose(frame: pd.DataFrame) -> str | None:
    """The best candidate of the last rung whose 95% interval against unsplit lies above zero, or None."""
    if not len(frame):
        return None
    top = frame[(frame["rung"] == frame["rung"].max()) & (frame["vs unsplit"] == "better")]
    return str(top["gain %"].idxmax()) if len(top) else None


# ------------------------------------------------------------------------------------------------ result
@dataclasses.dataclass
class SearchResult:
    """What :func:`search` found: the leaderboard (one row per candidate, best first), the chosen candidate
    and its :class:`~recon.SplitPlan` (None: no split pays), and whether the search is ``partial``."""

    leaderboard: pd.DataFrame
    chosen: str | None
    plan: SplitPlan | None
    partial: bool
    notes: list[str]
    seconds: float
    folder: Path | None = None

    @property
    def verdict(self) -> str:
        """One plain sentence: the choice and the evidence for it, or "no split"."""
        if self.chosen is None:
            return "no split: no candidate's 95% interval against the unsplit model lies above zero"
        row = self.leaderboard.loc[self.chosen]
        return (
            f"chosen: {self.chosen} ({row['plan']}): {row['gain %']:+.2f}% over unsplit, 95% interval "
            f"[{row['low']:+.2f}, {row['high']:+.2f}], {int(row['steps'])} steps x {int(row['seeds'])} seeds"
        )


def plan_of(cand: Candidate, row: Mapping[str, Any], tasks: Sequence[str], budgets: Budgets,
            leaves: Sequence[str], model_class: str) -> SplitPlan:  # fmt: skip
    """The :class:`~recon.SplitPlan` of a chosen candidate (``init="copy"``, as its trials started)."""
    spec = cand.spec
    layers = list(spec)
    groups = {n: g for n, g in spec.items() if g is not None} if isinstance(spec, Mapping) else None
    extra = {
        "source": "recon search",
        "candidate": cand.name,
        "gain_percent": round(float(row["gain %"]), 4),
        "interval95": [round(float(row["low"]), 4), round(float(row["high"]), 4)],
        "trial_steps": int(row["steps"]),
        "trial_seeds": int(row["seeds"]),
    }
    return SplitPlan(
        tasks=list(tasks), layers=layers, init="copy", groups=groups or None, budget_params=budgets.params,
        budget_flops=budgets.flops, leaf_modules=list(leaves), model_class=model_class, extra=extra,
    )  # fmt: skip


def markdown(frame: pd.DataFrame, *, title: str) -> str:
    """The leaderboard as a Markdown table (numbers rounded for reading; the csv keeps them whole)."""

    def cell(col: str, v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            return f"{v:,.0f}" if col in ("params",) else f"{v:.4g}" if "/" in col else f"{v:+.2f}" if col in (
                "gain %", "low", "high", "params +%", "Δm% (↓)") else f"{v:.2f}"  # fmt: skip
        return f"{v:,}" if isinstance(v, int) and col == "params" else str(v)

    cols = list(frame.columns)
    lines = [f"### {title}", "", "| candidate | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in frame.iterrows():
        lines.append(f"| {name} | " + " | ".join(cell(c, row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def figure(frame: pd.DataFrame, *, title: str) -> Any:
    """Gain over unsplit with its 95% interval, one bar per candidate, annotated with steps x seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 1.4 + 0.35 * len(frame)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(frame))
    gains = frame["gain %"].to_numpy(dtype=float)
    low = np.nan_to_num(gains - frame["low"].to_numpy(dtype=float), posinf=0.0, nan=0.0)
    high = np.nan_to_num(frame["high"].to_numpy(dtype=float) - gains, posinf=0.0, nan=0.0)
    colors = ["#009E73" if v == "better" else "#D55E00" if v == "worse" else "#999999" for v in frame["vs unsplit"]]
    ax.barh(y, gains, xerr=[low, high], color=colors, height=0.6, capsize=3)
    labels = [f"{n}  ({int(r['steps'])} steps x {int(r['seeds'])})" for n, r in frame.iterrows()]
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="#000000", lw=0.8)
    ax.set_xlabel("gain over unsplit, % (−Δm% against the unsplit model of the same seed), 95% interval")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def write_result(folder: Path, result: SearchResult, state: Mapping[str, Any]) -> None:
    """``leaderboard.csv``, ``leaderboard.md``, ``leaderboard.png`` and ``result.json`` (atomically)."""
    title = "recon search leaderboard" + (" (partial)" if result.partial else "") + f": {HONEST}"
    frame = result.leaderboard
    _io.write_text(folder / f"{LEADERBOARD}.csv", frame.to_csv())
    text = markdown(frame, title=title) + "\n" + result.verdict + "\n" + "".join(f"\n- {n}" for n in result.notes)
    _io.write_text(folder / f"{LEADERBOARD}.md", text + "\n")
    if len(frame):
        _io.save_figure(folder / f"{LEADERBOARD}.png", figure(frame, title=title), dpi=110)
    summary = {
        "partial": result.partial, "chosen": result.chosen, "verdict": result.verdict, "notes": result.notes,
        "seconds": round(result.seconds, 2), "settings": state["settings"],
        "plan": result.plan.to_dict() if result.plan is not None else None,
    }  # fmt: skip
    _io.write_json(folder / RESULT, summary)


# ---------------------------------------------------------------------------------------------------- API
def _check(val_data: Any, metrics: Any, seeds: int, method: str, budgets: Budgets) -> Budgets:
    import recon
    from recon._plan import _check_budget

    if val_data is None or not metrics:
        raise ReconError("search compares candidates on validation data; give val_data (val_data()) and metrics")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ReconError(f"--seeds {seeds!r}: a paired interval needs at least 2 seeds; give --seeds 2 or more")
    recon.methods.get(method)  # a bad name fails here, before any work
    params = _check_budget(budgets.params, "budget_params (--budget-params)", 0.0)
    flops = _check_budget(budgets.flops, "budget_flops (--budget-flops)", 1.0)
    return Budgets(0.1 if params is None and flops is None else params, flops)


def _settings(method: str, seeds: int, budgets: Budgets, top_k: int, extra: Sequence, tasks: Sequence) -> dict:
    return {"method": method, "seeds": seeds, "budget_params": budgets.params, "budget_flops": budgets.flops,
            "top_k": top_k, "candidates": [list(c) for c in extra], "tasks": list(tasks)}  # fmt: skip


def _open_state(folder: Path | None, settings: Mapping, resume: bool) -> dict[str, Any] | None:
    """The stored state of a search to resume (settings must match), or None for a new search."""
    path = folder / STATE if folder is not None else None
    if path is None or not path.exists():
        if resume:
            raise ReconError(f"{folder} holds no search to resume; drop --resume")
        return None
    if not resume:
        raise ReconError(f"{folder} already holds a search; pass --resume to continue it, or --out for another run")
    state = json.loads(path.read_text())
    if state["settings"] != dict(settings):
        diff = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        raise ReconError(f"{folder} holds a search with other settings ({', '.join(diff)}); resume with the same ones")
    return state


def _new_state(setup: TrialSetup, profile: Any, settings: Mapping, budgets: Budgets, *, steps: int | None,
               budget_s: float, start: float) -> dict[str, Any]:  # fmt: skip
    """Profile (a short one when none is given), candidates, their step time ratios and the schedule."""
    import recon
    from recon._recipe import batch_count

    notes: list[str] = []
    length = batch_count(setup.train_data)
    if profile is None:
        recon.seed_everything(0)
        model = setup.build_model()
        opt = setup.make_optimizer(model.parameters()) if setup.make_optimizer else None
        profile = recon.profile(model, setup.train_data, setup.losses, steps=PROFILE_STEPS, optimizer=opt, seed=0)
        notes.append(f"no profile given: ran a short one ({PROFILE_STEPS} steps) for the score-based candidates")
    recon.seed_everything(0)
    model = setup.build_model()
    cands = candidates(profile, model, setup.tasks, setup.example_inputs, budgets=budgets,
                       top_k=settings["top_k"], extra=settings["candidates"], notes=notes)  # fmt: skip
    if len(cands) == 1:
        why = next((n.split(": no plan: ", 1)[1] for n in notes if ": no plan: " in n), "raise the budgets")
        raise ReconError(f"nothing to search, no split candidate fits the budgets: {why}")
    schedule = Schedule(steps or 1, settings["seeds"], len(cands) - 1)
    if steps is None:
        step_s, fixed_s = calibrate(setup, settings["method"])
        left = budget_s - (time.perf_counter() - start)
        schedule = dataclasses.replace(schedule, steps=first_rung_steps(left, step_s, fixed_s, schedule))
    batch = next(iter(PairedBatches(setup.train_data, 0)()))
    unsplit = paired_model(setup, cands[0], 0)
    ratios = {c.name: step_time_ratio(unsplit, paired_model(setup, c, 0), batch, setup.losses, settings["method"])
              for c in cands[1:]}  # fmt: skip
    return {
        "settings": dict(settings), "steps": schedule.steps, "eta": schedule.eta, "epoch_length": length,
        "candidates": [{"name": c.name, "spec": c.spec} for c in cands], "ratios": {"unsplit": 1.0, **ratios},
        "notes": notes, "prep_seconds": time.perf_counter() - start, "model_class": type(model).__name__,
        "leaf_modules": profile.meta.get("leaf_modules", []),
    }  # fmt: skip


def search(
    model_builder: Callable[..., torch.nn.Module],
    train_data: Callable[[], Iterable],
    val_data: Callable[[], Iterable] | None,
    losses: Mapping[str, Callable],
    metrics: Mapping[str, Mapping[str, tuple[Callable, str]]] | None,
    *,
    budget_params: float | None = None,
    budget_flops: float | None = None,
    time_budget: str | float = "20m",
    seeds: int = 3,
    method: str = "joint",
    candidates: Sequence[Sequence[str]] = (),
    profile: Any = None,
    steps: int | None = None,
    top_k: int = 4,
    optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
    baselines: Mapping[str, Mapping[str, float]] | str | Path | None = None,
    example_inputs: Any = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> SearchResult:
    """Choose the split by measurement: short paired trials of the candidate plans, by successive halving.

    The candidates are the unsplit model, the plans of every score (``profile``'s; a short profile is run when
    None) within ``budget_params`` / ``budget_flops`` (default: +10% parameters) with and without task groups,
    the deeper heads at the same budgets, the paper's ``top_k`` when it fits, and ``candidates`` (layer lists of
    the user's own), one per distinct plan. The first rung's length comes from ``time_budget`` (``"20m"``,
    or seconds) unless ``steps`` fixes it. Every candidate of one seed trains from the same initial values on
    the same batches (:mod:`recon._trials`), with ``method`` and ``optimizer`` (default Adam, lr 1e-3) under a
    cosine learning-rate decay. ``out``: a folder for the trial files, the leaderboard (csv, md, png) and
    ``result.json``; ``resume=True`` continues a search stored there. Ctrl-C writes the leaderboard so far,
    marked partial, then raises ``KeyboardInterrupt``. ``baselines`` (single-task metrics ``{task: {metric:
    value}}``, or a run's ``train/`` folder holding ``single-<task>`` variants) add Δm%.
    """
    start = time.perf_counter()
    budgets = _check(val_data, metrics, seeds, method, Budgets(budget_params, budget_flops))
    budget_s = parse_duration(time_budget)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ReconError(f"steps={steps!r} must be a positive integer")
    if example_inputs is None:
        example_inputs = next(iter(train_data()))[0]
    setup = TrialSetup(model_builder, train_data, val_data, dict(losses), metrics, example_inputs, optimizer)
    if isinstance(baselines, (str, Path)):
        from recon._train import load_baselines

        baselines = load_baselines(baselines, setup.tasks)
    folder = Path(out) if out is not None else None
    settings = _settings(method, seeds, budgets, top_k, candidates, setup.tasks)
    state = _open_state(folder, settings, resume)
    if state is None:
        state = _new_state(setup, profile, settings, budgets, steps=steps, budget_s=budget_s, start=start)
        if folder is not None:
            _io.write_json(folder / STATE, state)
    return _run(setup, state, folder, budgets, budget_s=budget_s, baselines=baselines, progress=progress)


def _run(setup: TrialSetup, state: Mapping[str, Any], folder: Path | None, budgets: Budgets, *, budget_s: float,
         baselines: Mapping | None, progress: bool) -> SearchResult:  # fmt: skip
    from recon._progress import progress_bar

    cands = [Candidate(c["name"], c["spec"]) for c in state["candidates"]]
    schedule = Schedule(state["steps"], state["settings"]["seeds"], len(cands) - 1, state["eta"])
    store = TrialStore(folder)
    spent = state["prep_seconds"] + sum(
        rec["seconds"] for c in cands for r in range(schedule.count)
        for s in range(schedule.rung(r)[1]) if (rec := store.get(c, schedule.rung(r)[0], s))
    )  # fmt: skip
    partial = False
    with progress_bar(schedule.trials_total(), "search", enabled=progress) as bar:
        rungs = Rungs(setup, store, schedule, method=state["settings"]["method"],
                      epoch_length=state["epoch_length"], budget_s=budget_s, spent_s=spent, bar=bar)  # fmt: skip
        try:
            rungs.run(cands)
        except KeyboardInterrupt:
            partial = True
            r = len(rungs.history)
            rungs.history.append(standings(store, cands, r, schedule, _directions(setup)))
    result = _result(setup, state, cands, rungs, budgets, baselines, partial)
    result.folder = folder
    if folder is not None:
        write_result(folder, result, state)
    if partial:
        raise KeyboardInterrupt
    return result


def _result(setup: TrialSetup, state: Mapping[str, Any], cands: Sequence[Candidate], rungs: Rungs, budgets: Budgets,
            baselines: Mapping | None, partial: bool) -> SearchResult:  # fmt: skip
    """The leaderboard with each candidate's status, the choice (none while partial) and its plan."""
    frame = leaderboard_rows(cands, rungs.history, state["ratios"], setup, baselines)
    chosen = None if partial else choose(frame)
    last = frame["rung"].max() if len(frame) else 0
    status = {n: rungs.dropped.get(n, "last rung" if frame.loc[n, "rung"] == last else "") for n in frame.index}
    if chosen is not None:
        status[chosen] = "chosen"
    if len(frame):
        frame["status"] = pd.Series(status)
    notes = list(state["notes"])
    if rungs.stopped:
        notes.append(f"stopped early: {rungs.stopped}")
    if partial:
        notes.append("partial: interrupted; resume to finish (finished trials are kept)")
    plan = None
    if chosen is not None:
        cand = next(c for c in cands if c.name == chosen)
        plan = plan_of(cand, frame.loc[chosen], setup.tasks, budgets, state["leaf_modules"], state["model_class"])
    return SearchResult(frame, chosen, plan, partial, notes, rungs.elapsed())
