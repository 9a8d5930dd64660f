"""recon: find the shared layers where multi-task gradients conflict, branch them, retrain.

After "Recon: Reducing Conflicting Gradients From the Root for Multi-Task Learning" (Shi et al., ICLR 2023).

The three stages::

    prof = recon.profile(model, data, losses)             # 1. layer-wise cosines, S-conflict scores
    net = recon.split(model, prof.top_layers(4))          # 2. torch.fx rewrite: per-task copies
    recon.train(net, data, losses, method="cagrad")       # 3. retrain from scratch with any method

and, in one's own loop, ``recon.backward(losses, net, method)``.
"""

from recon import methods
from recon._backward import BackwardResult, backward
from recon._distributed import broadcast_object, init_distributed, is_main_process
from recon._errors import NonFiniteLossError, ReconError
from recon._graph import TraceError, layer_tasks
from recon._plan import plan_split
from recon._precision import check_precision
from recon._profile import ConflictProfile, profile, read_scores_json, sampling_period
from recon._recipe import Recipe, load_recipe
from recon._report import Report, report
from recon._runs import Run
from recon._search import SearchResult, search
from recon._split import SplitPlan, load_split, shared_parameters, split, task_parameters
from recon._split_run import split_run
from recon._train import TrainResult, delta_m, evaluate, seed_everything, train

__version__ = "0.1.0"

__all__ = [
    "BackwardResult",
    "ConflictProfile",
    "NonFiniteLossError",
    "Recipe",
    "ReconError",
    "Report",
    "Run",
    "SearchResult",
    "SplitPlan",
    "TraceError",
    "TrainResult",
    "backward",
    "broadcast_object",
    "check_precision",
    "delta_m",
    "evaluate",
    "init_distributed",
    "is_main_process",
    "layer_tasks",
    "load_recipe",
    "load_split",
    "methods",
    "plan_split",
    "profile",
    "read_scores_json",
    "sampling_period",
    "report",
    "search",
    "seed_everything",
    "shared_parameters",
    "split",
    "split_run",
    "task_parameters",
    "train",
]
