"""What does recon's automatic split cost at training time, against a hand-written branched model?

For a ResNet-18-size multi-task model (written here; torchvision is not a dependency) with K tasks, this
times one training step (forward, backward, SGD step) of

* ``original``  the unsplit model;
* ``recon``     ``recon.split(model, layers)``: the torch.fx rewrite;
* ``hand``      the same network hand-written in the style of the official Recon code: every layer is a
  wrapper that holds one module (shared) or an ``nn.ModuleList`` with one module per task (branched), and the
  forward passes a tensor until the first branched layer and a list of per-task tensors after it.

for top-k in {0, 5, 25} branched layers (spread evenly over the shared layers, the same ones for both) and
K in {2, 4}; then it times the rewrite itself on a ResNet-50-size graph. Target: recon / hand <= 1.05 and a
rewrite under 2 s.

    python benchmarks/split_overhead.py --quick     # a few minutes on a laptop CPU
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep torch.profiler's start/stop lines off the table

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon._graph import layer_tasks, shared_layers  # noqa: E402
from recon._split import split  # noqa: E402

TASK_NAMES = ("seg", "depth", "normal", "edge")


# ------------------------------------------------------------------------------------- plain ResNets
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, 4 * c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * c)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != 4 * c:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout (CIFAR stem: 3x3 conv, no max-pool) with one linear head per task."""

    def __init__(self, block: type, depths: Sequence[int], tasks: Sequence[str], classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        c_in = 64
        for i, (c, n) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, c, 2 if (j == 0 and i > 0) else 1))
                c_in = c * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.ModuleDict({t: nn.Linear(c_in, classes) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        h = torch.flatten(self.avgpool(x), 1)
        return {t: head(h) for t, head in self.heads.items()}


def resnet18(tasks: Sequence[str]) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), tasks)


def resnet50(tasks: Sequence[str]) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), tasks)


# ------------------------------------------------------------------ hand-written, official Recon style
Tensors = torch.Tensor | list[torch.Tensor]


class Branch(nn.Module):
    """One layer: a shared module, or (branched) an ``nn.ModuleList`` with one module per task."""

    def __init__(self, make: Callable[[], nn.Module], tasks: int, branched: bool) -> None:
        super().__init__()
        self.branched = branched
        self.m = nn.ModuleList([make() for _ in range(tasks)]) if branched else make()

    def forward(self, xs: Tensors) -> Tensors:
        if self.branched:
            if isinstance(xs, torch.Tensor):
                return [m(xs) for m in self.m]
            return [m(x) for m, x in zip(self.m, xs, strict=True)]
        if isinstance(xs, torch.Tensor):
            return self.m(xs)
        return [self.m(x) for x in xs]


def relu_(xs: Tensors) -> Tensors:
    if isinstance(xs, torch.Tensor):
        return F.relu(xs, inplace=True)
    return [F.relu(x, inplace=True) for x in xs]


def add_(a: Tensors, b: Tensors) -> Tensors:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.add_(b)
    if isinstance(a, torch.Tensor):  # a is shared, b per task: do not write into the shared tensor
        return [a + y for y in b]
    if isinstance(b, torch.Tensor):
        return [x.add_(b) for x in a]
    return [x.add_(y) for x, y in zip(a, b, strict=True)]


class ListBasicBlock(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int, k: int, branched: Callable[[str], bool]) -> None:
        super().__init__()

        def b(name: str, make: Callable[[], nn.Module]) -> Branch:
            return Branch(make, k, branched(name))

        self.conv1 = b("conv1", lambda: nn.Conv2d(c_in, c, 3, stride, 1, bias=False))
        self.bn1 = b("bn1", lambda: nn.BatchNorm2d(c))
        self.conv2 = b("conv2", lambda: nn.Conv2d(c, c, 3, 1, 1, bias=False))
        self.bn2 = b("bn2", lambda: nn.BatchNorm2d(c))
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(
                b("downsample.0", lambda: nn.Conv2d(c_in, c, 1, stride, bias=False)),
                b("downsample.1", lambda: nn.BatchNorm2d(c)),
            )

    def forward(self, x: Tensors) -> Tensors:
        identity = x
        out = relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return relu_(add_(out, identity))


class ListResNet18(nn.Module):
    def __init__(self, tasks: Sequence[str], branched: set[str], classes: int = 10) -> None:
        super().__init__()
        k = len(tasks)
        self.tasks = list(tasks)
        self.conv1 = Branch(lambda: nn.Conv2d(3, 64, 3, 1, 1, bias=False), k, "conv1" in branched)
        self.bn1 = Branch(lambda: nn.BatchNorm2d(64), k, "bn1" in branched)
        c_in = 64
        for i, c in enumerate((64, 128, 256, 512)):
            blocks = []
            for j in range(2):
                prefix = f"layer{i + 1}.{j}."
                blocks.append(
                    ListBasicBlock(c_in, c, 2 if (j == 0 and i > 0) else 1, k, lambda n, p=prefix: p + n in branched)
                )
                c_in = c
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.heads = nn.ModuleList([nn.Linear(c_in, classes) for _ in tasks])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = relu_(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        xs = x if isinstance(x, list) else [x] * len(self.tasks)
        hs = [torch.flatten(F.adaptive_avg_pool2d(h, 1), 1) for h in xs]
        if not isinstance(x, list):
            hs = [hs[0]] * len(self.tasks)
        return {t: head(h) for t, head, h in zip(self.tasks, self.heads, hs, strict=True)}


# ---------------------------------------------------------------------------------------------- timing
def spread(items: Sequence[str], k: int) -> list[str]:
    """``k`` items spread evenly over ``items`` (first and last included)."""
    if k <= 0:
        return []
    if k >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else [items[-1]]


def step_fn(
    model: nn.Module, x: torch.Tensor, targets: dict[str, torch.Tensor], precision: str = "32"
) -> Callable[[], None]:
    from recon._precision import Precision

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    amp = Precision(precision, device_type=x.device.type)  # --precision: autocast; fp16 with a loss scale

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp.autocast():
            out = model(x)
            loss = sum(F.cross_entropy(out[t], y) for t, y in targets.items())
        amp.scale_loss(loss).backward()
        if amp.unscale_tensors([p.grad for p in model.parameters()]):
            opt.step()

    return step


def count_ops(step: Callable[[], None]) -> int:
    """How many aten operators one step runs (forward, backward and the optimizer), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def time_steps(
    steps: dict[str, Callable[[], None]], warmup: int, reps: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Seconds per step for each candidate, ``reps`` samples. The candidates run back to back in every
    repetition, in alternating order, so that load drifts and order effects hit them alike and sample ``i``
    of two candidates can be compared as a pair."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = clock()
            steps[name]()
            samples[name].append(clock() - start)
    return samples


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over repetitions of ``a[i] / b[i]``: robust to slow drifts in the machine's load."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and few repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="input height and width")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: process CPU time (robust when other jobs share the machine); wall: elapsed time",
    )
    parser.add_argument("--precision", choices=("32", "bf16", "fp16"), default="32", help="autocast of every step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = args.batch or (4 if args.quick else 8)
    size = args.size or (16 if args.quick else 32)
    reps = args.reps or (5 if args.quick else 10)
    warmup = 2
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    print(
        f"ResNet-18 multi-task, input {batch}x3x{size}x{size}, {args.threads} thread(s); training step "
        f"(forward+backward+SGD), {args.clock} time, {reps} repetitions, precision {args.precision}"
    )
    header = (
        f"{'K':>2} {'top-k':>5} {'original':>9} {'recon':>9} {'hand':>9} {'recon/hand':>10} {'(best)':>6} "
        f"{'recon/orig':>10} {'aten ops recon/hand':>19}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for k_tasks in (2, 4):
        tasks = TASK_NAMES[:k_tasks]
        torch.manual_seed(0)
        model = resnet18(tasks)
        candidates = [name for name in shared_layers(layer_tasks(model)) if name]
        x = torch.randn(batch, 3, size, size)
        targets = {t: torch.randint(0, 10, (batch,)) for t in tasks}
        for top_k in (0, 5, 25):
            layers = spread(candidates, top_k)
            net = split(model, layers, init="reinit")
            hand = ListResNet18(tasks, set(layers))
            assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in hand.parameters())
            steps = {
                "original": step_fn(model, x, targets, args.precision),
                "recon": step_fn(net, x, targets, args.precision),
                "hand": step_fn(hand, x, targets, args.precision),
            }
            samples = time_steps(steps, warmup, reps, clock)
            ops = f"{count_ops(steps['recon'])}/{count_ops(steps['hand'])}"
            median = {name: statistics.median(s) for name, s in samples.items()}
            row = {
                "K": k_tasks,
                "top_k": top_k,
                **median,
                "ratio": paired_ratio(samples["recon"], samples["hand"]),
                "best_ratio": min(samples["recon"]) / min(samples["hand"]),
                "vs_original": paired_ratio(samples["recon"], samples["original"]),
            }
            rows.append(row)
            print(
                f"{k_tasks:>2} {top_k:>5} {row['original'] * 1e3:>7.1f}ms {row['recon'] * 1e3:>7.1f}ms "
                f"{row['hand'] * 1e3:>7.1f}ms {row['ratio']:>10.3f} {row['best_ratio']:>6.3f} "
                f"{row['vs_original']:>10.3f} {ops:>19}",
                flush=True,
            )
    ratios = [r["ratio"] for r in rows]
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(
        f"recon/hand, median of paired ratios: geometric mean {geo:.3f}, worst {max(ratios):.3f} "
        "(target <= 1.05); times are medians. At top-k 0 recon runs the original graph: those rows show the noise."
    )

    # the rewrite itself, on a ResNet-50-size graph
    print()
    torch.manual_seed(0)
    big = resnet50(TASK_NAMES)
    params = sum(p.numel() for p in big.parameters()) / 1e6
    big_shared = [name for name in shared_layers(layer_tasks(big)) if name]
    nodes = len(torch.fx.symbolic_trace(big).graph.nodes)
    for top_k, init in ((25, "reinit"), (25, "copy"), (len(big_shared), "copy")):
        layers = spread(big_shared, top_k)
        wall, cpu = [], []
        for _ in range(3):
            start, start_cpu = time.perf_counter(), time.process_time()
            split(big, layers, init=init)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        print(
            f"rewrite ResNet-50 ({params:.1f}M params, {nodes} fx nodes, K=4), top-k {top_k:>3}, init={init:<6}: "
            f"{min(wall):.2f} s wall, {min(cpu):.2f} s cpu (best of 3; target < 2 s)"
        )


if __name__ == "__main__":
    main()
