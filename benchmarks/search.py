"""``recon search`` on the study's recipes, and whether its choice agrees with the equal-cost study (issue 22).

For each recipe (multidigits, multidigits3): the study's settings (4096 training pairs, 1024 validation pairs,
batch 64, Adam lr 1e-3 with cosine decay, +10% parameters and at most 1.2x forward FLOPs, a 1-epoch seed-0
profile, method joint), a search within ``--time``, its leaderboard and wall time. Then the agreement table: the
study's best row at full length (``benchmarks/results/evidence/``, written by ``benchmarks/evidence.py`` on the
study branch; ``--study`` points elsewhere) against search's choice, and by how much search misses when they
disagree (the study's Δm% of search's choice minus the study's best). Rows of the study that are not complete
are marked ``n=k/N``.

    python benchmarks/search.py --time 8m                  # run (resumes finished trials) and print
    python benchmarks/search.py --table-only               # only the tables, from the files
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
STUDY = Path("/work/wt/study/benchmarks/results/evidence")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="multidigits,multidigits3")
    p.add_argument("--time", default="8m", help="time budget of each search")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget-params", type=float, default=0.1)
    p.add_argument("--budget-flops", type=float, default=1.2)
    p.add_argument("--train-size", type=int, default=4096)
    p.add_argument("--val-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--study", type=Path, default=STUDY, help="the study's result folder (evidence/)")
    p.add_argument("--table-only", action="store_true")
    return p.parse_args(argv)


def run_search(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One search (resumed when its folder holds one); its wall time is kept in ``wall.json``."""
    import recon
    from recon import _io

    recipe = recon.load_recipe(ROOT / "examples" / f"{name}.py")
    start = time.perf_counter()
    recon.seed_everything(0)
    prof = recon.profile(recipe.build_model(), recipe.train_data, recipe.losses, epochs=1, seed=0)
    profiled = time.perf_counter() - start
    result = recon.search(
        recipe.build_model, recipe.train_data, recipe.val_data, recipe.losses, recipe.metrics,
        budget_params=args.budget_params, budget_flops=args.budget_flops, time_budget=args.time, seeds=args.seeds,
        profile=prof, optimizer=recipe.make_optimizer, out=folder, resume=(folder / "state.json").exists(),
    )  # fmt: skip
    wall = {"profile_s": profiled, "search_s": result.seconds, "total_s": time.perf_counter() - start,
            "load": os.getloadavg()[0], "time_budget": args.time}  # fmt: skip
    _io.write_json(folder / "wall.json", wall)
    return wall


def study_rows(study: Path, name: str) -> dict[str, dict[str, Any]]:
    """The study's joint rows of one recipe: ``{row: {"key", "delta_m": [per seed], "seeds"}}``."""
    rows: dict[str, dict[str, Any]] = {}
    for file in sorted(study.glob(f"{name}/e*/joint/*.json")):
        rec = json.loads(file.read_text())
        if rec.get("delta_m") is None:
            continue
        row = rows.setdefault(rec["candidate"], {"key": rec["key"], "delta_m": {}})
        row["delta_m"][rec["seed"]] = rec["delta_m"]
    return rows


def agreement(name: str, folder: Path, study: Path) -> str:
    """One Markdown row: search's choice against the study's best row (lowest mean Δm%)."""
    from recon._trials import Candidate

    result = json.loads((folder / "result.json").read_text())
    state = json.loads((folder / "state.json").read_text())
    chosen = result["chosen"]
    spec = next((c["spec"] for c in state["candidates"] if c["name"] == chosen), None)
    key = Candidate("x", spec).key() if spec else Candidate("unsplit").key()
    rows = study_rows(study, name)
    if not rows:
        return f"| {name} | {chosen or 'no split'} | – | no study results yet | – | – |"
    n_max = max(len(r["delta_m"]) for r in rows.values())

    def mean(r: dict) -> float:
        return sum(r["delta_m"].values()) / len(r["delta_m"])

    best_name, best = min(rows.items(), key=lambda kv: mean(kv[1]))
    mine = [(n, r) for n, r in rows.items() if r["key"] == key]
    agree = any(r["key"] == best["key"] for _, r in mine) or best["key"] == key
    miss = f"{mean(mine[0][1]) - mean(best):+.2f}" if mine else "not a study row"
    seeds = ", ".join(f"{n}: n={len(r['delta_m'])}/{n_max}" for n, r in rows.items() if len(r["delta_m"]) < n_max)
    return (
        f"| {name} | {chosen or 'no split'} | {', '.join(n for n, _ in mine) or '–'} | {best_name} "
        f"(Δm% {mean(best):+.2f}) | {'yes' if agree else 'no'} | {miss} |" + (f" incomplete: {seeds}" if seeds else "")
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["RECON_DIGITS_TRAIN"] = str(args.train_size)
    os.environ["RECON_DIGITS_VAL"] = str(args.val_size)
    sys.path[:0] = [str(ROOT)]
    import torch

    torch.set_num_threads(args.threads)
    names = args.recipes.split(",")
    lines = []
    for name in names:
        folder = OUT / "search" / name
        if not args.table_only:
            run_search(name, args, folder)
        wall = json.loads((folder / "wall.json").read_text())
        lines += [(folder / "leaderboard.md").read_text(), f"wall time: profile {wall['profile_s']:.0f}s + search "
                  f"{wall['search_s']:.0f}s (budget {wall['time_budget']}), load {wall['load']:.1f}\n"]  # fmt: skip
    lines += ["### Agreement with the equal-cost study (joint, its best row at full length)", "",
              "| recipe | search's choice | = study row | study's best row | agree | miss (Δm%, choice − best) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [agreement(name, OUT / "search" / name, args.study) for name in names]
    text = "\n".join(lines) + "\n"
    (OUT / "search.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
