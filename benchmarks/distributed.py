"""Steps per second of profiling and of PCGrad training with 1 and 2 processes (gloo on CPU, NCCL on GPUs),
and the share of step time spent in communication (the all-reduces of ``recon._distributed``).

Every process loads the same global batch and keeps its shard, so with 2 processes each computes half the
batch: the ideal speed-up is 2x, minus communication (K x parameters per step) and per-step overheads.

    python benchmarks/distributed.py [--steps 30] [--batch 128] [--device cpu|cuda]
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
    x = torch.randn(args.batch, 1, 10, 14, generator=g)
    batch = (x, {t: torch.randint(0, 10, (args.batch,), generator=g) for t in multidigits.TASKS})
    data = [batch] * args.steps
    results = {}
    for job in ("profile", "train pcgrad"):
        torch.manual_seed(0)
        net = multidigits.MultiDigitNet(width=args.width).to(device)
        run = (
            (lambda net=net: recon.profile(net, data, multidigits.losses, steps=args.steps, device=device))
            if job == "profile"
            else (lambda net=net: recon.train(net, data, multidigits.losses, method="pcgrad", epochs=1, device=device))
        )
        # warm-up, then the timed run
        warm = data[: max(2, args.steps // 10)]
        if job == "profile":
            recon.profile(net, warm, multidigits.losses, steps=len(warm), device=device)
        else:
            recon.train(net, warm, multidigits.losses, method="pcgrad", epochs=1, device=device)
        if world > 1:
            dist.barrier()
        comm["seconds"] = 0.0
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        results[job] = (args.steps / elapsed, comm["seconds"] / elapsed)
    if rank == 0:
        queue.put(results)
    if world > 1:
        dist.destroy_process_group()


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
    args = parser.parse_args()
    worlds = [1, 2] if args.device == "cpu" else [1, min(2, torch.cuda.device_count())]
    rows = {w: measure(w, args) for w in sorted(set(worlds))}
    print(
        f"MultiDigits CNN width {args.width}, global batch {args.batch}, {args.steps} steps, {args.device}, "
        f"{args.threads} threads in all"
    )
    print(f"{'job':14s} {'procs':>5s} {'steps/s':>8s} {'speed-up':>8s} {'comm share':>10s}")
    for job in ("profile", "train pcgrad"):
        base = rows[1][job][0]
        for w, res in rows.items():
            speed, share = res[job]
            print(f"{job:14s} {w:5d} {speed:8.2f} {speed / base:7.2f}x {100 * share:9.1f}%")


if __name__ == "__main__":
    main()
