"""How much does recording layer-wise conflicts cost? recon's profiler against the floor and the official code.

In one run, on the same ResNet-18-size multi-task model (K linear heads on a shared trunk, BatchNorm) and the same
batches, for each number of tasks K:

  (a) joint   a plain joint training step: forward, backward of the sum of the task losses, Adam step;
  (b) floor   one forward plus K separate ``torch.autograd.grad`` passes that only compute (and keep) the task
              gradients: what any exact per-task profiler must pay, with no update;
  (c) naive   a reference profiler written from the official Recon code (``models/recon_model.py``): K
              ``backward(retain_graph=True)``, a per-parameter ``.grad.clone()`` into a (P, K) matrix and into
              per-parameter lists, per-layer ``torch.cat``, a Python double loop over task pairs computing
              cosines with ``F.normalize``, one ``.cpu()`` per layer per step, then the joint update (written back
              with a clone per parameter) and an Adam step;
  (d) recon   ``recon.profile(model, batches, losses, steps=..., optimizer=adam)``: its whole loop body, nothing
              subtracted (forward, the finite-loss check, K gradient passes, cosines, recording, the joint
              update, the Adam step). Per-step times come from timestamps taken as the profiler pulls each
              batch from the data iterator; the first step of each call (one-off layer set-up) and the call's
              fixed cost (torch.fx tracing, result files) are reported separately, not hidden.
  (e) batched (``--batched``, default on CUDA) one forward and ONE ``torch.autograd.grad(...,
              is_grads_batched=True)`` over the K losses: a batched floor, to see whether it beats (b).
  (f) recon batched (with ``--batched``) ``recon.profile(..., batched=True)``: (d) with the K task gradients
              from one vectorised backward pass (:func:`recon._backward.task_gradients`).

``--precision 32|bf16|fp16`` runs every variant's forward and losses under ``torch.autocast`` (recon's
``Precision``; (d)/(f) get ``precision=``, fp16 with recon's loss scale): on the CPU bf16 autocast exists,
fp16 autocast on the CPU exists in torch 2.13 but is not a fast path.

Variants alternate in interleaved rounds (the order rotates each round) and the table shows medians over rounds;
ratios are medians of the per-round ratios (paired within a round). Inside (d), the cosine kernel, the joint update
and the Adam step are timed in place; ``d - Adam`` (d minus its own Adam step, same run) is printed separately and
labelled: (d) pays for a training update that (b) does not.

Peak memory is measured in a fresh subprocess per (variant, K): after building the model, the batches and the
optimizer, the process's peak-RSS mark is reset (Linux ``/proc/self/clear_refs`` with ``5``, falling back to
``ru_maxrss``) and the figure reported is ``VmHWM - RSS at reset`` after a few steps, i.e. the extra resident
memory the steps needed at their peak (gradients, autograd buffers, optimizer state, allocator slack). On CUDA
it is ``torch.cuda.max_memory_allocated`` above the allocation at reset. ``d - Adam state`` subtracts the exact
size of Adam's two state buffers (8 bytes per parameter), which (b) never allocates; (a) is shown for context.

On a shared machine, ``--threads 1 --clock cpu`` (process CPU time of a single-threaded run) is far less
sensitive to other processes than wall time with several OpenMP threads; the run warns when the load average
says the CPU was shared. ``--device cuda`` (timed with synchronisation, memory from the CUDA allocator) also
times (e).

    python benchmarks/profile_overhead.py              # K = 2, 4, 8; a few minutes on 2 idle CPU cores
    python benchmarks/profile_overhead.py --quick      # smoke run: K = 2, 4, two rounds
    python benchmarks/profile_overhead.py --threads 1 --clock cpu --repeats 7
    python benchmarks/profile_overhead.py --device cuda --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import recon  # noqa: E402
import recon._gram as recon_gram_module  # noqa: E402
import recon._loop as recon_loop_module  # noqa: E402
from benchmarks._resnet import make_batches, make_losses, multitask_resnet  # noqa: E402

VARIANTS = {
    "a": "joint step",
    "b": "floor (fwd + K grads)",
    "c": "naive official profiler",
    "d": "recon.profile",
    "e": "batched floor (is_grads_batched)",
    "f": "recon.profile batched",
}
PRECISION = "32"  # set from --precision


def amp(device: torch.device):
    """The forward's autocast context for ``--precision`` (recon's own, so every variant runs the same)."""
    from recon._precision import Precision

    return Precision(PRECISION, device_type=device.type).autocast()


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock: Callable[[], float] = time.perf_counter  # set from --clock


# --- the variants --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def joint_step(model: nn.Module, opt: torch.optim.Optimizer, batch, losses) -> None:
    """(a) forward, sum of task losses, backward, Adam step."""
    x, y = batch
    with amp(x.device):
        out = model(x)
        loss = sum(fn(out[t], y[t]) for t, fn in losses.items())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def floor_step(model: nn.Module, params: list[nn.Parameter], batch, losses) -> list:
    """(b) one forward and K ``autograd.grad`` passes; the K gradient lists are returned (kept) to the caller."""
    x, y = batch
    with amp(x.device):
        out = model(x)
        values = [fn(out[t], y[t]) for t, fn in losses.items()]
    K = len(values)
    return [torch.autograd.grad(v, params, retain_graph=k < K - 1, allow_unused=True) for k, v in enumerate(values)]


def batched_floor_step(model: nn.Module, params: list[nn.Parameter], batch, losses) -> tuple:
    """(e) one forward and one vmapped backward over the K losses (``is_grads_batched=True``)."""
    x, y = batch
    with amp(x.device):
        out = model(x)
        values = torch.stack([fn(out[t], y[t]).float() for t, fn in losses.items()])
    eye = torch.eye(len(values), device=values.device, dtype=values.dtype)
    return torch.autograd.grad(values, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)


def _cos(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:  # official utils/common.py: cos
    return (F.normalize(t1, dim=0) * F.normalize(t2, dim=0)).sum(dim=0)


def _pair_cos(pair: torch.Tensor) -> torch.Tensor:  # official utils/common.py: pair_cos (Python double loop)
    n = pair.size(0)
    values = []
    for i in range(n - 1):
        for j in range(i + 1, n):
            values.append(_cos(pair[i], pair[j]))
    return torch.stack(values).view(-1)


class NaiveProfiler:
    """(c) The official Recon profiling step (``models/base_model.py`` + ``models/recon_model.py``), baseline
    sub-method: shared parameters are the trunk (everything but the heads)."""

    def __init__(self, model: nn.Module, tasks: list[str]) -> None:
        self.model = model
        self.tasks = tasks
        self.shared = [(n, p) for n, p in model.named_parameters() if not n.startswith("heads.")]
        self.grad_dims = [p.numel() for _, p in self.shared]
        self.layers: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(self.shared):
            layer = name.replace(".weight", "").replace(".bias", "")
            self.layers.setdefault(layer, []).append(i)
        self.layer_wise_angle: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}

    def _grad2vec(self, grads: torch.Tensor, task_id: int) -> None:
        grads[:, task_id].fill_(0.0)
        for cnt, (_, p) in enumerate(self.shared):
            if p.grad is not None:
                grad_cur = p.grad.data.detach().clone()
                beg = 0 if cnt == 0 else sum(self.grad_dims[:cnt])
                en = sum(self.grad_dims[: cnt + 1])
                grads[beg:en, task_id].copy_(grad_cur.data.view(-1))

    def step(self, opt: torch.optim.Optimizer, batch, losses) -> None:
        x, y = batch
        K = len(self.tasks)
        dev = next(self.model.parameters()).device
        grads = torch.zeros(sum(self.grad_dims), K, device=dev)  # initilize_grads
        with amp(x.device):
            out = self.model(x)
            values = {t: losses[t](out[t], y[t]) for t in self.tasks}
        opt.zero_grad()
        grad_all = []
        for i, t in enumerate(self.tasks):
            values[t].backward(retain_graph=True)  # the official code retains the graph for every task
            self._grad2vec(grads, i)
            grad_list = [p.grad.data.detach().clone().view(-1) for _, p in self.shared if p.grad is not None]
            grad_all.append([torch.cat([grad_list[j] for j in idx]) for idx in self.layers.values()])
            for _, p in self.shared:  # zero_grad_shared_modules (set_to_none, torch >= 2)
                p.grad = None
        g = torch.sum(grads, dim=1) / K
        for i, name in enumerate(self.layers):
            pair = torch.stack([grad_all[k][i] for k in range(K)])
            self.layer_wise_angle[name].append(_pair_cos(pair).cpu())
        newgrad = g * K  # overwrite_grad: "to match the sum loss"
        for cnt, (_, p) in enumerate(self.shared):
            beg = 0 if cnt == 0 else sum(self.grad_dims[:cnt])
            en = sum(self.grad_dims[: cnt + 1])
            p.grad = newgrad[beg:en].contiguous().view(p.data.size()).data.clone()
        opt.step()


def _probe_targets() -> list[tuple[object, str, str]]:
    """Where the profiler's step looks up its cosine kernel and its update (the step engine, recon._loop)."""
    return [
        (recon_gram_module.LayerCosines, "__call__", "cosines"),
        (recon_loop_module, "apply_task_gradients", "update"),
    ]


class ReconRunner:
    """(d) ``recon.profile`` on a persistent model and optimizer; per-step times from batch-pull timestamps.

    While it runs, three pieces of the profiler's step are timed in place (time only, results untouched): the
    cosine kernel ``LayerCosines``, the joint update (``apply_task_gradients``) and the optimizer step. On CUDA
    each probe synchronises, which slightly perturbs (d)'s pipelining; on the CPU it costs two clock reads.
    """

    PROBES = ("cosines", "update", "adam")

    def __init__(
        self, model: nn.Module, opt: torch.optim.Optimizer, losses, device: torch.device, batched: bool = False
    ) -> None:
        self.model, self.opt, self.losses, self.device = model, opt, losses, device
        self.batched = batched
        self.probe_times: dict[str, list[float]] = {k: [] for k in self.PROBES}
        opt.step = self._timed(opt.step, "adam")  # type: ignore[method-assign]

    def _timed(self, fn: Callable, probe: str) -> Callable:
        device, sink = self.device, self.probe_times[probe]

        def wrapper(*args, **kwargs):
            sync(device)
            t0 = clock()
            out = fn(*args, **kwargs)
            sync(device)
            sink.append(clock() - t0)
            return out

        return wrapper

    def _probe(self, owner: object, name: str, probe: str) -> tuple[object, str, Callable]:
        original = getattr(owner, name)
        setattr(owner, name, self._timed(original, probe))
        return owner, name, original

    def run(self, batches: list, start: int, steps: int) -> tuple[list[float], float, dict[str, list[float]]]:
        """Run ``recon.profile`` for ``1 + steps`` steps. Returns the last ``steps`` step times, the call's fixed
        cost (the whole call minus all its steps, the first included) and the probes' times for those steps."""
        stamps: list[float] = []
        device = self.device

        def feed() -> Iterator:  # endless: recon.profile stops after `steps`, pulling one batch more
            i = start
            while True:
                sync(device)
                stamps.append(clock())
                yield batches[i % len(batches)]
                i += 1

        for sink in self.probe_times.values():
            sink.clear()
        restore = [self._probe(owner, name, probe) for owner, name, probe in _probe_targets()]
        try:
            t0 = clock()
            recon.profile(
                self.model, feed(), self.losses, steps=steps + 1, optimizer=self.opt, device=device,
                precision=PRECISION, batched=self.batched,
            )  # fmt: skip
            total = clock() - t0
        finally:
            for owner, name, original in restore:
                setattr(owner, name, original)
        times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=False)]
        probes = {k: v[1 : steps + 1] or [float("nan")] for k, v in self.probe_times.items()}
        return times[1 : steps + 1], total - sum(times[: steps + 1]), probes


# --- timing --------------------------------------------------------------------------------------------------
def build(args, K: int, device: torch.device):
    torch.manual_seed(args.seed)
    base = multitask_resnet(args.depth, K, stem=args.stem)
    batches = make_batches(args.batches, K, batch=args.batch, image=args.image, seed=args.seed, device=device)
    return base.to(device), batches, make_losses(K)


def adam(model: nn.Module, kind: str = "default") -> torch.optim.Optimizer:
    """Adam(lr=1e-3) as recon.profile builds it by default, or torch's fused kernel (``--adam fused``)."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True if kind == "fused" else None)


def time_k(args, K: int, device: torch.device) -> dict:
    base, batches, losses = build(args, K, device)
    tasks = list(losses)
    variants = ["a", "b", "c", "d"] + (["e", "f"] if args.batched else [])
    models = {v: copy.deepcopy(base) for v in variants}
    opts = {v: adam(models[v], args.adam) for v in ("a", "c", "d", "f") if v in models}
    params = {v: list(models[v].parameters()) for v in ("b", "e") if v in models}
    naive = NaiveProfiler(models["c"], tasks)
    runner = ReconRunner(models["d"], opts["d"], losses, device)
    runners = {"d": runner}
    if "f" in models:
        runners["f"] = ReconRunner(models["f"], opts["f"], losses, device, batched=True)
    cursor = dict.fromkeys(variants, 0)
    fixed_costs: list[float] = []  # per recon.profile call: the call minus its steps
    probes: dict[str, float] = {}  # the latest (d) call's probes, per-step medians

    def timed(fn: Callable[[], object]) -> float:
        sync(device)
        t0 = clock()
        kept = fn()  # (b) and (e) keep their K gradients until timed
        sync(device)
        dt = clock() - t0
        del kept
        return dt

    def run(v: str, n: int) -> list[float]:
        if v in runners:
            times, fixed, got = runners[v].run(batches, cursor[v], n)
            cursor[v] += n + 1
            if v == "d":
                fixed_costs.append(fixed)
                probes.update({k: statistics.median(t) for k, t in got.items()})
            return times
        out = []
        for _ in range(n):
            batch = batches[cursor[v] % len(batches)]
            cursor[v] += 1
            if v == "a":
                out.append(timed(lambda b=batch: joint_step(models["a"], opts["a"], b, losses)))
            elif v == "b":
                out.append(timed(lambda b=batch: floor_step(models["b"], params["b"], b, losses)))
            elif v == "c":
                out.append(timed(lambda b=batch: naive.step(opts["c"], b, losses)))
            else:
                out.append(timed(lambda b=batch: batched_floor_step(models["e"], params["e"], b, losses)))
        return out

    for v in variants:  # warm-up: allocator, Adam state, one-off set-up
        run(v, 1)
    fixed_costs.clear()
    rounds: list[dict[str, float]] = []
    for r in range(args.repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        row = {}
        for v in order:
            row[v] = statistics.median(run(v, args.steps))
        row.update({f"d.{k}": t for k, t in probes.items()})
        rounds.append(row)
        if args.verbose:
            print(f"  K={K} round {r + 1}: " + "  ".join(f"{v}={row[v] * 1e3:.0f}ms" for v in variants), flush=True)

    def med(key: str) -> float:
        return statistics.median(row[key] for row in rounds)

    def ratio(num: Callable[[dict], float], den: str) -> float:
        return statistics.median(num(row) / row[den] for row in rounds)

    res = {
        "K": K,
        "ms": {v: med(v) * 1e3 for v in variants},
        "ratio": {
            "d/b": ratio(lambda r: r["d"], "b"),
            "d/c": ratio(lambda r: r["d"], "c"),
            "a/b": ratio(lambda r: r["a"], "b"),
            "(d-adam)/b": ratio(lambda r: r["d"] - r["d.adam"], "b"),
        },
        "inside_d_ms": {k: med(f"d.{k}") * 1e3 for k in ReconRunner.PROBES},
        "d_minus_adam_ms": statistics.median(row["d"] - row["d.adam"] for row in rounds) * 1e3,
        "d_call_fixed_ms": statistics.median(fixed_costs) * 1e3,
        "rounds": rounds,
    }
    if "e" in variants:
        res["ratio"]["e/b"] = ratio(lambda r: r["e"], "b")
        res["ratio"]["f/b"] = ratio(lambda r: r["f"], "b")
        res["ratio"]["f/d"] = ratio(lambda r: r["f"], "d")
    return res


# --- memory --------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(args) -> None:
    """Runs in a fresh process: peak extra memory of ``args.mem_child`` over ``args.mem_steps`` steps."""
    device = torch.device(args.device)
    K = args.mem_k
    model, batches, losses = build(args, K, device)
    params = list(model.parameters())
    v = args.mem_child
    opt = adam(model, args.adam) if v in ("a", "c", "d", "f") else None
    naive = NaiveProfiler(model, list(losses)) if v == "c" else None
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        how = "cuda max_memory_allocated"
    else:
        base = _rss_bytes()
        how = "VmHWM after clear_refs" if _reset_hwm() else "ru_maxrss (no reset)"
    n = args.mem_steps
    if v in ("d", "f"):
        recon.profile(
            model, batches[:n], losses, steps=n, optimizer=opt, device=device, precision=PRECISION, batched=v == "f"
        )
    for i in range(n if v not in ("d", "f") else 0):
        batch = batches[i % len(batches)]
        if v == "a":
            joint_step(model, opt, batch, losses)
        elif v == "b":
            kept = floor_step(model, params, batch, losses)
            del kept
        elif v == "c":
            naive.step(opt, batch, losses)
        else:
            kept = batched_floor_step(model, params, batch, losses)
            del kept
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _hwm_bytes() if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_extra_bytes": peak - base, "how": how}))


def measure_memory(args, v: str, K: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--mem-child",
        v,
        "--mem-k",
        str(K),
        "--mem-steps",
        str(args.mem_steps),
        "--device",
        args.device,
        "--depth",
        str(args.depth),
        "--stem",
        args.stem,
        "--batch",
        str(args.batch),
        "--image",
        str(args.image),
        "--batches",
        str(args.batches),
        "--seed",
        str(args.seed),
        "--adam",
        args.adam,
        "--threads",
        str(torch.get_num_threads()),
        "--precision",
        PRECISION,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run {v} K={K} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- report --------------------------------------------------------------------------------------------------
def print_tables(args, results: list[dict], memory: dict, device: torch.device, n_params: int) -> None:
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print()
    print(
        f"ResNet-{args.depth} ({args.stem} stem, {n_params / 1e6:.1f}M trunk params), batch {args.batch} x "
        f"{args.image}x{args.image}, device {device}, torch {torch.__version__}, threads {threads}; "
        f"Adam {args.adam}, {args.clock} clock; median of {args.repeats} interleaved rounds x {args.steps} "
        f"step(s); ratios: median of per-round ratios; precision {PRECISION}"
    )
    has_e = any("e" in r["ms"] for r in results)
    head = "| K | (a) joint ms | (b) floor ms | (c) naive ms | (d) recon ms | d/b | d/c | a/b |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if has_e:
        head += " (e) batched floor ms | e/b | (f) recon batched ms | f/b | f/d |"
        sep += "---:|---:|---:|---:|---:|"
    print(head)
    print(sep)
    for r in results:
        ms, ra = r["ms"], r["ratio"]
        line = (
            f"| {r['K']} | {ms['a']:.0f} | {ms['b']:.0f} | {ms['c']:.0f} | {ms['d']:.0f} | "
            f"{ra['d/b']:.3f} | {ra['d/c']:.3f} | {ra['a/b']:.3f} |"
        )
        if has_e:
            line += f" {ms['e']:.0f} | {ra['e/b']:.3f} | {ms['f']:.0f} | {ra['f/b']:.3f} | {ra['f/d']:.3f} |"
        print(line)
    print()
    print("Inside (d), timed in place in the same run (already included in (d) above, nothing subtracted there):")
    print("| K | layer cosines ms | joint update ms | Adam step ms | d - Adam ms | (d - Adam)/b | per-call fixed ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ins = r["inside_d_ms"]
        print(
            f"| {r['K']} | {ins['cosines']:.1f} | {ins['update']:.1f} | {ins['adam']:.1f} | "
            f"{r['d_minus_adam_ms']:.0f} | {r['ratio']['(d-adam)/b']:.3f} | {r['d_call_fixed_ms']:.0f} |"
        )
    if memory:
        how = next(iter(memory.values()))["how"]
        print()
        print(
            f"Peak extra memory over {args.mem_steps} steps, median of {args.mem_repeats} fresh processes ({how}); MiB:"
        )
        print(
            "| K | (a) joint | (b) floor | (d) recon | d/b | Adam state | (d - Adam state)/b "
            "| (e) batched floor | (f) recon batched |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            K = r["K"]
            got = {v: memory[(v, K)]["peak_extra_bytes"] / 2**20 for v in "abdef" if (v, K) in memory}
            if "b" not in got or "d" not in got:
                continue
            adam_state = 2 * 4 * r["n_params_all"] / 2**20  # exp_avg + exp_avg_sq, float32
            a, e, f = (f"{got[v]:.0f}" if v in got else "-" for v in "aef")
            b, d = got["b"], got["d"]
            print(
                f"| {K} | {a} | {b:.0f} | {d:.0f} | {d / b:.3f} | {adam_state:.0f} | {(d - adam_state) / b:.3f} "
                f"| {e} | {f} |"
            )


def load_warning(device: torch.device) -> str | None:
    """A line when other processes compete for the CPU (the figures are then noisier, not invalid)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if device.type == "cpu" and load > 1.25 * cores:
        return f"warning: 1-minute load average {load:.1f} on {cores} cores: other processes share the CPU"
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: K = 2, 4; 2 rounds; 2 memory steps")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; 2 with --quick)")
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round (default 1)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of tasks (default 2 4 8)")
    p.add_argument("--depth", type=int, default=18, help="ResNet depth: 18 (default), 34, 50, ...")
    p.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="distinct batches, cycled (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall (default) or cpu: process CPU time, robust to other processes on a shared machine when used "
        "with --threads 1 (with more threads it also counts OpenMP spin-waiting)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--adam", default="default", choices=["default", "fused"], help="Adam kernel of (a), (c), (d) and memory runs"
    )
    p.add_argument(
        "--batched", action="store_true", help="also time (e), the is_grads_batched floor (on by default on CUDA)"
    )
    p.add_argument("--precision", default="32", choices=["32", "bf16", "fp16"], help="autocast of every variant")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--mem-steps", type=int, default=3)
    p.add_argument("--mem-repeats", type=int, default=3, help="fresh processes per memory figure (median; default 3)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--verbose", action="store_true", help="print every round")
    p.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mem-k", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global clock, PRECISION
    clock = CLOCKS[args.clock]
    PRECISION = args.precision
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child:
        memory_child(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is available")
        args.batched = True
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.ks = args.ks or ([2, 4] if args.quick else [2, 4, 8])
    if args.quick:
        args.mem_steps = min(args.mem_steps, 2)
        args.mem_repeats = 1

    results, memory = [], {}
    probe = multitask_resnet(args.depth, 2, stem=args.stem)
    n_params = sum(p.numel() for p in probe.shared_parameters())
    t_start = time.perf_counter()
    warnings = [w for w in [load_warning(device)] if w]
    for K in args.ks:
        res = time_k(args, K, device)
        res["n_params_all"] = sum(p.numel() for p in multitask_resnet(args.depth, K, stem=args.stem).parameters())
        results.append(res)
        if args.verbose:
            print(f"K={K}: " + json.dumps({k: v for k, v in res.items() if k != "rounds"}))
        if not args.no_memory:  # interleaved fresh processes; the median damps allocator and page-cache noise
            runs: dict[str, list[dict]] = {v: [] for v in ("a", "b", "d", *(("e", "f") if args.batched else ()))}
            for _ in range(args.mem_repeats):
                for v in runs:
                    runs[v].append(measure_memory(args, v, K))
            for v, rs in runs.items():
                memory[(v, K)] = {**rs[0], "peak_extra_bytes": statistics.median(r["peak_extra_bytes"] for r in rs)}
    warnings += [w for w in [load_warning(device)] if w]
    print_tables(args, results, memory, device, n_params)
    for w in dict.fromkeys(warnings):
        print(w)
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "results": results,
                    "memory": {f"{v}{K}": m for (v, K), m in memory.items()},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
