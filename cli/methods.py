"""``recon methods``: every gradient method with its hyperparameters, kind and paper, and the options."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

_KIND_HELP = {
    "gradient": "task gradients (K, P) -> update",
    "loss": "weights from the losses",
    "representation": "weights from grads w.r.t. features",
    "model": "wraps the model (RotoGrad module)",
    "option": "composes with any method",
}


def methods_command() -> None:
    """List every gradient method with its hyperparameters, defaults and paper, and the composable options."""
    from recon.methods import OPTIONS, REGISTRY

    console = Console()
    table = Table(title="recon methods  (use: --method NAME or NAME:key=value,key=value)", show_lines=False)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("hyperparameters (defaults)")
    table.add_column("paper")
    table.add_column("what it does")
    for info in REGISTRY.values():
        table.add_row(info.name, info.kind, info.hparams_text(), info.paper, info.summary)
    console.print(table)

    options = Table(title="composable options (apply to the shared parameters, with any method)")
    options.add_column("name", style="bold cyan", no_wrap=True)
    options.add_column("python", no_wrap=True)
    options.add_column("hyperparameters (defaults)")
    options.add_column("paper")
    options.add_column("what it does")
    for info in OPTIONS.values():
        options.add_row(info.name, f"recon.methods.{info.cls.__name__}", info.hparams_text(), info.paper, info.summary)
    console.print(options)
    console.print(
        "[dim]kinds: "
        + "; ".join(f"{k} = {v}" for k, v in _KIND_HELP.items())
        + ". Aliases: joint = mean, ew = sum, nash_mtl = nashmtl, imtlg = imtl_g, uw = uncertainty.[/]",
        soft_wrap=True,
    )
