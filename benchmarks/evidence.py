"""Does branching pay? The equal-cost study that can decide (issue 18, item 4).

For each recipe (multidigits3, multidigits, multidigits_attributes) and method (joint = ``mean``, PCGrad), every
row trains from scratch for the same number of epochs, 5 seeds, **paired** (``recon/_trials.py``): every
candidate of one seed starts from the same unsplit model (split with ``init="copy"``; a wider model gets every
parameter whose shape it shares) and sees the same batches in the same order. Rows, all at one cost, +10%
parameters and at most 1.2x forward FLOPs (``cap``), and again under the parameter budget alone (``params``):

* ``unsplit``; ``width``: the unsplit model with the trunk/fc width whose parameters come closest to the budget;
* ``sconf``: :func:`recon.plan_split` with the paper's S-conflict score; ``sconf+groups``: with ``groups="auto"``;
* ``interf``, ``interf+groups``: the same with ``score="interference"`` (when recon has it);
* ``random``: per seed, a new random set of shared layers whose added parameters and FLOPs lie within ±10% of
  the ``sconf`` plan's (rejection sampling, never the plan's own set); ``random~interf`` likewise for ``interf``;
* ``heads``: the shared layers nearest the outputs, in reverse topological order, up to the same budget;
* ``top-k``: the paper's unbudgeted rule (k = 4), for reference.

Training: Adam (lr 1e-3), learning rate cosine-decayed to 0 per epoch, batch 64; metrics after the last epoch.
Single-task baselines (for Δm%) train the same way; the plateau check trains each task once more for twice as
many epochs. The plans come from one joint profile (seed 0); stability: top-k overlap across 3 profile seeds
and 2 warm-up lengths.

Each finished run is one JSON file under ``benchmarks/results/evidence/`` (with the commit and the exact
settings); rerunning skips finished runs, so the study is resumable. ``--table-only`` regenerates
``benchmarks/results/evidence.md`` from whatever has finished (incomplete rows are marked).

    nohup nice -n 5 python benchmarks/evidence.py > evidence.log 2>&1 &     # run / resume
    python benchmarks/evidence.py --table-only                              # the table so far
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
RECIPES = "multidigits3,multidigits,multidigits_attributes"
SCORES = ("sconf", "interf")
REGIMES = ("cap", "params")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=RECIPES)
    p.add_argument("--methods", default="joint,pcgrad")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--baseline-seeds", type=int, default=3)
    p.add_argument("--train-size", type=int, default=4096)
    p.add_argument("--val-size", type=int, default=1024)
    p.add_argument("--budget-params", type=float, default=0.1)
    p.add_argument("--budget-flops", type=float, default=1.2)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--profile-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--table-only", action="store_true", help="only regenerate evidence.md from the result files")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs comparable; results are only ever pooled under equal settings."""
    return {
        "epochs": args.epochs,
        "train_size": args.train_size,
        "val_size": args.val_size,
        "batch_size": int(os.environ.get("RECON_DIGITS_BATCH", 64)),
        "optimizer": "adam lr=1e-3, cosine decay per epoch",
        "budget_params": args.budget_params,
        "budget_flops": args.budget_flops,
        "top_k": args.top_k,
        "profile_epochs": args.profile_epochs,
    }


def tag(args: argparse.Namespace) -> str:
    return f"e{args.epochs}-n{args.train_size}-v{args.val_size}"


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", "recon") else "")


def features() -> dict[str, Any]:
    """What the recon in use can do: the interference score, group copies trained as groups."""
    import importlib.util

    import recon

    group_solve = "per-group" if importlib.util.find_spec("recon._usage") else "global"
    score = "score" in inspect.signature(recon.plan_split).parameters
    return {"interference": score, "group_copies": group_solve}


def load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


# ------------------------------------------------------------------------------------------------ plans
def spec_of(plan: Any) -> Any:
    """A plan's layers as recon.split takes them; per-task layers (all groups singletons) as a plain list."""
    groups = plan.groups or {}
    if all(all(len(g) == 1 for g in groups.get(n) or [[None]]) for n in plan.layers):
        return sorted(plan.layers)
    return {n: (None if all(len(g) == 1 for g in groups[n]) else groups[n]) for n in sorted(plan.layers)}


def profile_of(recipe: Any, seed: int, epochs: int) -> Any:
    import recon

    recon.seed_everything(seed)
    return recon.profile(recipe.build_model(), recipe.train_data, recipe.losses, epochs=epochs, seed=seed)


def width_options() -> list[dict[str, int]]:
    return [{"width": w, "hidden": h} for w in (15, 16, 17) for h in range(32, 257)]


def plan_rows(recipe: Any, prof: Any, args: argparse.Namespace, feats: dict[str, Any]) -> dict[str, dict]:
    """Every row's candidate: ``{row: {"spec", "build", "per_seed", "controls", "note", "error"}}``."""
    import recon
    from recon._trials import CostModel, deeper_heads, match_width, random_layers

    x = recipe.first_batch()[0]
    model = recipe.build_model()
    cost = CostModel(model, recipe.tasks, x)
    base, base_flops = cost.base_params, cost.base_flops
    rows: dict[str, dict] = {"unsplit": {"spec": None}}
    build, n, f = match_width(
        recipe.build_model, width_options(), params=base * (1 + args.budget_params),
        max_flops=args.budget_flops * base_flops, example_inputs=x,
    )  # fmt: skip
    rows["width"] = {
        "build": build,
        "note": f"width {build['width']}, fc {build['hidden']}: {n / base - 1:+.1%} params",
    }
    rows["top-k"] = {"spec": spec_of(recon.plan_split(prof, model, top_k=args.top_k))}
    scores = [s for s in SCORES if s == "sconf" or feats["interference"]]
    for regime in REGIMES:
        flops_cap = args.budget_flops if regime == "cap" else None
        for score in scores:
            kw = {"score": "interference"} if score == "interf" else {}
            for groups in ("none", "auto"):
                row = f"{score}{'+groups' if groups == 'auto' else ''} [{regime}]"
                try:
                    plan = recon.plan_split(
                        prof, model, budget_params=args.budget_params, budget_flops=flops_cap, groups=groups,
                        example_inputs=x, **kw,
                    )  # fmt: skip
                    rows[row] = {"spec": spec_of(plan)}
                except recon.ReconError as e:
                    rows[row] = {"error": str(e)}
            plan_row = rows[f"{score} [{regime}]"]
            control = f"random{'' if score == 'sconf' else '~' + score} [{regime}]"
            if "spec" not in plan_row:
                rows[control] = {"error": f"no {score} plan to control for"}
                continue
            spec = plan_row["spec"]
            added, flops = cost.added_params(spec), cost.flops(spec)
            try:
                draws = {
                    str(s): random_layers(cost, params=added, flops=flops, seed=s, avoid=list(spec))
                    for s in range(args.seeds)
                }
                rows[control] = {
                    "per_seed": {k: sorted(v) for k, v in draws.items()},
                    "controls": f"{score} [{regime}]",
                }
            except recon.ReconError as e:
                rows[control] = {"error": str(e)}
        max_flops = args.budget_flops * base_flops if regime == "cap" else float("inf")
        rows[f"heads [{regime}]"] = {
            "spec": sorted(deeper_heads(cost, max_params=args.budget_params * base, max_flops=max_flops))
        }
    for row in rows.values():
        if "spec" in row and "error" not in row:
            row["params"] = base + (cost.added_params(row["spec"]) if row["spec"] else 0)
            row["flops"] = cost.flops(row["spec"]) if row["spec"] else base_flops
    return {"base_params": base, "base_flops": base_flops, "rows": rows}


def stability(recipe: Any, args: argparse.Namespace, feats: dict[str, Any], reference: Any) -> dict[str, Any]:
    """Top-k layers (and the cap plan) of profiles with 3 seeds x 2 warm-up lengths."""
    import recon

    x = recipe.first_batch()[0]
    out: dict[str, Any] = {}
    for seed in (0, 1, 2):
        for epochs in (args.profile_epochs, 2 * args.profile_epochs):
            prof = reference if (seed, epochs) == (0, args.profile_epochs) else profile_of(recipe, seed, epochs)
            entry = {"top_sconf": prof.top_layers(args.top_k)}
            if feats["interference"]:
                entry["top_interf"] = [n for n in prof.scores(score="interference").index if n][: args.top_k]
            plan = recon.plan_split(
                prof, recipe.build_model(), budget_params=args.budget_params, budget_flops=args.budget_flops,
                example_inputs=x,
            )  # fmt: skip
            entry["cap_plan"] = spec_of(plan)
            out[f"seed {seed}, {epochs} epoch(s)"] = entry
            print(f"  profile seed {seed} x {epochs} epochs: top-{args.top_k} {entry['top_sconf']}", flush=True)
    return out


def prepare(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The recipe's plans (and profile stability), computed once and kept in ``plans.json``."""
    import recon
    from recon import _io

    path = folder / "plans.json"
    feats = features()
    old = load_json(path)
    want = {k: settings(args)[k] for k in ("budget_params", "budget_flops", "top_k", "profile_epochs", "train_size")}
    if old and old["settings"] == want and old["features"] == feats and old["seeds"] >= args.seeds:
        return old
    start = time.perf_counter()
    recipe = recon.load_recipe(ROOT / "examples" / f"{name}.py")
    prof = profile_of(recipe, 0, args.profile_epochs)
    plans = plan_rows(recipe, prof, args, feats)
    for row, entry in plans["rows"].items():
        print(f"[{name}] {row}: {entry}", flush=True)
    plans["stability"] = stability(recipe, args, feats, prof)
    plans.update(settings=want, features=feats, seeds=args.seeds, commit=commit(), tasks=list(recipe.tasks))
    plans["seconds"] = time.perf_counter() - start
    _io.write_json(path, plans)
    return plans


# ------------------------------------------------------------------------------------------------- runs
PHASES = (  # the equal-cost rows first (5 seeds), then the parameter budget alone, then the paper's top-k
    ("unsplit", "sconf [cap]", "random [cap]", "heads [cap]", "width", "sconf+groups [cap]",
     "interf [cap]", "random~interf [cap]", "interf+groups [cap]"),
    ("sconf [params]", "random [params]", "heads [params]", "sconf+groups [params]",
     "interf [params]", "random~interf [params]", "interf+groups [params]"),
    ("top-k",),
)  # fmt: skip
ROW_ORDER = tuple(row for phase in PHASES for row in phase)


def candidate_of(row: str, entry: dict[str, Any], seed: int) -> Any:
    from recon._trials import Candidate

    spec = entry["per_seed"][str(seed)] if "per_seed" in entry else entry.get("spec")
    return Candidate(row, spec, entry.get("build") or {})


def result_path(folder: Path, args: argparse.Namespace, method: str, cand: Any, seed: int, feats: dict) -> Path:
    grouped = isinstance(cand.spec, dict) and any(v is not None for v in cand.spec.values())
    suffix = "-groups_" + feats["group_copies"] if grouped else ""
    return folder / tag(args) / method / f"{cand.key()}{suffix}-s{seed}.json"


class Job:
    """One training run whose result is one JSON file (it exists: the run is done)."""

    def __init__(self, name: str, path: Path, cand: Any, seed: int, method: str, epochs: int, tasks=None) -> None:
        self.name, self.path, self.cand, self.seed, self.method = name, path, cand, seed, method
        self.epochs, self.tasks = epochs, tasks

    def done(self) -> bool:
        return self.path.exists()

    def __str__(self) -> str:
        what = f"baseline {self.tasks[0]}" if self.tasks else self.cand.name
        return f"{self.name} {self.method} {what} seed {self.seed} ({self.epochs} epochs)"

    def run(self, args: argparse.Namespace) -> None:
        from recon import _io
        from recon._trials import run_trial

        load = os.getloadavg()[0]
        result = run_trial(
            setup_of(self.name), self.cand, seed=self.seed, method=self.method, epochs=self.epochs,
            tasks=self.tasks, time_steps=self.tasks is None,
        )  # fmt: skip
        record = result.to_dict()
        record.update(
            recipe=self.name, spec=self.cand.spec, build=dict(self.cand.build), commit=commit(), features=features(),
            settings={**settings(args), "epochs": self.epochs}, threads=args.threads, load=[load, os.getloadavg()[0]],
        )  # fmt: skip
        _io.write_json(self.path, record)


_SETUPS: dict[str, Any] = {}


def setup_of(name: str) -> Any:
    import recon
    from recon._trials import TrialSetup

    if name not in _SETUPS:
        _SETUPS[name] = TrialSetup.from_recipe(recon.load_recipe(ROOT / "examples" / f"{name}.py"))
    return _SETUPS[name]


def baseline_jobs(name: str, args: argparse.Namespace, folder: Path, twice: bool) -> list[Job]:
    from recon._trials import Candidate

    tasks = list(setup_of(name).tasks)
    epochs = 2 * args.epochs if twice else args.epochs
    seeds = [0] if twice else range(args.baseline_seeds)
    return [
        Job(name, folder / tag(args) / "baseline" / f"{t}-e{epochs}-s{s}.json", Candidate("unsplit"), s, "joint",
            epochs, [t])
        for s in seeds for t in tasks
    ]  # fmt: skip


def block(name: str, method: str, args: argparse.Namespace, folder: Path) -> list[Job]:
    """One recipe and method: the baselines, then each phase's rows seed by seed (so paired comparisons fill in
    early), the plateau check after the first phase; identical candidates (two rows with one plan) run once."""
    feats = features()
    rows = load_json(folder / name / "plans.json")["rows"]
    jobs = baseline_jobs(name, args, folder / name, twice=False)
    for i, phase in enumerate(PHASES):
        for seed, row in ((s, r) for s in range(args.seeds) for r in phase):
            if row in rows and "error" not in rows[row]:
                cand = candidate_of(row, rows[row], seed)
                path = result_path(folder / name, args, method, cand, seed, feats)
                jobs.append(Job(name, path, cand, seed, method, args.epochs))
        if i == 0:
            jobs += baseline_jobs(name, args, folder / name, twice=True)
    unique: dict[Path, Job] = {}
    for job in jobs:
        unique.setdefault(job.path, job)
    return list(unique.values())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["RECON_DIGITS_TRAIN"] = str(args.train_size)
    os.environ["RECON_DIGITS_VAL"] = str(args.val_size)
    sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks import evidence_table

    folder = args.out / "evidence"
    recipes, methods = args.recipes.split(","), args.methods.split(",")
    if not args.table_only:  # most decisive first: per method (joint first), per recipe, one block at a time
        start = time.perf_counter()
        for method in methods:
            for name in recipes:
                prepare(name, args, folder / name)
                jobs = block(name, method, args, folder)
                print(f"[{name} {method}] {len(jobs)} runs, {sum(j.done() for j in jobs)} already done", flush=True)
                for i, job in enumerate(jobs):
                    if job.done():
                        continue
                    job.run(args)
                    print(f"[{i + 1}/{len(jobs)}] {job} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
                    evidence_table.write(args, folder, recipes, methods)
    evidence_table.write(args, folder, recipes, methods)


if __name__ == "__main__":
    main()
