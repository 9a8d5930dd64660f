"""``recon report [RUN_DIR]``: the figures and tables of whatever a run holds, as PNGs and a Markdown summary.

Reads ``profile/`` (scores, cosines), ``split/plan.json`` (the branched layers) and ``train/<label>/``
(``metrics.csv``, ``summary.json``), skips the parts a run does not hold yet, writes ``report.md`` and the
figures into ``RUN_DIR/report/`` (each file atomically) and prints the tables. The report is derived from the
run, so running it again refreshes it.
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
import typer

from cli._common import console, err_console, frame_table
from recon import _io
from recon._errors import ReconError
from recon._profile import ConflictProfile, check_threshold
from recon._runs import Run

REPORT_DIR = "report"
REPORT_FILE = "report.md"
FIGURES = (
    "heatmap.png",
    "scores.png",
    "cosine_time.png",
    "cosine_distribution.png",
    "cosine_distributions.png",
    "training_curves.png",
    "conflict_share.png",
)
MAX_MD_LAYERS = 60

Fmt = Mapping[str, str | Callable[[Any], str]]


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
    def single_task(self) -> str | None:
        s = self.summary or {}
        return s.get("single_task") or (self.label[len("single-") :] if self.label.startswith("single-") else None)

    @property
    def branched(self) -> list[str] | None:
        split = (self.summary or {}).get("split")
        return list(split.get("layers", [])) if isinstance(split, Mapping) else None


@dataclass
class Contents:
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


def gather(run: Run) -> Contents:
    """Everything readable in a run folder; unreadable parts are listed in ``problems``, not raised."""
    got = Contents(run)
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
    s = v.summary or {}
    method = str(s.get("method", v.label))
    return (v.single_task is None, method != "joint", method, v.branched is not None, s.get("seed", 0), v.label)


# --- tables -------------------------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1%}"


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)


def scores_table(profile: ConflictProfile, S: float, branched: list[str]) -> tuple[pd.DataFrame, Fmt]:
    scores = profile.scores(S)
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, len(scores) + 1),
            "score": scores["score"],
            "in conflict": scores["conflict_rate"],
            "mean cos": scores["mean_cos"],
            "params": scores["params"],
            "type": scores["type"],
            "branched": ["yes" if name in branched else "" for name in scores.index],
        },
        index=scores.index,
    )
    return frame, {"in conflict": _pct, "mean cos": "+.3f", "params": ","}


def plan_table(plan: Mapping[str, Any], profile: ConflictProfile | None, S: float, tasks: list[str]) -> pd.DataFrame:
    """The branched layers in plan order, with their score and the parameters the per-task copies add."""
    layers = list(plan.get("layers", []))
    scores = profile.scores(S) if profile is not None else None
    info = profile.layer_info if profile is not None else {}
    rows = []
    for i, name in enumerate(layers, 1):
        known = scores is not None and name in scores.index
        copies = len(info.get(name, {}).get("tasks", tasks)) or len(tasks)
        params = int(scores.loc[name, "params"]) if known else None
        rows.append(
            {
                "layer": name,
                "order": i,
                "score": int(scores.loc[name, "score"]) if known else None,
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


def _final(v: Variant, tasks: list[str], directions: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, float]]:
    """The summary's final metrics, else the last epoch of metrics.csv (a run still training)."""
    if v.summary and v.summary.get("final"):
        return {t: dict(m) for t, m in v.summary["final"].items()}
    if v.metrics is None:
        return {}
    from recon.plots import split_metric_columns

    last = v.metrics.iloc[-1]
    cols = split_metric_columns(list(v.metrics.columns), tasks)
    return {t: {m: float(last[c]) for m, c in named.items() if m != "train_loss"} for t, named in cols.items()}


def delta_m(final: Mapping, baseline: Mapping, directions: Mapping[str, Mapping[str, str]]) -> float | None:
    """``recon.delta_m`` (the trainer's Δm%), or None where a metric or its baseline is missing or 0."""
    from recon._train import delta_m as trainer_delta_m

    try:
        return trainer_delta_m(final, baseline, directions)
    except (KeyError, ReconError):
        return None


def variants_table(variants: list[Variant], tasks: list[str]) -> tuple[pd.DataFrame, Fmt, list[str]]:
    """One row per trained variant: method, branched layers, parameters, final per-task metrics, Δm%."""
    directions = _metric_directions(variants)
    finals = {v.label: _final(v, tasks, directions) for v in variants}
    baseline = {v.single_task: finals[v.label].get(v.single_task, {}) for v in variants if v.single_task}
    base_params = next(
        (
            (v.summary or {}).get("params")
            for v in variants
            if v.single_task is None and v.branched is None and (v.summary or {}).get("params")
        ),
        None,
    )
    metric_cols = []
    for t in tasks:
        names = list(directions.get(t, {}))
        for v in variants:
            names += [m for m in finals[v.label].get(t, {}) if m not in names]
        for m in names:
            arrow = {"higher": " ↑", "lower": " ↓"}.get(directions.get(t, {}).get(m, ""), "")
            metric_cols.append((t, m, f"{t} {m}{arrow}"))
    notes: list[str] = []
    rows = []
    for v in variants:
        s = v.summary or {}
        params = s.get("params")
        row: dict[str, Any] = {
            "label": v.label,
            "method": s.get("method", ""),
            "branched": "—" if v.branched is None else len(v.branched),
            "seed": s.get("seed"),
            "epochs": s.get("epochs", len(v.metrics) if v.metrics is not None else None),
            "params": params,
            "params +%": (100.0 * (params / base_params - 1.0))
            if params and base_params and not v.single_task
            else None,
        }
        for t, m, col in metric_cols:
            row[col] = finals[v.label].get(t, {}).get(m)
        dm = s.get("delta_m")
        if dm is None and v.single_task is None and all(t in baseline for t in tasks) and directions:
            dm = delta_m(finals[v.label], baseline, directions)
            if dm is not None:
                notes.append(v.label)
        row["Δm% ↓"] = dm
        row["cos<0"] = s.get("conflict_share")
        if v.summary is None:
            row["method"] = "(no summary.json: still training?)"
        rows.append(row)
    frame = pd.DataFrame(rows).set_index("label")
    frame = frame.dropna(axis=1, how="all")
    fmt: dict[str, Any] = {
        "params": lambda x: "" if pd.isna(x) else f"{int(x):,}",
        "params +%": "+.1f",
        "Δm% ↓": "+.2f",
    }
    fmt["cos<0"] = _pct
    fmt["seed"] = fmt["epochs"] = lambda x: "" if pd.isna(x) else str(int(x))
    for _, _, col in metric_cols:
        fmt[col] = _num
    return frame, fmt, notes


def seeds_table(frame: pd.DataFrame, variants: list[Variant]) -> pd.DataFrame | None:
    """Mean ± std over seeds of the metrics, Δm% and conflict share, per (method, branched layers) group.

    None unless some group holds two or more runs (seeds).
    """
    if frame.empty:
        return None
    keys = {
        v.label: ((v.summary or {}).get("method", v.label), tuple(v.branched or ()), v.single_task) for v in variants
    }
    groups: dict[tuple, list[str]] = {}
    for label in frame.index:
        groups.setdefault(keys[label], []).append(label)
    if all(len(g) < 2 for g in groups.values()):
        return None
    skip = {"method", "seed", "branched", "epochs", "params", "params +%"}
    numeric = [c for c in frame.columns if c not in skip and frame[c].dtype.kind in "fi"]

    def cell(column: str, values: pd.Series) -> str:
        if values.empty:
            return ""
        if column == "cos<0":
            mean, std = f"{values.mean():.1%}", f"{values.std(ddof=1):.1%}"
        elif column.startswith("Δm%"):
            mean, std = f"{values.mean():+.2f}", f"{values.std(ddof=1):.2f}"
        else:
            mean, std = f"{values.mean():.4g}", f"{values.std(ddof=1):.2g}"
        return f"{mean} ± {std}" if len(values) > 1 else mean

    rows = []
    for (method, branched, single), labels in groups.items():
        name = f"single-{single}" if single else f"{method}+recon" if branched else str(method)
        row: dict[str, Any] = {"variant": name, "seeds": len(labels)}
        row.update({c: cell(c, frame.loc[labels, c].astype(float).dropna()) for c in numeric})
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


# --- Markdown -----------------------------------------------------------------------------------------------
def _cell(value: Any, f: Any) -> str:
    if callable(f):
        return f(value)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return format(value, f) if f is not None else str(value)


def markdown_table(frame: pd.DataFrame, fmt: Fmt | None = None) -> str:
    """A GitHub-flavoured Markdown table of a DataFrame (index first); ``fmt`` as for ``frame_table``."""
    fmt = fmt or {}
    head = [str(frame.index.name or "")] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |"]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines.append("|---|" + "".join("--:|" if n else "---|" for n in numeric))
    for key, row in frame.iterrows():
        cells = [f"`{key}`"] + [_cell(row[c], fmt.get(c)) for c in frame.columns]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------------------
def report_command(
    run: Path | None = typer.Argument(None, help="The run folder (default: the most recent run under ./runs)."),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for report.md and the figures (default: RUN_DIR/report)."
    ),
    S: float | None = typer.Option(
        None,
        "--S",
        "-S",
        help="Score layers at this threshold, -1 < S <= 0 (default: the split plan's, else the profile's).",
    ),
    show: int = typer.Option(20, "--show", min=0, help="Rows of the score table to print (report.md lists up to 60)."),
    dpi: int = typer.Option(120, "--dpi", min=30, max=600, help="Resolution of the PNG figures."),
) -> None:
    """Figures and tables of what a run holds: conflict profile, branched layers, trained variants, Δm%."""
    if S is not None:
        S = check_threshold(S)
    the_run = Run.open(run)
    folder = Path(out) if out is not None else the_run.dir / REPORT_DIR
    got = gather(the_run)
    tasks = the_run.tasks
    plan_S = (got.plan or {}).get("S")
    S = S if S is not None else float(plan_S) if plan_S is not None else (got.profile.S if got.profile else 0.0)
    branched = list((got.plan or {}).get("layers", []))

    md: list[str] = [f"# recon report: `{the_run.dir.name}`", ""]
    md += _run_section(the_run)
    written: list[str] = []
    console.rule(f"[bold]recon report[/]  {the_run.dir}")

    def figure(name: str, fig: Any, caption: str) -> None:
        _io.save_figure(folder / name, fig, dpi=dpi)
        written.append(name)
        md.extend([f"![{Path(name).stem}]({name})", "", f"*{caption}*", ""])

    from recon import plots

    # the profile's cosines, plus those of any trained variant that recorded its cosines
    prof = got.profile
    dists: dict[str, Any] = {}
    if prof is not None and prof.steps and prof.layers:
        dists[f"profile ({prof.meta.get('method', 'joint')} warm-up)"] = prof
    dists.update({v.label: v.cosines for v in got.variants if v.cosines is not None})
    from_profile_only = len(dists) == 1 and prof is not None and prof.steps > 0

    def distribution() -> None:
        figure(
            "cosine_distribution.png",
            plots.cosine_distribution(dists, S),
            "Distribution of layer-wise cosines over all shared layers and steps (the paper's Figures 1 and 3); "
            "the legend gives each run's share below 0.",
        )

    # profile ---------------------------------------------------------------------------------------------
    md += ["## Conflict profile", ""]
    if prof is None:
        md += ["_No profile in this run yet: run `recon profile MODEL_PY`._", ""]
        console.print("[dim]no profile yet (recon profile MODEL_PY)[/]")
    elif not prof.layers or not prof.steps:
        md += [f"_The profile holds {len(prof.layers)} shared layers and {prof.steps} steps: nothing to plot._", ""]
        console.print("[yellow]the profile holds no shared layer or no step[/]")
    else:
        K = len(prof.pairs)
        md += [
            f"{prof.steps} profiled steps" + (" (**partial**: interrupted)" if prof.partial else "")
            + f", warm-up method `{prof.meta.get('method', 'joint')}`, {len(prof.layers)} shared layers, "
            f"{len(prof.tasks)} tasks ({K} pairs), S = {S:g}: a layer's S-conflict score counts its cosines below S, "
            f"at most {prof.steps * K}.",
            "",
        ]  # fmt: skip
        table, fmt = scores_table(prof, S, branched)
        md += [markdown_table(table.head(MAX_MD_LAYERS), fmt), ""]
        if len(table) > MAX_MD_LAYERS:
            md += [f"_{len(table) - MAX_MD_LAYERS} more layers in `profile/scores.csv`._", ""]
        console.print(
            frame_table(
                table.head(show),
                title=f"S-conflict scores (S = {S:g}, {prof.steps} steps; top {min(show, len(table))} of {len(table)})",
                index="layer",
                fmt=fmt,
            )
        )
        figure(
            "heatmap.png",
            plots.conflict_heatmap(prof, S),
            "Conflict rate: the share of profiled steps where a layer's task-pair cosine is below S.",
        )
        figure(
            "scores.png",
            plots.score_bars(prof, k=(got.plan or {}).get("top_k"), S=S, branched=branched or None),
            "S-conflict scores per shared layer, highest first; the branched layers are marked."
            if branched
            else "S-conflict scores per shared layer, highest first.",
        )
        figure(
            "cosine_time.png",
            plots.cosine_over_time(prof, S=S),
            "Layer-wise cosine over the profiled steps (mean over task pairs); the strip on top is the share below S.",
        )
        if from_profile_only:
            distribution()

    # split -------------------------------------------------------------------------------------------------
    md += ["## Branched layers", ""]
    if got.plan is None:
        md += ["_No split plan yet: run `recon split --top-k K`._", ""]
        console.print("[dim]no split plan yet (recon split --top-k K)[/]")
    elif not branched:
        md += ["_The split plan branches no layer._", ""]
    else:
        table = plan_table(got.plan, prof, S, tasks)
        meta = ", ".join(f"{k} = `{got.plan[k]}`" for k in ("top_k", "S", "init") if got.plan.get(k) is not None)
        added = table["added params"].dropna()
        md += [f"{len(branched)} layers branched into per-task copies ({meta}).", ""]
        if len(added):
            md += [f"The copies add {int(added.sum()):,} parameters.", ""]
        fmt = {
            "params": lambda x: "" if pd.isna(x) else f"{int(x):,}",
            "added params": lambda x: "" if pd.isna(x) else f"{int(x):,}",
        }
        fmt["score"] = lambda x: "" if pd.isna(x) else str(int(x))
        md += [markdown_table(table, fmt), ""]
        diagram = the_run.dir / "split" / "network.png"  # drawn by `recon split`
        if diagram.exists():
            link = Path(os.path.relpath(diagram, folder)).as_posix()
            md += [f"![network]({link})", "", "*The split network: shared, branched and task-only layers.*", ""]
        console.print(frame_table(table, title=f"branched layers ({meta})", index="layer", fmt=fmt))

    # train -------------------------------------------------------------------------------------------------
    md += ["## Trained variants", ""]
    if not got.variants:
        md += ["_No trained variant yet: run `recon train MODEL_PY --method M`._", ""]
        console.print("[dim]no trained variant yet (recon train MODEL_PY)[/]")
    else:
        table, fmt, notes = variants_table(got.variants, tasks)
        md += [
            "Final validation metrics per task (↑ higher is better, ↓ lower is better); `params +%` is the increase "
            "over the unsplit model; Δm% is the mean relative drop against the single-task baselines over all "
            "(task, metric) pairs (lower is better); `cos<0` is the share of shared-layer task-pair cosines below 0 "
            "during training.",
            "",
            markdown_table(table, fmt),
            "",
        ]
        if notes:
            md += [f"Δm% of {', '.join(notes)}: computed by the report from the single-task baselines' summaries.", ""]
        console.print(frame_table(table, title="trained variants (final validation metrics)", index="label", fmt=fmt))
        seeds = seeds_table(table, got.variants)
        if seeds is not None:
            md += ["Mean ± standard deviation over seeds:", "", markdown_table(seeds), ""]
            console.print(frame_table(seeds, title="mean ± std over seeds", index="variant"))
        curves = {v.label: v.metrics for v in got.variants if v.metrics is not None}
        if curves:
            figure(
                "training_curves.png",
                plots.training_curves(curves, tasks=tasks, directions=_metric_directions(got.variants)),
                "Per-task training loss and validation metrics per epoch, every trained variant overlaid.",
            )
            if any("conflict_share" in f.columns for f in curves.values()):
                figure(
                    "conflict_share.png",
                    plots.conflict_share_curves(curves),
                    "Share of shared-layer task-pair cosines below 0 per epoch.",
                )

    if dists and not from_profile_only:
        md += ["## Layer-wise cosines across runs", ""]
        distribution()
        by_method: dict[str, dict[str, Any]] = {}
        for v in got.variants:
            if v.cosines is not None and v.single_task is None:
                by_method.setdefault(str((v.summary or {}).get("method", v.label)), {})[v.label] = v.cosines
        if len(by_method) > 1:
            figure(
                "cosine_distributions.png",
                plots.cosine_distributions(by_method, S),
                "The same per gradient method, each trained variant of the method overlaid (the paper's Figure 3).",
            )

    if got.problems:
        md += ["## Problems", ""] + [f"- {p}" for p in got.problems] + [""]
        for p in got.problems:
            err_console.print(f"[yellow]warning:[/] {p}")
    for name in FIGURES:  # figures of an earlier report that this one did not draw
        if name not in written and (folder / name).exists():
            (folder / name).unlink()
    _io.write_text(folder / REPORT_FILE, "\n".join(md).rstrip() + "\n")
    console.print(f"report written to [bold]{folder / REPORT_FILE}[/] ({len(written)} figures)")


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
