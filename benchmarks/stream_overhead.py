"""What writing every recorded row at once costs: the profiler's two streamed arrays on the CPU.

    python -m benchmarks.stream_overhead [--layers 60] [--tasks 4] [--steps 2000] [--rounds 5]

Side by side in one run, in alternating rounds: a :class:`recon._cosines.CosineRecorder` plus a
:class:`recon._cosines.GramRecorder` (what one profile step records) writing every row as it comes (the CPU
default since the arrays are valid from the first byte) against the same recorders holding rows for chunks
of 256 (the GPU path). Per-step microseconds of process CPU time (user + system, one thread: robust on a
shared machine; median over rounds) and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from recon._cosines import CosineRecorder, GramRecorder, gram_rows
from recon._gram import gram_cosines


def _run(folder: Path, grams: list[torch.Tensor], *, every_row: bool) -> float:
    L, K = grams[0].shape[0], grams[0].shape[1]
    cos = CosineRecorder(folder / "c.npy", L, K * (K - 1) // 2, device=torch.device("cpu"), chunk=256)
    gram = GramRecorder(folder / "g.npy", L, K, device=torch.device("cpu"), chunk=256)
    cos._every_row = gram._every_row = every_row
    start = time.process_time()
    for g in grams:
        cos.append(gram_cosines(g))
        gram.append(gram_rows(g))
    cos.close()
    gram.close()
    return (time.process_time() - start) / len(grams) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    J = [torch.randn(args.layers, args.tasks, 8, generator=g) for _ in range(args.steps)]
    grams = [j @ j.transpose(1, 2) for j in J]
    times: dict[str, list[float]] = {"every row": [], "chunks of 256": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in sorted(times, reverse=r % 2 == 1):
                times[name].append(_run(Path(tmp), grams, every_row=name == "every row"))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.layers} layers, {args.tasks} tasks, {args.steps} steps x {args.rounds} rounds (median)\n")
    print("| recording | us per step |\n| --- | --- |")
    for name, value in med.items():
        print(f"| {name} | {value:.1f} |")
    print(f"\nratio every row / chunks: {med['every row'] / med['chunks of 256']:.2f}x")


if __name__ == "__main__":
    main()
