"""Aggregation time per step of every gradient method, against torchjd and against the Gram floor.

For K tasks and P shared parameters, times ``method(J)`` on a random ``(K, P)`` float32 matrix, the torchjd
aggregator of the same name (when torchjd has one), and the K x K Gram product ``J @ J.T`` (the floor: every
Gram-based method must at least compute it). Also compares recon's CAGrad with the official SLSQP-based CAGrad
(same update, cosine > 0.9999), and GradDrop with its own floor: the Gram product plus ``torch.rand(P)``, the
one uniform number per coordinate the paper's algorithm draws (GradDrop needs no Gram matrix; the draw is what
it cannot avoid).

A last table times one whole ``recon.backward(losses, net, "pcgrad")`` step on an MLP trunk with K heads, its K
task gradients from K backward passes (sequential) or from one vectorised pass (``batched=True``), under
``--precision 32|bf16|fp16`` (autocast forward; fp16 with recon's loss scale), with the peak memory of one step:
``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the peak of the running sum of torch.profiler's memory
events (tracemalloc does not see torch's allocator, and the resident set hides reused pages).

    python benchmarks/methods.py            # K in {2, 4, 8, 16}, P in {1e5, 1e6}
    python benchmarks/methods.py --quick    # P = 1e5 only, fewer repeats
    python benchmarks/methods.py --markdown # a markdown table (for docs/benchmarks.md)
    python benchmarks/methods.py --precision bf16 --device cuda
    python benchmarks/methods.py --splits   # only: one training step, unsplit vs per-task vs group split

``--splits`` times one whole training step (forward, ``recon.backward``, SGD step) of a K=4 MLP trunk with four
heads, side by side: unsplit, the last two trunk layers split per task, and the same layers split by task groups
(``{[t0, t1], [t2, t3]}`` and ``{[t0, t1, t2], [t3]}``: three usage classes, each solved with the method on its
own group's tasks), for mean, pcgrad and cagrad; ratios to unsplit are medians of per-round ratios. The Python
function calls of one step (``sys.setprofile``) are counted too: a measure of the interpreter's work per step
that, unlike the times, the load of a shared machine does not disturb.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep torch.profiler's start/stop lines off the tables

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import recon.methods as M  # noqa: E402

TORCHJD = {
    "mean": lambda ta, K: ta.Mean(),
    "sum": lambda ta, K: ta.Sum(),
    "mgda": lambda ta, K: ta.MGDA(),
    "pcgrad": lambda ta, K: ta.PCGrad(),
    "graddrop": lambda ta, K: ta.GradDrop(),
    "cagrad": lambda ta, K: ta.CAGrad(c=0.4),
    "gradvac": lambda ta, K: ta.GradVac(),
    "imtl_g": lambda ta, K: ta.IMTLG(),
    "nashmtl": lambda ta, K: ta.NashMTL(n_tasks=K),
    "aligned_mtl": lambda ta, K: ta.AlignedMTL(),
    "upgrad": lambda ta, K: ta.UPGrad(),
}


def timed(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall times in milliseconds of each function, one per round, measured in rotating rounds.

    Each round runs every function once untimed (so that the thread pool it uses is awake: torch's
    matrix products and its element-wise kernels use different pools) and then once timed, in an order that
    rotates from round to round. Callers report the minimum over rounds (the time least disturbed by load from
    other processes) and, for ratios, the median of the per-round ratios (functions timed side by side, so a
    slow spell of the machine affects both).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[k]
            fn()
            t0 = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return samples


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a / b``."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def jacobian(K: int, P: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a common component plus per-task noise: some pairs conflict, some do not
    return torch.randn(1, P, generator=g) * 0.3 + torch.randn(K, P, generator=g)


def slsqp_cagrad(J: torch.Tensor, c: float = 0.4) -> torch.Tensor:
    """The official CAGrad update (Cranial-XIX/CAGrad, rescale=1): scipy SLSQP on the dual."""
    from scipy.optimize import minimize

    K = J.shape[0]
    GG = (J @ J.T).cpu().double().numpy()
    g0_norm = np.sqrt(GG.mean() + 1e-8)
    x0 = np.ones(K) / K
    b = x0.copy()
    cc = c * g0_norm + 1e-8

    def obj(x):
        return x @ GG @ b + cc * np.sqrt(x @ GG @ x + 1e-8)

    res = minimize(obj, x0, bounds=[(0, 1)] * K, constraints={"type": "eq", "fun": lambda x: 1 - x.sum()})
    w = torch.as_tensor(res.x, dtype=J.dtype)
    gw = w @ J
    return (J.mean(0) + (cc / (gw.norm() + 1e-8)) * gw) / (1 + c**2)


def run(Ks: list[int], Ps: list[int], reps: int, names: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    warnings.filterwarnings("ignore")
    try:
        import torchjd.aggregation as ta
    except ImportError:  # pragma: no cover
        ta = None
    rows = []
    for P in Ps:
        for K in Ks:
            J = jacobian(K, P)
            for name in names:
                fns: dict[str, Callable[[], object]] = {
                    "floor": lambda J=J: J @ J.T,
                    "recon": lambda m=M.get(name), J=J: m(J),
                }
                if ta is not None and name in TORCHJD:
                    fns["torchjd"] = lambda a=TORCHJD[name](ta, K), J=J: a(J)
                if name == "graddrop":
                    fns["draw"] = lambda P=P: torch.rand(P)
                torch.manual_seed(0)
                t = timed(fns, reps)
                rows.append(
                    {
                        "method": name,
                        "K": K,
                        "P": P,
                        "recon": min(t["recon"]),
                        "torchjd": min(t["torchjd"]) if "torchjd" in t else None,
                        "floor": min(t["floor"]),
                        "draw": min(t["draw"]) if "draw" in t else None,
                        "vs_torchjd": paired_ratio(t["recon"], t["torchjd"]) if "torchjd" in t else None,
                        "vs_floor": paired_ratio(t["recon"], t["floor"]),
                        "vs_draw": (
                            statistics.median(
                                r / (f + d) for r, f, d in zip(t["recon"], t["floor"], t["draw"], strict=True)
                            )
                            if "draw" in t
                            else None
                        ),
                    }
                )
    cagrad_rows = []
    for K in Ks:
        J = jacobian(K, Ps[0], seed=1)
        ours_fn = M.get("cagrad")
        t = timed({"recon": lambda J=J, m=ours_fn: m(J), "scipy": lambda J=J: slsqp_cagrad(J)}, reps)
        ours, scipy_t = min(t["recon"]), min(t["scipy"])
        a, b = ours_fn(J).double(), slsqp_cagrad(J).double()
        cos = float(a @ b / (a.norm() * b.norm()))
        cagrad_rows.append({"K": K, "P": Ps[0], "recon": ours, "scipy": scipy_t, "cos": cos})
    graddrop_rows = [r for r in rows if r["draw"] is not None]
    return rows, cagrad_rows, graddrop_rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak extra memory of one call of ``fn``, MiB: the CUDA allocator's peak, or on the CPU the peak of the
    running sum of torch.profiler's memory events (each operator's net allocation, and frees), so a
    transient buffer counts even when the allocator reuses freed pages."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    timeline = []
    for e in prof.events():
        m = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if m:
            timeline.append((e.time_range.start, m))
    run = peak = 0
    for _, m in sorted(timeline):
        run += m
        peak = max(peak, run)
    return peak / 2**20


def step_rows(Ks: list[int], reps: int, precision: str, device: torch.device) -> list[dict]:
    """One ``recon.backward`` PCGrad step, sequential vs batched task gradients, at ``precision``."""
    return [_step_row(K, reps, precision, device) for K in Ks]


def _step_row(K: int, reps: int, precision: str, device: torch.device, width: int = 1024) -> dict:
    import torch.nn.functional as F

    import recon
    from recon._precision import Precision

    torch.manual_seed(0)
    trunk = torch.nn.Sequential(
        torch.nn.Linear(256, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU()
    ).to(device)
    heads = torch.nn.ModuleList(torch.nn.Linear(width, 10) for _ in range(K)).to(device)
    params = [*trunk.parameters(), *heads.parameters()]
    x = torch.randn(64, 256, device=device)
    ys = torch.randint(0, 10, (K, 64), device=device)
    amp = Precision(precision, device_type=device.type)
    shared = None

    def step(batched: bool) -> None:
        nonlocal shared
        for p in params:
            p.grad = None
        with amp.autocast():
            z = trunk(x)
            losses = {f"t{k}": F.cross_entropy(heads[k](z).float(), ys[k]) for k in range(K)}
        scale = amp if amp.scaling else None
        shared = recon.backward(losses, params, "pcgrad", shared=shared, batched=batched, precision=scale).shared
        _sync(device)

    fns = {"sequential": lambda: step(False), "batched": lambda: step(True)}
    t = timed(fns, reps)
    return {
        "K": K,
        "P": sum(p.numel() for p in trunk.parameters()),
        "sequential": min(t["sequential"]),
        "batched": min(t["batched"]),
        "ratio": paired_ratio(t["batched"], t["sequential"]),
        "mem_seq": _peak_mib(fns["sequential"], device),
        "mem_batched": _peak_mib(fns["batched"], device),
    }


SPLIT_LAYERS = ("trunk.4", "trunk.6")
SPLIT_GROUPS = {"trunk.4": [["t0", "t1"], ["t2", "t3"]], "trunk.6": [["t0", "t1", "t2"], ["t3"]]}


def split_rows(methods: list[str], reps: int, widths: tuple[int, ...] = (16, 256)) -> list[dict]:
    """:func:`_split_rows` for each trunk width (16: a step is mostly Python; 256: mostly arithmetic)."""
    return [row for width in widths for row in _split_rows(methods, reps, width)]


def _split_rows(methods: list[str], reps: int, width: int, K: int = 4) -> list[dict]:
    """One training step (forward, ``recon.backward`` with the shared set of the first step, as the training
    engine does, SGD step) of an unsplit, a per-task split and a group split MLP, side by side per method."""
    import torch.nn.functional as F

    import recon

    tasks = [f"t{k}" for k in range(K)]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers = [torch.nn.Linear(32, width), torch.nn.ReLU()]
            for _ in range(3):
                layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
            self.trunk = torch.nn.Sequential(*layers)
            self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(width, 10) for t in tasks})

        def forward(self, x):
            z = self.trunk(x)
            return {t: h(z) for t, h in self.heads.items()}

    torch.manual_seed(0)
    model = Net()
    nets = {
        "unsplit": model,
        "per-task": recon.split(model, list(SPLIT_LAYERS), init="copy"),
        "groups": recon.split(model, SPLIT_GROUPS, init="copy"),
    }
    x = torch.randn(64, 32)
    ys = {t: torch.randint(0, 10, (64,)) for t in tasks}
    rows = []
    for name in methods:
        fns = {}
        for label, net in nets.items():
            method = M.get(name)
            opt = torch.optim.SGD(net.parameters(), lr=1e-3)
            shared: dict[str, tuple] = {}

            def step(net=net, method=method, opt=opt, shared=shared) -> None:
                opt.zero_grad(set_to_none=True)
                out = net(x)
                losses = {t: F.cross_entropy(out[t], ys[t]) for t in tasks}
                shared["p"] = recon.backward(losses, net, method, shared=shared.get("p")).shared
                opt.step()

            fns[label] = step
        t = timed(fns, reps)
        row = {"method": name, "width": width, **{k: min(v) for k, v in t.items()}}
        row["calls"] = {k: _python_calls(fn) for k, fn in fns.items()}
        row |= {f"{k}/unsplit": paired_ratio(t[k], t["unsplit"]) for k in ("per-task", "groups")}
        row["groups/per-task"] = paired_ratio(t["groups"], t["per-task"])
        row["params"] = {k: sum(p.numel() for p in n.parameters()) for k, n in nets.items()}
        rows.append(row)
    return rows


def _python_calls(fn: Callable[[], object]) -> int:
    """Python function calls in one run of ``fn`` (``sys.setprofile``): the interpreter's work per step, a count
    that the machine's load does not change."""
    count = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal count
        if event == "call":
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def report_splits(rows: list[dict], markdown: bool) -> None:
    params = {r["width"]: r["params"] for r in rows}
    sizes = "; ".join(f"width {w}: " + ", ".join(f"{k} {v:,}" for k, v in p.items()) for w, p in params.items())
    title = f"one training step, K=4 (ms: best of rounds; ratios: median of per-round ratios); parameters: {sizes}"
    header, table = _table(
        rows,
        [
            ("method", lambda r: r["method"]),
            ("width", lambda r: str(r["width"])),
            ("unsplit ms", lambda r: _fmt(r["unsplit"], 3)),
            ("per-task ms", lambda r: _fmt(r["per-task"], 3)),
            ("groups ms", lambda r: _fmt(r["groups"], 3)),
            ("per-task/unsplit", lambda r: _fmt(r["per-task/unsplit"])),
            ("groups/unsplit", lambda r: _fmt(r["groups/unsplit"])),
            ("groups/per-task", lambda r: _fmt(r["groups/per-task"])),
            ("Python calls unsplit / per-task / groups", lambda r: " / ".join(str(v) for v in r["calls"].values())),
        ],
    )
    _print_tables([(title, header, table)], markdown)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


Column = tuple[str, Callable[[dict], str]]
K_AND_P: list[Column] = [("K", lambda r: str(r["K"])), ("P", lambda r: f"{r['P']:.0e}")]


def _table(records: list[dict], columns: list[Column]) -> tuple[list[str], list[list[str]]]:
    return [name for name, _ in columns], [[cell(r) for _, cell in columns] for r in records]


def report(
    rows: list[dict], cagrad_rows: list[dict], graddrop_rows: list[dict], markdown: bool, steps: tuple = ()
) -> None:
    header, table = _table(
        rows,
        [("method", lambda r: r["method"]), *K_AND_P]
        + [
            ("recon ms", lambda r: _fmt(r["recon"], 3)),
            ("torchjd ms", lambda r: _fmt(r["torchjd"], 3)),
            ("J@J.T ms", lambda r: _fmt(r["floor"], 3)),
            ("recon/torchjd", lambda r: _fmt(r["vs_torchjd"])),
            ("recon/floor", lambda r: _fmt(r["vs_floor"])),
        ],
    )
    header2, table2 = _table(
        cagrad_rows,
        [
            *K_AND_P,
            ("recon cagrad ms", lambda r: _fmt(r["recon"], 3)),
            ("scipy SLSQP cagrad ms", lambda r: _fmt(r["scipy"], 3)),
            ("speed-up", lambda r: f"{r['scipy'] / r['recon']:.1f}x"),
            ("cosine", lambda r: f"{r['cos']:.7f}"),
        ],
    )
    header3, table3 = _table(
        graddrop_rows,
        [
            *K_AND_P,
            ("graddrop ms", lambda r: _fmt(r["recon"], 3)),
            ("J@J.T ms", lambda r: _fmt(r["floor"], 3)),
            ("rand(P) ms", lambda r: _fmt(r["draw"], 3)),
            ("graddrop/floor", lambda r: _fmt(r["vs_floor"])),
            ("graddrop/(J@J.T + rand(P))", lambda r: _fmt(r["vs_draw"])),
        ],
    )
    tables = [
        ("aggregation time per step (ms: best of rounds; ratios: median of per-round ratios)", header, table),
        ("CAGrad: recon vs the official SLSQP solver", header2, table2),
    ]
    if table3:
        tables.append(("GradDrop against the Gram product plus its P uniform draws", header3, table3))
    if steps:
        step_list, title = steps
        header4, table4 = _table(
            step_list,
            [
                ("K", lambda r: str(r["K"])),
                ("shared P", lambda r: f"{r['P']:.1e}"),
                ("sequential ms", lambda r: _fmt(r["sequential"], 3)),
                ("batched ms", lambda r: _fmt(r["batched"], 3)),
                ("batched/sequential", lambda r: _fmt(r["ratio"])),
                ("sequential peak MiB", lambda r: _fmt(r["mem_seq"], 1)),
                ("batched peak MiB", lambda r: _fmt(r["mem_batched"], 1)),
            ],
        )
        tables.append((title, header4, table4))
    _print_tables(tables, markdown)


def _print_tables(tables: list[tuple[str, list[str], list[list[str]]]], markdown: bool) -> None:
    if markdown:
        for title, h, t in tables:
            print(f"**{title}**\n")
            print("| " + " | ".join(h) + " |")
            print("|" + "|".join(" --- " for _ in h) + "|")
            for row in t:
                print("| " + " | ".join(row) + " |")
            print()
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, h, t in tables:
        tab = Table(title=title)
        for col in h:
            tab.add_column(col, justify="right" if col not in ("method",) else "left")
        for row in t:
            tab.add_row(*row)
        console.print(tab)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="P = 1e5 only and fewer repeats")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats per measurement (best of repeats)")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all gradient ones)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--tasks", default="2,4,8,16", help="comma-separated numbers of tasks K (default 2,4,8,16)")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "fp16"], help="of the step table")
    parser.add_argument("--device", default="cpu", help="device of the step table (cpu or cuda)")
    parser.add_argument("--no-step", action="store_true", help="skip the whole-step table")
    parser.add_argument("--splits", action="store_true", help="only the unsplit / per-task / group split step table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.splits:
        names = args.methods.split(",") if args.methods else ["mean", "pcgrad", "cagrad"]
        report_splits(split_rows(names, args.reps or 15), args.markdown)
        return
    Ks = [int(k) for k in args.tasks.split(",")]
    Ps = [100_000] if args.quick else [100_000, 1_000_000]
    reps = args.reps or (5 if args.quick else 9)
    names = args.methods.split(",") if args.methods else [n for n, i in M.REGISTRY.items() if i.kind == "gradient"]
    steps = ()
    if not args.no_step:
        device = torch.device(args.device)
        title = (
            f"one recon.backward PCGrad step, sequential vs batched task gradients, precision {args.precision}, "
            f"{device} (ms: best of rounds; peak: {'CUDA allocator' if device.type == 'cuda' else 'torch.profiler'})"
        )
        steps = (step_rows(Ks, reps, args.precision, device), title)
    report(*run(Ks, Ps, reps, names), markdown=args.markdown, steps=steps)


if __name__ == "__main__":
    main()
