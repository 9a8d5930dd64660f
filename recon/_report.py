"""``recon.report(run_dir)``: the tables of what a run folder holds, and its ``report/report.md`` with figures.

Reads ``profile/`` (scores, cosines), ``split/plan.json`` (the branched layers) and ``train/<label>/``
(``metrics.csv``, ``summary.json``), skips the parts a run does not hold yet (an unreadable part is listed in
``Report.problems``, not raised), and returns the tables as pandas DataFrames. With ``write=True`` it also writes
``report.md`` and the figures of :mod:`recon.plots` into ``RUN_DIR/report/`` (each file atomically); the report is
derived from the run, so writing it again refreshes it. The run folder's layout is described in docs/run-folder.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recon import _io
from recon._errors import ReconError
from recon._profile import ConflictProfile, check_threshold
from recon._runs import Run
from recon.methods import canonical_name

__all__ = ["Report", "markdown_table", "report"]

REPORT_DIR = "report"
REPORT_FILE = "report.md"
FIGURES = (
    "heatmap.png",
    "scores.png",
    "cosine_time.png",
    "budget_curve.png",
    "cosine_distribution.png",
    "cosine_distributions.png",
    "training_curves.png",
    "conflict_share.png",
)
MAX_MD_LAYERS = 60

#: Per-column display formats of a table: a format spec (``"+.2f"``) or a function of the cell.
Fmt = Mapping[str, str | Callable[[Any], str]]


#: Names of joint training (the multi-task baseline), listed first after the single-task baselines.
_JOINT = ("joint", "mean")


# --- what a run holds ---------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One ``train/<label>/`` folder."""

    label: str
    folder: Path
    summary: dict[str, Any] | None = None
    metrics: pd.DataFrame | None = None
    cosines: Any = None  # a ConflictProfile or an array, when the variant recorded its cosines

    @property
    def method(self) -> str:
        """The method's name as the user gives it (older class names are mapped back)."""
        s = self.summary or {}
        return canonical_name(str(s["method"])) if s.get("method") is not None else self.label

    @property
    def single_task(self) -> str | None:
        s = self.summary or {}
        return s.get("single_task") or (self.label[len("single-") :] if self.label.startswith("single-") else None)

    @property
    def branched(self) -> list[str] | None:
        split = (self.summary or {}).get("split")
        return list(split.get("layers", [])) if isinstance(split, Mapping) else None


@dataclass
class _Contents:
    run: Run
    profile: ConflictProfile | None = None
    plan: dict[str, Any] | None = None
    variants: list[Variant] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReconError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReconError(f"{path} does not hold a JSON object")
    return data


def _gather(run: Run) -> _Contents:
    """Everything readable in a run folder; unreadable parts are listed in ``problems``, not raised."""
    got = _Contents(run)
    profile_dir = run.dir / "profile"
    if (profile_dir / "profile.json").exists():
        try:
            got.profile = ConflictProfile.load(profile_dir)
        except (ReconError, OSError, ValueError, KeyError) as e:
            got.problems.append(f"profile/ could not be read: {e}")
    plan_file = run.dir / "split" / "plan.json"
    if plan_file.exists():
        try:
            got.plan = _read_json(plan_file)
        except (ReconError, OSError) as e:
            got.problems.append(f"split/plan.json could not be read: {e}")
    train_dir = run.dir / "train"
    folders = sorted(p for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
    for folder in folders:
        variant = Variant(folder.name, folder)
        try:
            if (folder / "summary.json").exists():
                variant.summary = _read_json(folder / "summary.json")
            if (folder / "metrics.csv").exists():
                frame = pd.read_csv(folder / "metrics.csv")
                variant.metrics = frame if len(frame) else None
            variant.cosines = _variant_cosines(folder)
        except (ReconError, OSError, ValueError, pd.errors.ParserError) as e:
            got.problems.append(f"train/{folder.name}/ could not be read fully: {e}")
        if variant.summary is not None or variant.metrics is not None:
            got.variants.append(variant)
    got.variants.sort(key=_variant_order)
    return got


def _variant_cosines(folder: Path) -> Any:
    """Cosines a trained variant recorded: a saved profile (``profile.json``), else a bare ``cosines.npy``."""
    if (folder / "profile.json").exists():
        return ConflictProfile.load(folder)
    if (folder / "cosines.npy").exists():  # e.g. np.save of recon.train(..., record_cosines=True).cosines
        arr = np.load(folder / "cosines.npy", mmap_mode="r")
        return arr if arr.size else None
    return None


def _variant_order(v: Variant) -> tuple:
    """Single-task baselines first, then joint, then the other methods by name; unsplit before split."""
    s = v.summary or {}
    method = v.method
    return (v.single_task is None, method not in _JOINT, method, v.branched is not None, s.get("seed", 0), v.label)


# --- tables -------------------------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1%}"


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)


def _int(v: Any) -> str:
    return "" if v is None or pd.isna(v) else f"{int(v):,}"


def _plain_int(v: Any) -> str:
    return "" if v is None or pd.isna(v) else str(int(v))


def _scores_table(
    profile: ConflictProfile, S: float, branched: list[str], score: str = "s-conflict", k: int | None = None
) -> pd.DataFrame:
    scores = profile.scores(S, score=score, k=k)
    columns = {
        "rank": np.arange(1, len(scores) + 1),
        "score": scores["score"],
        "in conflict": scores["conflict_rate"],
        "mean cos": scores["mean_cos"],
    }
    if score == "interference":
        columns["S-conflict"] = scores["s_conflict"]
    elif "interference" in scores:
        columns["interference"] = scores["interference"]
    columns[f"p(top-{scores.attrs['k']})"] = scores["p_top_k"]
    columns.update(params=scores["params"], type=scores["type"])
    columns["branched"] = ["yes" if name in branched else "" for name in scores.index]
    return pd.DataFrame(columns, index=scores.index).rename_axis("layer")


def _plan_table(
    plan: Mapping[str, Any], profile: ConflictProfile | None, S: float, tasks: list[str], score: str = "s-conflict"
) -> pd.DataFrame:
    """The branched layers in plan order, with their score and the parameters the copies (per task or group) add."""
    layers = list(plan.get("layers", []))
    scores = profile.scores(S, score=score) if profile is not None else None
    confidence = plan.get("p_top_k") or {}
    info = profile.layer_info if profile is not None else {}
    rows = []
    for i, name in enumerate(layers, 1):
        known = scores is not None and name in scores.index
        groups = (plan.get("groups") or {}).get(name)  # a task-group plan: one copy per group
        copies = len(groups) if groups else len(info.get(name, {}).get("tasks", tasks)) or len(tasks)
        params = int(scores.loc[name, "params"]) if known else None
        rows.append(
            {
                "layer": name,
                "order": i,
                "score": scores.loc[name, "score"] if known else None,
                **({f"p(top-{plan.get('confidence_k')})": confidence.get(name)} if confidence else {}),
                "type": scores.loc[name, "type"] if known else "",
                "params": params,
                "copies": copies,
                "added params": None if params is None else params * (copies - 1),
            }
        )
    return pd.DataFrame(rows).set_index("layer") if rows else pd.DataFrame()


def _metric_directions(variants: list[Variant]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for v in variants:
        for task, named in ((v.summary or {}).get("directions") or {}).items():
            out.setdefault(task, {}).update(named)
    return out


def _final(v: Variant, tasks: list[str]) -> dict[str, dict[str, float]]:
    """The summary's final metrics, else the last epoch of metrics.csv (a run still training)."""
    if v.summary and v.summary.get("final"):
        return {t: dict(m) for t, m in v.summary["final"].items()}
    if v.metrics is None:
        return {}
    from recon.plots import split_metric_columns

    last = v.metrics.iloc[-1]
    cols = split_metric_columns(list(v.metrics.columns), tasks)
    return {t: {m: float(last[c]) for m, c in named.items() if m != "train_loss"} for t, named in cols.items()}


def _delta_m_or_none(final: Mapping, baseline: Mapping, directions: Mapping[str, Mapping[str, str]]) -> float | None:
    """``recon.delta_m`` (the trainer's Δm%), or None where a metric or its baseline is missing or 0."""
    from recon import delta_m  # the one Δm% (late: recon/__init__ imports this module first)

    try:
        return delta_m(final, baseline, directions)
    except (KeyError, ReconError):
        return None


def _metric_columns(variants: list[Variant], finals: Mapping, tasks: list[str], directions: Mapping) -> list[tuple]:
    """``(task, metric, column title)`` for every final metric, the recipe's metrics first."""
    out = []
    for t in tasks:
        names = list(directions.get(t, {}))
        for v in variants:
            names += [m for m in finals[v.label].get(t, {}) if m not in names]
        for m in names:
            arrow = {"higher": " ↑", "lower": " ↓"}.get(directions.get(t, {}).get(m, ""), "")
            out.append((t, m, f"{t} {m}{arrow}"))
    return out


def _variants_table(variants: list[Variant], tasks: list[str]) -> tuple[pd.DataFrame, Fmt, list[str]]:
    """One row per trained variant: method, branched layers, parameters, final per-task metrics, Δm%.

    A summary's own ``delta_m`` is shown as written; where it is missing and every task has a single-task
    baseline (``train/single-<task>/``), Δm% is computed here with :func:`recon.delta_m` (its label is returned
    in the notes).
    """
    directions = _metric_directions(variants)
    finals = {v.label: _final(v, tasks) for v in variants}
    baseline = {v.single_task: finals[v.label].get(v.single_task, {}) for v in variants if v.single_task}
    plain = [v for v in variants if v.single_task is None and v.branched is None and (v.summary or {}).get("params")]
    base_params = plain[0].summary["params"] if plain else None
    metric_cols = _metric_columns(variants, finals, tasks, directions)
    notes: list[str] = []
    rows = []
    for v in variants:
        s = v.summary or {}
        params = s.get("params")
        grows = params and base_params and not v.single_task
        row: dict[str, Any] = {
            "label": v.label,
            "method": v.method if v.summary is not None else "(no summary.json: still training?)",
            "branched": "—" if v.branched is None else len(v.branched),
            "seed": s.get("seed"),
            "epochs": s.get("epochs", len(v.metrics) if v.metrics is not None else None),
            "params": params,
            "params +%": (100.0 * (params / base_params - 1.0)) if grows else None,
        }
        for t, m, col in metric_cols:
            row[col] = finals[v.label].get(t, {}).get(m)
        dm = s.get("delta_m")
        if dm is None and v.single_task is None and all(t in baseline for t in tasks) and directions:
            dm = _delta_m_or_none(finals[v.label], baseline, directions)
            if dm is not None:
                notes.append(v.label)
        row["Δm% ↓"] = dm
        row["cos<0"] = s.get("conflict_share")
        row["partial"] = f"{s.get('epochs_done', '?')} of {s.get('epochs', '?')} epochs" if s.get("partial") else None
        rows.append(row)
    frame = pd.DataFrame(rows).set_index("label")
    empty = [c for c in frame.columns if c != "Δm% ↓" and frame[c].isna().all()]  # Δm% stays: it says what's missing
    frame = frame.drop(columns=empty)
    fmt: dict[str, Any] = {"params": _int, "params +%": "+.1f", "Δm% ↓": "+.2f", "cos<0": _pct}
    fmt["seed"] = fmt["epochs"] = _plain_int
    fmt.update({col: _num for _, _, col in metric_cols})
    return frame, fmt, notes


_NOT_AVERAGED = {"method", "seed", "branched", "epochs", "params", "params +%", "partial"}


def _seeds_table(frame: pd.DataFrame, variants: list[Variant]) -> pd.DataFrame | None:
    """Mean and sample standard deviation (ddof=1) over seeds of the metrics, Δm% and conflict share.

    One row per (method, branched layers, single task) group, columns ``seeds`` (the number of runs) and
    ``<column> mean`` / ``<column> std`` for every numeric column of the variants table. None unless some group
    holds two or more runs.
    """
    if frame.empty:
        return None
    groups: dict[tuple, list[str]] = {}
    for v in variants:  # an interrupted run is shown, marked, but stays out of the mean
        if v.label in frame.index and not (v.summary or {}).get("partial"):
            groups.setdefault((v.method, tuple(v.branched or ()), v.single_task), []).append(v.label)
    if all(len(g) < 2 for g in groups.values()):
        return None
    numeric = [c for c in frame.columns if c not in _NOT_AVERAGED and frame[c].dtype.kind in "fi"]
    rows = []
    for (method, branched, single), labels in groups.items():
        name = f"single-{single}" if single else f"{method}+recon" if branched else str(method)
        row: dict[str, Any] = {"variant": name, "seeds": len(labels)}
        for c in numeric:
            values = frame.loc[labels, c].astype(float).dropna()
            row[f"{c} mean"] = values.mean() if len(values) else math.nan
            row[f"{c} std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def _seeds_text(seeds: pd.DataFrame) -> pd.DataFrame:
    """The seeds table as ``mean ± std`` strings (the mean alone for a single value)."""
    out = pd.DataFrame({"seeds": seeds["seeds"]}, index=seeds.index)
    for col in [c[: -len(" mean")] for c in seeds.columns if c.endswith(" mean")]:
        if col == "cos<0":
            spec = (".1%", ".1%")
        elif col.startswith("Δm%"):
            spec = ("+.2f", ".2f")
        else:
            spec = (".4g", ".2g")
        means, stds = seeds[f"{col} mean"], seeds[f"{col} std"]
        out[col] = [
            "" if pd.isna(m) else format(m, spec[0]) + ("" if pd.isna(s) else f" ± {format(s, spec[1])}")
            for m, s in zip(means, stds, strict=True)
        ]
    return out


# --- Markdown -----------------------------------------------------------------------------------------------
def _cell(value: Any, f: Any) -> str:
    if callable(f):
        return f(value)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return format(value, f) if f is not None else str(value)


def markdown_table(frame: pd.DataFrame, fmt: Fmt | None = None) -> str:
    """A GitHub-flavoured Markdown table of a DataFrame (index first); ``fmt`` maps a column to its format."""
    fmt = fmt or {}
    head = [str(frame.index.name or "")] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |"]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines.append("|---|" + "".join("--:|" if n else "---|" for n in numeric))
    for key, row in frame.iterrows():
        cells = [f"`{key}`"] + [_cell(row[c], fmt.get(c)) for c in frame.columns]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _run_section(run: Run) -> list[str]:
    info = run.info
    lines = [
        f"- recipe: `{info.get('recipe', '?')}`",
        f"- tasks: {', '.join(f'`{t}`' for t in info.get('tasks', []))}",
        f"- seed: {info.get('seed', '?')}, created {info.get('created', '?')}",
    ]
    versions = info.get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    commands = [" ".join(c.get("argv", [])) for c in info.get("commands", [])]
    if commands:
        lines.append("- commands:")
        lines += [f"  - `{c}`" for c in commands]
    return lines + [""]


# --- the report ---------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What a run folder holds, as tables; returned by :func:`recon.report`.

    Attributes:
        run_dir: the run folder.
        tasks: the run's task names.
        S: the threshold the scores were computed at.
        scores: one row per shared layer (index ``layer``): rank, score (``score``: the plan's, S-conflict by
            default), share of cosines below S (``in conflict``), mean cosine, the other score when the profile
            has Gram matrices (``interference`` or ``S-conflict``), ``p(top-k)`` (bootstrap over the profiled
            steps, :meth:`recon.ConflictProfile.confidence`; k: the plan's ``confidence_k`` or ``top_k``, else
            4), parameters, module type, whether the plan branches it. None without a profile that holds steps
            and layers.
        branched: the split plan's layers in order (index ``layer``), with score, ``p(top-k)`` (when the plan
            records it), copies and the parameters the copies add. None without a plan; empty when the plan
            branches nothing.
        score: what ranks the layers: the plan's ``score`` (``"s-conflict"`` or ``"interference"``).
        variants: one row per ``train/<label>/`` (index ``label``): method, branched layers, seed, epochs,
            parameters, final metric per task (``"<task> <metric> ↑"``), ``Δm% ↓`` (:func:`recon.delta_m` against the
            ``single-<task>`` baselines) and ``cos<0``. Single-task baselines first, then joint, then the others.
            None without a trained variant.
        seeds: mean and standard deviation (ddof=1) over seeds per (method, branched layers) group, columns
            ``seeds``, ``<column> mean``, ``<column> std``. None unless some group holds two or more runs.
        formats: per table, the column formats used in report.md (format specs or functions of a cell).
        delta_m_computed: labels whose Δm% the report computed (their summary.json had none).
        problems: parts of the folder that could not be read (skipped).
        markdown: the text of report.md (without figures when nothing was written).
        folder: where report.md and the figures were written; None with ``write=False``.
        figures: the PNG files written into ``folder``.
    """

    run_dir: Path
    tasks: list[str]
    S: float
    scores: pd.DataFrame | None = None
    branched: pd.DataFrame | None = None
    score: str = "s-conflict"
    variants: pd.DataFrame | None = None
    seeds: pd.DataFrame | None = None
    formats: dict[str, Fmt] = field(default_factory=dict)
    delta_m_computed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    markdown: str = ""
    folder: Path | None = None
    figures: list[str] = field(default_factory=list)
    profile: ConflictProfile | None = field(default=None, repr=False)
    plan: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def plan_summary(self) -> str:
        """``top_k = `4`, S = `0.0`, init = `reinit``` from the plan: the branched layers' caption."""
        plan = self.plan or {}
        return ", ".join(f"{k} = `{plan[k]}`" for k in ("top_k", "S", "init") if plan.get(k) is not None)

    def seeds_text(self) -> pd.DataFrame | None:
        """The seeds table as ``mean ± std`` strings, as report.md shows it."""
        return None if self.seeds is None else _seeds_text(self.seeds)


class _Writer:
    """The Markdown lines of report.md and, when writing, its figures (each saved atomically)."""

    def __init__(self, folder: Path | None, dpi: int) -> None:
        self.folder, self.dpi = folder, dpi
        self.md: list[str] = []
        self.figures: list[str] = []

    def figure(self, name: str, draw: Callable[[], Any], caption: str) -> None:
        if self.folder is None:
            return
        _io.save_figure(self.folder / name, draw(), dpi=self.dpi)
        self.figures.append(name)
        self.md.extend([f"![{Path(name).stem}]({name})", "", f"*{caption}*", ""])

    def finish(self) -> str:
        text = "\n".join(self.md).rstrip() + "\n"
        if self.folder is not None:
            for name in FIGURES:  # figures of an earlier report that this one did not draw
                if name not in self.figures and (self.folder / name).exists():
                    (self.folder / name).unlink()
            _io.write_text(self.folder / REPORT_FILE, text)
        return text


def _profile_section(w: _Writer, rep: Report, cosines: Mapping[str, Any], from_profile_only: bool) -> None:
    from recon import plots

    prof, S = rep.profile, rep.S
    w.md += ["## Conflict profile", ""]
    if prof is None:
        w.md += ["_No profile in this run yet: run `recon profile MODEL_PY`._", ""]
        return
    if not prof.layers or not prof.steps:
        w.md += [f"_The profile holds {len(prof.layers)} shared layers and {prof.steps} steps: nothing to plot._", ""]
        return
    K = len(prof.pairs)
    w.md += [
        f"{prof.steps_text()} profiled" + _partial_note(prof)
        + f", warm-up method `{prof.meta.get('method', 'joint')}`, {len(prof.layers)} shared layers, "
        f"{len(prof.tasks)} tasks ({K} pairs), S = {S:g}: a layer's S-conflict score counts its cosines below S, "
        f"at most {prof.steps * K}.",
        "",
        *_score_prose(rep),
    ]  # fmt: skip
    table = rep.scores
    w.md += [markdown_table(table.head(MAX_MD_LAYERS), rep.formats["scores"]), ""]
    if len(table) > MAX_MD_LAYERS:
        w.md += [f"_{len(table) - MAX_MD_LAYERS} more layers in `profile/scores.csv`._", ""]
    branched = list((rep.plan or {}).get("layers", []))
    w.figure(
        "heatmap.png",
        lambda: plots.conflict_heatmap(prof, S),
        "Conflict rate: the share of profiled steps where a layer's task-pair cosine is below S.",
    )
    w.figure(
        "scores.png",
        lambda: plots.score_bars(prof, k=_confidence_k(rep.plan), S=S, branched=branched or None, score=rep.score),
        f"{_SCORE_NAMES[rep.score]} per shared layer, highest first"
        + ("; the branched layers are marked." if branched else "."),
    )
    w.figure(
        "cosine_time.png",
        lambda: plots.cosine_over_time(prof, S=S),
        "Layer-wise cosine over the profiled steps (mean over task pairs); the strip on top is the share below S.",
    )
    curve = _budget_curves(rep)
    if curve is not None:
        w.figure(
            "budget_curve.png",
            lambda: plots.budget_curve_figure(curve, chosen=_chosen_point(rep.plan), score=rep.score),
            f"The most {_SCORE_NAMES[rep.score]} a split removes for each parameter cost (exact Pareto front), "
            "with one copy per task and with task groups; where it flattens, more capacity stops removing conflict.",
        )
    if from_profile_only:
        _distribution_figure(w, cosines, S)


def _confidence_k(plan: Mapping[str, Any] | None) -> int | None:
    """The k of the report's ``p(top-k)``: the plan's (its ``confidence_k``, else ``top_k``); None: the default."""
    return (plan or {}).get("confidence_k") or (plan or {}).get("top_k") or None


_SCORE_NAMES = {"s-conflict": "S-conflict score", "interference": "interference"}


def _score_prose(rep: Report) -> list[str]:
    """What the scores table's columns beyond S-conflict mean (only those it has), and the plan's stability
    warning."""
    columns = list(rep.scores.columns) if rep.scores is not None else []
    p_column = next((c for c in columns if c.startswith("p(top-")), None)
    text = []
    if rep.score == "interference" or "interference" in columns:
        what = "`score`" if rep.score == "interference" else "`interference`"
        text.append(
            f"{what} is the interference: the mean over steps of the sum over task pairs of `-<g_i, g_j>` on the "
            "layer (positive: per-task copies lower the summed losses to first order; negative: the layer carries "
            "positive transfer)."
        )
    if p_column:
        k = p_column[len("p(top-") : -1]
        text.append(
            f"`{p_column}` is the share of 1,000 bootstrap resamples of the profiled steps in which the layer "
            f"ranks in the top {k} by {_SCORE_NAMES[rep.score]}."
        )
    text.append(f"The table is sorted by {_SCORE_NAMES[rep.score]}.")
    lines = [" ".join(text), ""]
    if rep.plan and rep.plan.get("unstable"):
        lines += [f"**Warning:** {rep.plan['unstable']}.", ""]
    return lines


def _budget_curves(rep: Report) -> dict[str, pd.DataFrame] | None:
    """Score removed against parameters added, per task and with groups (None if the recipe will not load)."""
    from recon._plan import budget_curve
    from recon._recipe import load_recipe

    try:
        recipe = load_recipe(Run.open(rep.run_dir).recipe)
        model, batch = recipe.build_model(), recipe.example_args()  # the batch: export where fx cannot trace
        how = {"S": rep.S, "score": rep.score, "example_inputs": batch}
        return {g: budget_curve(rep.profile, model, groups=g, **how) for g in ("none", "auto")}
    except (ReconError, OSError, AttributeError, KeyError):
        return None


def _chosen_point(plan: Mapping[str, Any] | None) -> tuple[float, float] | None:
    if not plan or "removed" not in plan or not plan.get("params_before"):
        return None
    added = 100 * (plan["params_after"] - plan["params_before"]) / plan["params_before"]
    return added, float(sum(plan["removed"].values()))


def _distribution_figure(w: _Writer, cosines: Mapping[str, Any], S: float) -> None:
    from recon import plots

    w.figure(
        "cosine_distribution.png",
        lambda: plots.cosine_distribution(cosines, S),
        "Distribution of layer-wise cosines over all shared layers and steps (the paper's Figures 1 and 3); "
        "the legend gives each run's share below 0.",
    )


def _partial_note(prof: ConflictProfile) -> str:
    if not prof.partial:
        return ""
    asked = prof.meta.get("steps_asked")
    done = prof.total_steps
    return f" (**partial**: stopped after {done} of {asked} steps)" if asked else " (**partial**: interrupted)"


def _plan_section(w: _Writer, rep: Report) -> None:
    w.md += ["## Branched layers", ""]
    if rep.plan is None:
        w.md += ["_No split plan yet: run `recon split --top-k K`._", ""]
        return
    table = rep.branched
    if table is None or table.empty:
        w.md += ["_The split plan branches no layer._", ""]
        return
    added = table["added params"].dropna()
    grouped = any(len(g) < len(rep.tasks) for g in (rep.plan.get("groups") or {}).values())
    copies = "copies per task or per task group" if grouped else "per-task copies"
    w.md += [f"{len(table)} layers branched into {copies} ({rep.plan_summary}).", ""]
    partial = rep.plan.get("profile_partial")
    if partial:
        w.md += [f"**Planned from a partial profile**: {partial['steps']} of {partial.get('of') or '?'} steps.", ""]
    if len(added):
        w.md += [f"The copies add {int(added.sum()):,} parameters.", ""]
    w.md += [markdown_table(table, rep.formats["branched"]), ""]
    diagram = rep.run_dir / "split" / "network.png"  # drawn by `recon split`
    if diagram.exists() and w.folder is not None:
        link = Path(os.path.relpath(diagram, w.folder)).as_posix()
        w.md += [f"![network]({link})", "", "*The split network: shared, branched and task-only layers.*", ""]


#: What each optional column of the variants table means, in the order the prose gives them.
_COLUMN_PROSE = {
    "params +%": "`params +%` is the increase over the unsplit model",
    "Δm% ↓": "`Δm% ↓` is the mean relative drop against the single-task baselines over all (task, metric) pairs "
    "(lower is better)",
    "cos<0": "`cos<0` is the share of shared-layer task-pair cosines below 0 during training",
    "partial": "`partial` marks a run that was interrupted (left out of the means over seeds)",
}


def _variants_prose(variants: pd.DataFrame) -> str:
    """The sentence above the variants table: only the columns it has, and how to get a missing Δm%."""
    parts = ["Final validation metrics per task (↑ higher is better, ↓ lower is better)"]
    parts += [text for col, text in _COLUMN_PROSE.items() if col in variants.columns]
    prose = "; ".join(parts) + "."
    if variants["Δm% ↓"].isna().all():
        prose += " " + DELTA_M_HINT
    return prose


DELTA_M_HINT = "Δm% is empty: it needs the single-task baselines, `recon train MODEL_PY --single-task --split none`."


def _train_section(w: _Writer, rep: Report, variants: list[Variant]) -> None:
    from recon import plots

    w.md += ["## Trained variants", ""]
    if rep.variants is None:
        w.md += ["_No trained variant yet: run `recon train MODEL_PY --method M`._", ""]
        return
    w.md += [_variants_prose(rep.variants), "", markdown_table(rep.variants, rep.formats["variants"]), ""]
    if rep.delta_m_computed:
        labels = ", ".join(rep.delta_m_computed)
        w.md += [f"Δm% of {labels}: computed by the report from the single-task baselines' summaries.", ""]
    if rep.seeds is not None:
        w.md += ["Mean ± standard deviation over seeds:", "", markdown_table(rep.seeds_text()), ""]
    curves = {v.label: v.metrics for v in variants if v.metrics is not None}
    if curves:
        w.figure(
            "training_curves.png",
            lambda: plots.training_curves(curves, tasks=rep.tasks, directions=_metric_directions(variants)),
            "Per-task training loss and validation metrics per epoch, every trained variant overlaid.",
        )
        if any("conflict_share" in f.columns for f in curves.values()):
            w.figure(
                "conflict_share.png",
                lambda: plots.conflict_share_curves(curves),
                "Share of shared-layer task-pair cosines below 0 per epoch.",
            )


def _cosines_section(w: _Writer, rep: Report, cosines: Mapping[str, Any], variants: list[Variant]) -> None:
    from recon import plots

    w.md += ["## Layer-wise cosines across runs", ""]
    _distribution_figure(w, cosines, rep.S)
    by_method: dict[str, dict[str, Any]] = {}
    for v in variants:
        if v.cosines is not None and v.single_task is None:
            by_method.setdefault(v.method, {})[v.label] = v.cosines
    if len(by_method) > 1:
        w.figure(
            "cosine_distributions.png",
            lambda: plots.cosine_distributions(by_method, rep.S),
            "The same per gradient method, each trained variant of the method overlaid (the paper's Figure 3).",
        )


def _tables(got: _Contents, S: float) -> Report:
    """The report's tables from what :func:`_gather` read."""
    tasks = got.run.tasks
    prof = got.profile
    rep = Report(got.run.dir, tasks, S, profile=prof, plan=got.plan, problems=list(got.problems))
    rep.score = (got.plan or {}).get("score", "s-conflict")
    if rep.score == "interference" and prof is not None and not prof.has_gram:
        rep.problems.append("the plan ranked by interference but profile/ has no gram.npy: showing S-conflict")
        rep.score = "s-conflict"
    score_format = _plain_int if rep.score == "s-conflict" else _num
    if prof is not None and prof.layers and prof.steps:
        k = _confidence_k(got.plan)
        rep.scores = _scores_table(prof, S, list((got.plan or {}).get("layers", [])), rep.score, k)
        p_format = dict.fromkeys([c for c in rep.scores if c.startswith("p(top-")], ".2f")
        rep.formats["scores"] = {"in conflict": _pct, "mean cos": "+.3f", "params": ",", "interference": _num}
        rep.formats["scores"].update(score=score_format, **p_format)
    if got.plan is not None:
        rep.branched = _plan_table(got.plan, prof, S, tasks, rep.score)
        p_format = dict.fromkeys([c for c in rep.branched if c.startswith("p(top-")], ".2f")
        rep.formats["branched"] = {"params": _int, "added params": _int, "score": score_format, **p_format}
    if got.variants:
        rep.variants, rep.formats["variants"], rep.delta_m_computed = _variants_table(got.variants, tasks)
        rep.seeds = _seeds_table(rep.variants, got.variants)
    return rep


def report(
    run_dir: str | os.PathLike | None = None,
    *,
    write: bool = True,
    out: str | os.PathLike | None = None,
    S: float | None = None,
    dpi: int = 120,
) -> Report:
    """The tables of a run folder and, with ``write=True``, its ``report.md`` and figures.

    Args:
        run_dir: a run folder (made by ``recon profile``/``recon train``); None: the most recent under ``./runs``.
        write: write ``report.md`` and the PNG figures (figures of an earlier report that no longer apply are
            removed); False: only read and compute the tables.
        out: the folder to write into (default ``RUN_DIR/report``).
        S: score layers at this threshold, ``-1 < S <= 0`` (default: the split plan's, else the profile's).
        dpi: resolution of the PNG figures.

    Raises:
        ReconError: no run folder there, or ``S`` out of range. Unreadable parts of a run are not raised but
            listed in ``Report.problems``.
    """
    if S is not None:
        S = check_threshold(S)
    run = Run.open(run_dir)
    got = _gather(run)
    plan_S = (got.plan or {}).get("S")
    if S is None:
        S = float(plan_S) if plan_S is not None else (got.profile.S if got.profile else 0.0)
    rep = _tables(got, S)
    folder = (Path(out) if out is not None else run.dir / REPORT_DIR) if write else None
    w = _Writer(folder, dpi)
    w.md += [f"# recon report: `{run.dir.name}`", "", *_run_section(run)]
    prof = got.profile
    cosines: dict[str, Any] = {}
    if prof is not None and prof.steps and prof.layers:
        cosines[f"profile ({prof.meta.get('method', 'joint')} warm-up)"] = prof
    cosines.update({v.label: v.cosines for v in got.variants if v.cosines is not None})
    from_profile_only = len(cosines) == 1 and prof is not None and prof.steps > 0
    _profile_section(w, rep, cosines, from_profile_only)
    _plan_section(w, rep)
    _train_section(w, rep, got.variants)
    if cosines and not from_profile_only:
        _cosines_section(w, rep, cosines, got.variants)
    if rep.problems:
        w.md += ["## Problems", ""] + [f"- {p}" for p in rep.problems] + [""]
    rep.markdown = w.finish()
    rep.folder, rep.figures = folder, w.figures
    return rep
