"""The tables of ``benchmarks/evidence.py``, from whatever result files have finished (``--table-only``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.evidence import (
    ROW_ORDER,
    candidate_of,
    commit,
    features,
    load_json,
    result_path,
    settings,
    setup_of,
    tag,
)

COMPARE = ("unsplit", "random", "width", "heads")


def baselines(folder: Path, args: argparse.Namespace, tasks: list[str]) -> tuple[dict, dict]:
    """Mean single-task metrics at the study's length, and the plateau check (value at E vs best over 2E)."""
    base: dict[str, dict[str, float]] = {}
    plateau: dict[str, Any] = {}
    for t in tasks:
        runs = [load_json(folder / tag(args) / "baseline" / f"{t}-e{args.epochs}-s{s}.json") for s in range(4)]
        runs = [r for r in runs if r]
        if runs:
            metric = next(iter(runs[0]["final"][t]))
            base[t] = {m: float(np.mean([r["final"][t][m] for r in runs])) for m in runs[0]["final"][t]}
            base[t]["_n"] = len(runs)
        long = load_json(folder / tag(args) / "baseline" / f"{t}-e{2 * args.epochs}-s0.json")
        short = runs[0] if runs and runs[0]["seed"] == 0 else None
        if long and short:
            curve = [h[f"val_{t}_{metric}"] for h in long["history"]]
            plateau[t] = (100 * short["final"][t][metric], 100 * max(curve), 100 * long["final"][t][metric])
    return base, plateau


def delta_m(record: dict, base: dict) -> float | None:
    """Δm% of one run against the mean baselines, with the recipe's metric directions."""
    import recon

    if any(t not in base for t in record["tasks"]):
        return None
    metrics = setup_of(record["recipe"]).metrics
    directions = {t: {m: metrics[t][m][1] for m in record["final"][t]} for t in record["tasks"]}
    reference = {t: {m: v for m, v in b.items() if m != "_n"} for t, b in base.items()}
    return recon.delta_m(record["final"], reference, directions)


def reference_of(row: str, kind: str, rows: dict) -> str | None:
    """The row a paired difference compares ``row`` against (``kind``: unsplit, random, width, heads)."""
    regime = row[row.index("[") :] if "[" in row else "[cap]"
    if kind == "random":
        score = "interf" if row.startswith(("interf", "random~interf")) else "sconf"
        name = f"random{'' if score == 'sconf' else '~interf'} {regime}"
    elif kind == "heads":
        name = f"heads {regime}"
    else:
        name = kind
    return None if name == row or name not in rows else name


def collect(folder: Path, args: argparse.Namespace, method: str, rows: dict, feats: dict) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for row, entry in rows.items():
        if "error" in entry:
            continue
        out[row] = {}
        for seed in range(args.seeds):
            if "per_seed" in entry and str(seed) not in entry["per_seed"]:
                continue
            rec = load_json(result_path(folder, args, method, candidate_of(row, entry, seed), seed, feats))
            if rec is not None:
                out[row][seed] = rec
    return out


def _pm(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def row_line(row: str, runs: dict[int, dict], all_runs: dict, rows: dict, base: dict, args, plans: dict) -> list[str]:
    from recon._trials import paired_difference

    tasks = next(iter(runs.values()))["tasks"]
    metric = {t: next(iter(next(iter(runs.values()))["final"][t])) for t in tasks}
    dms = {s: delta_m(r, base) for s, r in runs.items()}
    n = len(runs)
    cells = [row if n >= args.seeds else f"{row} (n={n}/{args.seeds})"]
    if len(tasks) <= 3:
        cells += [_pm([100 * r["final"][t][metric[t]] for r in runs.values()]) for t in tasks]
    else:
        cells.append(_pm([100 * np.mean([r["final"][t][metric[t]] for t in tasks]) for r in runs.values()]))
    cells.append(_pm([d for d in dms.values() if d is not None], 2))
    for kind in COMPARE:
        ref = reference_of(row, kind, rows)
        if ref is None or not all_runs.get(ref):
            cells.append("–")
            continue
        ref_dm = {s: delta_m(r, base) for s, r in all_runs[ref].items()}
        common = sorted(s for s in dms if s in ref_dm and dms[s] is not None and ref_dm[s] is not None)
        cells.append(str(paired_difference([dms[s] for s in common], [ref_dm[s] for s in common])) if common else "–")
    params = [r["params"] for r in runs.values()]
    flops = [r["flops"] for r in runs.values()]
    cells.append(f"{np.mean(params):,.0f} ({np.mean(params) / plans['base_params'] - 1:+.1%})")
    cells.append(f"{np.mean(flops) / plans['base_flops']:.2f}x")
    cells.append(f"{np.median([r['step_ratio'] for r in runs.values()]):.2f}x")
    return cells


def recipe_section(name: str, folder: Path, args: argparse.Namespace, methods: list[str]) -> list[str]:
    plans = load_json(folder / "plans.json")
    if plans is None:
        return [f"## {name}", "", "not started", ""]
    rows, feats = plans["rows"], features()
    tasks = plans["tasks"]
    base, plateau = baselines(folder, args, tasks)
    out = [f"## {name}", ""]
    for method in methods:
        all_runs = collect(folder, args, method, rows, feats)
        if not any(all_runs.values()):
            out += [f"### {method}: not started", ""]
            continue
        head = ["row"] + ([f"{t} acc %" for t in tasks] if len(tasks) <= 3 else ["mean acc %"])
        head += ["Δm% (↓)"] + [f"vs {k}" for k in COMPARE] + ["params", "FLOPs", "step time"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in ROW_ORDER:
            if all_runs.get(row):
                lines.append("| " + " | ".join(row_line(row, all_runs[row], all_runs, rows, base, args, plans)) + " |")
        out += [f"### {method}", "", *lines, ""]
        commits = {row: sorted({r["commit"] for r in runs.values()}) for row, runs in all_runs.items() if runs}
        mixed = {row: c for row, c in commits.items() if len(c) > 1}
        out += [f"Commits of the runs: {sorted({c for cs in commits.values() for c in cs})}"]
        out += [f"; rows run across commits (same training semantics, see the report): {mixed}" if mixed else "", ""]
    out += plans_section(rows, plans) + plateau_section(base, plateau) + stability_section(plans["stability"])
    return out


def plans_section(rows: dict, plans: dict) -> list[str]:
    out = ["Plans (from the seed-0 profile):", ""]
    heads = {r: e.get("spec") for r, e in rows.items() if r.startswith("heads")}
    for row in ROW_ORDER:
        e = rows.get(row)
        if e is None:
            continue
        if "error" in e:
            out.append(f"- `{row}`: not run: {e['error']}")
            continue
        what = e.get("note") or (f"per seed: {e['per_seed']}" if "per_seed" in e else json.dumps(e.get("spec")))
        same = [h for h, spec in heads.items() if h != row and spec == e.get("spec") and e.get("spec")]
        flag = f" (= {', '.join(same)}: the profile added nothing here)" if same and not row.startswith("heads") else ""
        out.append(f"- `{row}`: {what}{flag}")
    return [*out, ""]


def plateau_section(base: dict, plateau: dict) -> list[str]:
    intro = (
        "Single-task baselines (mean over seeds, the Δm% reference) and the plateau check (seed 0: accuracy after "
        "E epochs vs the best and the last of a run of 2E epochs; plateaued: within 1 point of the best):"
    )
    out = [intro, ""]
    for t, b in base.items():
        line = f"- {t}: " + ", ".join(f"{m} {100 * v:.1f}%" for m, v in b.items() if m != "_n") + f" (n={b['_n']})"
        if t in plateau:
            e, best, last = plateau[t]
            verdict = "plateaued" if best - e <= 1.0 else "NOT plateaued"
            line += f"; E: {e:.1f}, 2E best {best:.1f}, 2E last {last:.1f}: {verdict}"
        out.append(line)
    return [*out, ""]


def stability_section(stab: dict) -> list[str]:
    keys = list(stab)
    k = len(stab[keys[0]]["top_sconf"])
    out = [f"Profile stability: top-{k} S-conflict layers per profile (seed x warm-up epochs), and the cap plan:", ""]
    for key in keys:
        out.append(f"- {key}: top {stab[key]['top_sconf']}; cap plan {json.dumps(stab[key]['cap_plan'])}")
    for score in ("top_sconf", "top_interf"):
        if score not in stab[keys[0]]:
            continue
        sets = [set(stab[key][score]) for key in keys]
        pairs = [len(a & b) / k for i, a in enumerate(sets) for b in sets[i + 1 :]]
        same_plan = sum(json.dumps(stab[key]["cap_plan"]) == json.dumps(stab[keys[0]]["cap_plan"]) for key in keys)
        out.append(
            f"- {score[4:]}: top-{k} overlap over the {len(pairs)} pairs of profiles: mean {np.mean(pairs):.2f}, "
            f"min {min(pairs):.2f}; profiles whose cap plan equals the seed-0 one: {same_plan}/{len(keys)}"
        )
    return [*out, ""]


def write(args: argparse.Namespace, folder: Path, recipes: list[str], methods: list[str]) -> str:
    from recon import _io

    seconds = sum(
        json.loads(p.read_text()).get("seconds", 0) for p in folder.glob(f"*/{tag(args)}/**/*.json") if p.is_file()
    )
    header = [
        "# Does branching pay? The equal-cost study (`benchmarks/evidence.py`)",
        "",
        f"Settings: {json.dumps(settings(args))}; {args.seeds} seeds per row, paired; recon {commit()}; "
        f"features {json.dumps(features())}; training time in the finished runs: {seconds / 3600:.2f} h.",
        "",
        "Δm% (lower is better) per seed against the mean single-task baselines, mean ± std over seeds. "
        "`vs X`: the mean paired difference of Δm% (row − X, negative: the row is better) over the seeds both have, "
        'with a 95% Student-t interval; "not resolved" when it contains 0. A row marked n=k/N is incomplete.',
        "",
    ]
    body = [line for name in recipes for line in recipe_section(name, folder / name, args, methods)]
    text = "\n".join(header + body) + "\n"
    _io.write_text(args.out / "evidence.md", text)
    return text
