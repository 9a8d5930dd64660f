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

A second part does the same for a Hugging Face ``transformers`` BERT (12 layers, small width; random weights, no
download), which torch.fx cannot trace: recon captures it with torch.export. It branches one layer near the
top, one in the middle and one at the bottom of the encoder and prints, per position, the FLOP ratio
(``torch.utils.flop_counter``) and the measured step-time ratio of recon's split against the original, against
the whole-backbone leaf (``leaf_modules=["bert"]``: the backbone runs once per task) and against the ideal (only
the work downstream of the branch runs per task); then the capture time per model family (ResNet, BERT, ViT,
GPT-2, Swin, T5, transformers' ResNet: tiny random configs) and the capture + rewrite + eager check wall time
of a BERT-base-size graph (target < 5 s on a quiet machine) and of its rebuild with ``recon.load_split``.
``--command-vs main`` times the whole ``recon split --top-k 2`` command on examples/bert_tasks.py with main's
code (a temporary git worktree) against this checkout's, alternating, in the same run. Public API only.

    python benchmarks/split_overhead.py --quick     # a few minutes on a laptop CPU
    python benchmarks/split_overhead.py --bert-only --quick
    python benchmarks/split_overhead.py --capture-only
    python benchmarks/split_overhead.py --command-vs main
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
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep torch.profiler's start/stop lines off the table

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import recon  # noqa: E402
from recon import split  # noqa: E402

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
def shared_layers(model: nn.Module) -> list[str]:
    """The layers two or more tasks use (``recon.layer_tasks``, the public API)."""
    return [name for name, tasks in recon.layer_tasks(model).items() if len(tasks) >= 2]


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
    parser.add_argument("--bert-only", action="store_true", help="only the transformers BERT part")
    parser.add_argument("--capture-only", action="store_true", help="only capture time per model family")
    parser.add_argument(
        "--command-vs", metavar="REF", default=None,
        help="time `recon split --top-k 2` on examples/bert_tasks.py with this git ref's code (a temporary "
        "worktree) and with this checkout's, alternating, in the same run; then exit",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command_vs:
        command_part(args.command_vs, reps=args.reps or 3)
        return
    if args.capture_only:
        capture_part()
        return
    if args.bert_only:
        bert_part(
            quick=args.quick, reps=args.reps, clock=time.process_time if args.clock == "cpu" else time.perf_counter
        )
        return
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
        candidates = [name for name in shared_layers(model) if name]
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
    big_shared = [name for name in shared_layers(big) if name]
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
    print()
    bert_part(quick=args.quick, reps=args.reps, clock=clock)


# ------------------------------------------------------------------------------------------ transformers BERT
class BertHeads(nn.Module):
    """A transformers BertModel shared by K linear heads ([CLS] state, pooler output, mean state, ...)."""

    def __init__(self, tasks: Sequence[str], layers: int, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=128,
        )  # fmt: skip
        self.bert = BertModel(config)
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, 10) for t in tasks})

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.bert(ids)
        states = out.last_hidden_state
        reads = [states[:, 0], out.pooler_output, states.mean(1), states[:, -1]]
        return {t: head(reads[i % len(reads)]) for i, (t, head) in enumerate(self.heads.items())}


def flops(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def ideal_flops(model: nn.Module, x: torch.Tensor, layer: str, k: int) -> float:
    """The paper's semantics: the work from the branched layer on runs once per task, the rest once."""
    from torch.utils.flop_counter import FlopCounterMode

    seen: dict[str, int] = {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:

        def mark(module: nn.Module, args: tuple) -> None:
            seen.setdefault("before", counter.get_total_flops())

        hook = model.get_submodule(layer).register_forward_pre_hook(mark)
        model(x)
        hook.remove()
    total = counter.get_total_flops()
    return total + (k - 1) * (total - seen["before"])


def bert_part(*, quick: bool, reps: int | None, clock: Callable[[], float]) -> None:
    tasks = TASK_NAMES[:3]
    batch, seq = (4, 32) if quick else (8, 64)
    reps = reps or (5 if quick else 10)
    torch.manual_seed(0)
    model = BertHeads(tasks, layers=12, hidden=64, heads=4, ffn=128).eval()
    x = torch.randint(0, 1000, (batch, seq))
    targets = {t: torch.randint(0, 10, (batch,)) for t in tasks}
    print(
        f"transformers BERT (12 layers, hidden 64), K=3, input {batch}x{seq}; FLOPs of one forward, "
        f"time of a training step ({reps} repetitions)"
    )
    header = (
        f"{'branched layer':<34} {'FLOPs recon':>11} {'leaf':>6} {'ideal':>6} {'recon/ideal':>11} "
        f"{'time recon':>10} {'leaf':>6} {'recon/leaf':>10}"
    )
    print(header)
    print("-" * len(header))
    base = flops(model, x)
    for block in (11, 6, 0):
        layer = f"bert.encoder.layer.{block}.output.dense"
        net = split(model, [layer], init="copy", example_inputs=(x,))
        leaf = split(model, [layer], init="copy", leaf_modules=["bert"], example_inputs=(x,), capture="fx")
        ideal = ideal_flops(model, x, layer, len(tasks)) / base
        ratio, leaf_ratio = flops(net.eval(), x) / base, flops(leaf.eval(), x) / base
        for m in (model, net, leaf):
            m.train()
        samples = time_steps(
            {name: step_fn(m, x, targets) for name, m in (("original", model), ("recon", net), ("leaf", leaf))},
            2,
            reps,
            clock,
        )
        model.eval()
        t_recon = paired_ratio(samples["recon"], samples["original"])
        t_leaf = paired_ratio(samples["leaf"], samples["original"])
        print(
            f"{layer:<34} {ratio:>10.3f}x {leaf_ratio:>5.2f}x {ideal:>5.3f}x {ratio / ideal:>11.3f} "
            f"{t_recon:>9.2f}x {t_leaf:>5.2f}x {paired_ratio(samples['recon'], samples['leaf']):>10.3f}",
            flush=True,
        )
    print("FLOP and time ratios are against the original model; 'leaf' runs the whole backbone once per task.")
    print()
    capture_part()
    print()

    bert_base_part(tasks)


def bert_base_part(tasks: Sequence[str]) -> None:
    """Capture (torch.export, train and eval) + rewrite + eager check of a BERT-base-size model, and its
    rebuild from the plan (``recon.load_split``: one capture)."""
    torch.manual_seed(0)
    base_model = BertHeads(tasks, layers=12, hidden=768, heads=12, ffn=3072)
    ids = torch.randint(0, 1000, (2, 16))
    params = sum(p.numel() for p in base_model.parameters()) / 1e6
    start = time.perf_counter()
    net = split(base_model, ["bert.encoder.layer.11.output.dense"], init="copy", example_inputs=(ids,))
    wall = time.perf_counter() - start
    fresh = BertHeads(tasks, layers=12, hidden=768, heads=12, ffn=3072)
    start = time.perf_counter()
    recon.load_split(fresh, net.meta["recon"], example_inputs=(ids,))  # the plan split recorded
    load = time.perf_counter() - start
    print(
        f"capture (torch.export, train and eval) + rewrite + eager checks, BERT-base size ({params:.0f}M params, "
        f"{len(net.graph.nodes)} nodes after the split): {wall:.2f} s wall (target < 5 s); "
        f"load_split from the plan: {load:.2f} s wall  [{machine_load()}]"
    )


def machine_load() -> str:
    """The 1-minute load average and the core count: timings mean little on a loaded machine."""
    try:
        one = os.getloadavg()[0]
    except OSError:
        return "load unknown"
    return f"load average {one:.2f} on {os.cpu_count()} cores"


# ------------------------------------------------------------------------------------ capture per family
def family_models() -> list[tuple[str, Callable[[], nn.Module], tuple]]:
    """``(family, build, example batch)`` for the model families recon captures: tiny random configs."""
    import transformers as tf

    def heads(backbone: nn.Module, width: int, read: Callable[[Any], torch.Tensor]) -> nn.Module:
        return _Heads(backbone, width, read)

    ids = torch.randint(0, 50, (4, 16))
    image = torch.randn(4, 3, 32, 32)
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    last = lambda out: out.last_hidden_state  # noqa: E731
    return [
        ("ResNet-18 (fx)", lambda: resnet18(TASK_NAMES[:3]), (image,)),
        ("BERT", lambda: heads(tf.BertModel(tf.BertConfig(vocab_size=50, **tiny)), 32, last), (ids,)),
        ("ViT", lambda: heads(tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **tiny)), 32, last), (image,)),
        (
            "GPT-2",
            lambda: heads(tf.GPT2Model(tf.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2)), 32, last),
            (ids,),
        ),
        (
            "Swin (2 stages)",
            lambda: heads(
                tf.SwinModel(
                    tf.SwinConfig(
                        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
                    )
                ),  # fmt: skip
                32,
                last,
            ),
            (image,),
        ),
        (
            "T5 encoder",
            lambda: heads(
                tf.T5EncoderModel(tf.T5Config(vocab_size=50, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)),
                32,
                last,
            ),
            (ids,),
        ),
        (
            "HF ResNet",
            lambda: heads(
                tf.ResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1])),
                32,
                lambda out: out.pooler_output.flatten(1)[:, None],
            ),
            (image,),
        ),
    ]


class _Heads(nn.Module):
    """A backbone shared by three linear heads (first, mean and last position of its output sequence)."""

    def __init__(self, backbone: nn.Module, width: int, read: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.backbone, self.read = backbone, read
        self.heads = nn.ModuleDict({t: nn.Linear(width, 3) for t in TASK_NAMES[:3]})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        states = self.read(self.backbone(x))
        reads = (states[:, 0], states.mean(1), states[:, -1])
        return {t: head(reads[i]) for i, (t, head) in enumerate(self.heads.items())}


def capture_part() -> None:
    """Per model family: capture + eager check (``recon.split`` with no layer), and a one-layer split."""
    print(f"capture time per model family (tiny random configs, K=3)  [{machine_load()}]")
    header = f"{'family':<18} {'capture':>8} {'capture + split 1 layer':>24}  {'how':<8}"
    print(header)
    print("-" * len(header))
    for family, build, x in family_models():
        torch.manual_seed(0)
        try:
            model = build().eval()
            start = time.perf_counter()
            net = split(model, [], example_inputs=x)
            captured = time.perf_counter() - start
            layer = [n for n in shared_layers_of(model, x) if n][-1]
            start = time.perf_counter()
            split(build().eval(), [layer], init="copy", example_inputs=x)
            both = time.perf_counter() - start
            print(f"{family:<18} {captured:>7.2f}s {both:>23.2f}s  {net.meta['recon']['capture']:<8}", flush=True)
        except recon.ReconError as exc:
            print(f"{family:<18} {'FAIL':>8}  {str(exc)[:150]}", flush=True)


def shared_layers_of(model: nn.Module, x: tuple) -> list[str]:
    """The shared layers, through the same capture the split used (``recon.shared_parameters``)."""
    shared = {id(p) for p in recon.shared_parameters(model, example_inputs=x)}
    return [name for name, m in model.named_modules() if any(id(p) in shared for p in m._parameters.values())]


# ---------------------------------------------------------------------------------- the command, before/after
def command_part(ref: str, reps: int = 3) -> None:
    """``recon split --top-k 2`` on examples/bert_tasks.py, with ``ref``'s code and with this checkout's,
    alternating, on one profiled run folder (profiled once, with this checkout's code)."""
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    recon_bin = Path(sys.executable).with_name("recon")
    with tempfile.TemporaryDirectory(prefix="recon-command-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(base), ref], check=True,
                       capture_output=True)  # fmt: skip
        try:
            run = Path(tmp) / "run"
            env = {**os.environ, "PYTHONPATH": str(root), "RECON_BERT_BATCH": "32"}
            recipe = str(root / "examples" / "bert_tasks.py")
            subprocess.run([str(recon_bin), "profile", recipe, "--steps", "5", "--out", str(run)], env=env,
                           check=True, capture_output=True)  # fmt: skip
            times: dict[str, list[float]] = {ref: [], "this checkout": []}
            for _ in range(reps):
                for name, code in ((ref, base), ("this checkout", root)):
                    start = time.perf_counter()
                    subprocess.run([str(recon_bin), "split", "--top-k", "2", "--run", str(run), "--force"],
                                   env={**env, "PYTHONPATH": str(code)}, check=True, capture_output=True)  # fmt: skip
                    times[name].append(time.perf_counter() - start)
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(base)], check=False,
                           capture_output=True)  # fmt: skip
    before, after = statistics.median(times[ref]), statistics.median(times["this checkout"])
    print(f"`recon split --top-k 2` on examples/bert_tasks.py, wall time of the whole command, median of {reps}, "
          f"alternating  [{machine_load()}]")  # fmt: skip
    print(f"{ref + ' (before)':<22} {before:>7.2f} s   runs: {', '.join(f'{t:.2f}' for t in times[ref])}")
    print(f"{'this checkout (after)':<22} {after:>7.2f} s   runs: "
          f"{', '.join(f'{t:.2f}' for t in times['this checkout'])}")  # fmt: skip
    print(f"after / before: {after / before:.3f} (target <= 0.5)")


if __name__ == "__main__":
    main()
