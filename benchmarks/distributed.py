"""Steps per second of profiling and of PCGrad training with 1 and 2 processes (gloo on CPU, NCCL on GPUs),
and the share of step time spent in communication (the all-reduces of ``recon._distributed``).

With ``--data loader`` (default) the data is a ``DataLoader`` and each process loads only its shard of every
global batch (recon rebuilds the loader); with ``--data list`` every process reads the whole global batch and
keeps its slice. Either way each process computes half the batch with 2 processes: the ideal speed-up is 2x,
minus communication (K x parameters per step) and per-step overheads. ``profile batched`` is the profiler with
the K task gradients from one vectorised backward (``batched=True``); ``--precision`` runs every job under
autocast. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the peak resident set (VmHWM) of
rank 0's whole process, torch included. The last table times one all-reduce of the step's gradients (J of
K x P, plus small task-specific tensors) the way recon does it now (J in place, small tensors in 25 MiB buckets)
against the former flat copy (one ``torch.cat`` of everything, reduce, copy back).

    python benchmarks/distributed.py [--steps 30] [--batch 128] [--device cpu|cuda] [--precision bf16]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import multidigits

    import recon
    from recon import _distributed

    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
        backend = "nccl" if args.device == "cuda" else "gloo"
        if args.device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")

    comm = {"seconds": 0.0}
    original = _distributed.average_

    def timed(tensors, weight=1.0):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        original(tensors, weight)
        if device.type == "cuda":
            torch.cuda.synchronize()
        comm["seconds"] += time.perf_counter() - t0

    _distributed.average_ = timed
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.steps
    x = torch.randn(n, 1, 10, 14, generator=g)
    ys = {t: torch.randint(0, 10, (n,), generator=g) for t in multidigits.TASKS}
    dataset = torch.utils.data.TensorDataset(x, *ys.values())

    def collate(samples):
        xs, *targets = torch.utils.data.default_collate(samples)
        return xs, dict(zip(multidigits.TASKS, targets, strict=True))

    def loader(size: int):
        subset = torch.utils.data.Subset(dataset, range(size * args.batch))
        if args.data == "loader":
            return torch.utils.data.DataLoader(subset, batch_size=args.batch, collate_fn=collate)
        return [collate([subset[i] for i in range(b * args.batch, (b + 1) * args.batch)]) for b in range(size)]

    data = loader(args.steps)
    warm = loader(max(2, args.steps // 10))
    opts = {"device": device, "precision": args.precision}
    results = {}
    for job in ("profile", "profile batched", "train pcgrad"):
        torch.manual_seed(0)
        net = multidigits.MultiDigitNet(width=args.width).to(device)
        batched = {"batched": job == "profile batched"}

        def run(data, net=net, job=job, batched=batched):
            if job.startswith("profile"):
                return recon.profile(net, data, multidigits.losses, steps=len(data), **opts, **batched)
            return recon.train(net, data, multidigits.losses, method="pcgrad", epochs=1, **opts)

        run(warm)  # warm-up, then the timed run
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if world > 1:
            dist.barrier()
        comm["seconds"] = 0.0
        t0 = time.perf_counter()
        run(data)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        results[job] = (args.steps / elapsed, comm["seconds"] / elapsed, _peak_mib(device))
    _distributed.average_ = original
    if world > 1:
        model = multidigits.MultiDigitNet(width=args.width)
        results["allreduce"] = [_time_allreduce(model, len(ys), device, big=big) for big in (False, True)]
    if rank == 0:
        queue.put(results)
    if world > 1:
        dist.destroy_process_group()


def _peak_mib(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's, or this process's peak resident set (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10


def _flat_average(tensors, weight=1.0) -> None:
    """The former ``average_``: one concatenated copy of every tensor, reduced, copied back."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if weight != 1.0:
        flat.mul_(weight)
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _time_allreduce(
    net: torch.nn.Module, K: int, device: torch.device, reps: int = 21, big: bool = False
) -> dict[str, float]:
    """Milliseconds per all-reduce of a step's gradients (J of K x all parameters, K head-sized tensors): the
    median over ``reps`` rounds, the two ways alternating within each round (paired against load drifts)."""
    import statistics

    from recon import _distributed

    P = sum(p.numel() for p in net.parameters())
    J = torch.randn(K, P if not big else (64 << 20) // (4 * K), device=device)  # big: a 64 MiB J, reduced in place
    small = [torch.randn(64, device=device) for _ in range(2 * K)]
    ways = {"flat copy": _flat_average, "in place + buckets": _distributed.average_}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(reps + 1):
        for name in list(ways)[:: 1 if r % 2 else -1]:
            dist.barrier()
            t0 = time.perf_counter()
            ways[name]([J, *small])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    pairs = zip(times["in place + buckets"], times["flat copy"], strict=True)
    out["ratio"] = statistics.median(a / b for a, b in pairs)
    out["J MiB"] = J.numel() * J.element_size() / 2**20
    return out


def measure(world: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_worker, args=(world, _port(), args, queue), nprocs=world, join=True)
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=32, help="trunk width of the MultiDigits CNN")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all, split over the processes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "fp16"])
    parser.add_argument("--data", default="loader", choices=["loader", "list"], help="DataLoader (sharded) or list")
    args = parser.parse_args()
    worlds = [1, 2] if args.device == "cpu" else [1, min(2, torch.cuda.device_count())]
    rows = {w: measure(w, args) for w in sorted(set(worlds))}
    print(
        f"MultiDigits CNN width {args.width}, global batch {args.batch}, {args.steps} steps, {args.device}, "
        f"{args.threads} threads in all, precision {args.precision}, data {args.data}"
    )
    mem = "peak MiB (CUDA alloc)" if args.device == "cuda" else "peak RSS MiB (rank 0)"
    print(f"| job | procs | steps/s | speed-up | comm share | {mem} |")
    print("|---|---:|---:|---:|---:|---:|")
    for job in ("profile", "profile batched", "train pcgrad"):
        base = rows[1][job][0]
        for w, res in rows.items():
            speed, share, peak = res[job]
            print(f"| {job} | {w} | {speed:.2f} | {speed / base:.2f}x | {100 * share:.1f}% | {peak:.0f} |")
    for w, res in rows.items():
        if "allreduce" in res:
            print()
            print(
                f"One all-reduce of a step's gradients (J and 2K small tensors), {w} processes, ms (median of paired "
                "rounds; ratio: median of per-round ratios); J under 25 MiB goes into the bucket, from 25 MiB in place:"
            )
            print("| J MiB | flat copy (before) | now | now/before |")
            print("|---:|---:|---:|---:|")
            for ar in res["allreduce"]:
                now = ar["in place + buckets"]
                print(f"| {ar['J MiB']:.1f} | {ar['flat copy']:.2f} | {now:.2f} | {ar['ratio']:.2f} |")


if __name__ == "__main__":
    main()
