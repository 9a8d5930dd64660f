"""Many tasks: what profiling and training cost at K = 2, 10, 40, with sampling and task chunks (issue "forty
tasks").

One run, the same MultiDigits trunk (``examples/multidigits.py``: 2 tasks, ``multidigits_attributes.py``: 10,
``digits40.py``: 40), the same batches and seed for every variant of a K:

  plain       a plain training step: forward, one backward of the mean loss, Adam step;
  every=1     ``recon.profile(..., every=1)``: K task gradients and the layer-wise cosines on every step;
  every=auto  ``recon.profile(..., every="auto")``: recorded on 1 step in N (N printed), the others like plain;
  overlap     the top-10 layers (S-conflict score, S = 0) of every=auto against every=1 over the same steps, and
              the Spearman correlation of the two score columns: is the sample enough?
  methods     at K = 40, a ``recon.train`` step with mean, PCGrad and CAGrad, task gradients whole and in chunks
              of ``--chunk`` tasks (:mod:`recon._chunks`), and the J memory each holds (K x P against
              2 x chunk x P floats);
  plan        ``recon.plan_split(profile, model, budget_params=0.1, groups="auto")`` on the K = 40 profile.

Times are process CPU seconds of a single-threaded run (``torch.set_num_threads(1)``), far less sensitive to the
other processes of a shared machine than wall time; ratios are to the plain step of the same K. Each time
includes the call's set-up (torch.fx tracing for the profiler), spread over ``--steps`` steps. Peak memory is
the growth of the process's resident high-water mark during the call (``/proc/self/clear_refs`` reset before
it, as ``benchmarks/profile_overhead.py`` measures it), over the plain step's.

    python benchmarks/many_tasks.py                      # about 10 minutes on one loaded CPU core
    python benchmarks/many_tasks.py --steps 8 --quick    # smoke run: K = 2, 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {2: "multidigits.py", 10: "multidigits_attributes.py", 40: "digits40.py"}
TOP = 10


def _measure(fn):
    """``(result, process CPU seconds, peak resident growth in bytes)`` of ``fn()``."""
    from benchmarks.profile_overhead import _hwm_bytes, _reset_hwm, _rss_bytes

    reset = _reset_hwm()
    before = _rss_bytes()
    start = time.process_time()
    out = fn()
    seconds = time.process_time() - start
    peak = (_hwm_bytes() or before) - before if reset else 0
    return out, seconds, max(peak, 0)


def _batches(recipe, steps: int) -> list:
    data = []
    while len(data) < steps:
        data += list(recipe.train_data())
    return data[:steps]


def _plain(recipe, data) -> None:
    import torch

    torch.manual_seed(0)
    model = recipe.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = sum(recipe.losses[t](out[t], y[t]) for t in recipe.tasks) / len(recipe.tasks)
        loss.backward()
        opt.step()


def _profile(recipe, data, every):
    import torch

    import recon

    torch.manual_seed(0)
    model = recipe.build_model()
    return recon.profile(model, data, recipe.losses, steps=len(data), every=every, batched=False)


def _overlap(full, sampled) -> tuple[int, float]:
    a, b = full.scores()["score"], sampled.scores()["score"]
    k = min(TOP, len(a))
    shared = len(set(a.index[:k]) & set(b.index[:k]))
    return shared, float(a.rank().corr(b.reindex(a.index).rank()))


def profile_rows(args) -> tuple[list[dict], object, object]:
    """Per K: plain, every=1 and every=auto; returns the rows and the K = 40 profile and recipe."""
    import recon

    rows, last = [], (None, None)
    for K in args.tasks:
        recipe = recon.load_recipe(ROOT / "examples" / RECIPES[K])
        data = _batches(recipe, args.steps)
        _plain(recipe, data[:2])  # warm-up: first calls of the kernels, allocator pools
        _profile(recipe, data[:1], 1)
        _, plain_s, plain_mem = _measure(lambda recipe=recipe, data=data: _plain(recipe, data))
        full, full_s, full_mem = _measure(lambda recipe=recipe, data=data: _profile(recipe, data, 1))
        auto, auto_s, auto_mem = _measure(lambda recipe=recipe, data=data: _profile(recipe, data, "auto"))
        shared, rho = _overlap(full, auto)
        n = len(data)
        rows.append({
            "K": K, "steps": n, "plain s/step": plain_s / n, "every=1 x plain": full_s / plain_s,
            "N (auto)": auto.every, "recorded": f"{auto.steps} of {auto.total_steps}",
            "every=auto x plain": auto_s / plain_s, "peak MB plain": plain_mem / 2**20,
            "peak MB every=1": full_mem / 2**20, "peak MB every=auto": auto_mem / 2**20,
            f"top-{min(TOP, len(full.layers))} overlap": shared, "score rho": rho,
        })  # fmt: skip
        print(rows[-1], flush=True)
        last = (full, recipe)
    return rows, *last


def _train_step(recipe, data, method: str, chunk: int | None) -> None:
    import torch

    import recon

    torch.manual_seed(0)
    model = recipe.build_model()
    recon.train(model, data, recipe.losses, method=method, epochs=1, task_chunk=chunk or "auto", batched=False)


def method_rows(args, recipe) -> list[dict]:
    """At K = 40: a training step per method, whole and in chunks, and the J memory each holds."""
    import torch

    data = _batches(recipe, args.method_steps)
    model = recipe.build_model()
    shared = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("heads."))
    K = len(recipe.tasks)
    _train_step(recipe, data[:1], "pcgrad", args.chunk)  # warm-up
    plain = _measure(lambda: _plain(recipe, data))[1]
    rows = []
    for method in ("mean", "pcgrad", "cagrad"):
        whole = _measure(lambda method=method: _train_step(recipe, data, method, K))[1]
        chunked = _measure(lambda method=method: _train_step(recipe, data, method, args.chunk))[1]
        rows.append({
            "method": method, "whole x plain": whole / plain, f"chunks of {args.chunk} x plain": chunked / plain,
            "chunked / whole": chunked / whole, "J MB whole": K * shared * 4 / 2**20,
            "J MB chunked": 2 * args.chunk * shared * 4 / 2**20,
        })  # fmt: skip
        print(rows[-1], flush=True)
    del torch
    return rows


def plan_row(profile, recipe) -> dict:
    import recon

    model = recipe.build_model()
    start = time.perf_counter()
    plan = recon.plan_split(profile, model, budget_params=0.1, groups="auto")
    seconds = time.perf_counter() - start
    copies = {layer: len(parts) for layer, parts in plan.groups.items()}
    return {"K": len(profile.tasks), "plan seconds (wall)": seconds, "branched layers": len(plan.layers),
            "copies per layer": ", ".join(f"{k}: {v}" for k, v in copies.items())}  # fmt: skip


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(v) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="profiled steps per K (every=auto needs > N)")
    parser.add_argument("--method-steps", type=int, default=4, help="training steps per method at K = 40")
    parser.add_argument("--chunk", type=int, default=10, help="tasks per chunk for the chunked methods")
    parser.add_argument("--batch", type=int, default=16, help="batch size (RECON_DIGITS_BATCH)")
    parser.add_argument("--quick", action="store_true", help="K = 2 and 10 only, no method or plan rows")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    args.tasks = (2, 10) if args.quick else (2, 10, 40)
    os.environ["RECON_DIGITS_BATCH"] = str(args.batch)
    os.environ.setdefault("RECON_DIGITS_TRAIN", str(max(args.steps, args.method_steps) * args.batch))
    sys.path.insert(0, str(ROOT / "examples"))
    import torch

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rows, profile40, recipe40 = profile_rows(args)
    text = [f"load average at start {load:.1f}; batch {args.batch}; CPU seconds, 1 thread", "", markdown(rows)]
    if not args.quick:
        text += ["", markdown(method_rows(args, recipe40)), "", markdown([plan_row(profile40, recipe40)])]
    out = "\n".join(text)
    print(out)
    if args.out is not None:
        args.out.write_text(out + "\n")


if __name__ == "__main__":
    main()
