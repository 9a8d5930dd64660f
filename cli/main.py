"""The ``recon`` console script: a thin Typer layer over the library, one module per command."""

from __future__ import annotations

import typer
import typer.core

from cli._common import STATE, guarded


def _flags_take_no_value() -> None:
    """Typer's help shows ``<bool>`` beside an on/off flag, as if it took a value; show flags bare."""
    shown = typer.core.TyperOption.display_type_rich

    def display_type_rich(self, ctx):  # noqa: ANN001, ANN202 (typer's signature)
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    typer.core.TyperOption.display_type_rich = display_type_rich


_flags_take_no_value()

app = typer.Typer(
    name="recon",
    help="Find the shared layers where task gradients conflict, branch them, retrain (Recon, ICLR 2023).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for every error.")) -> None:
    STATE["debug"] = debug


def _register() -> None:
    from cli.profile import profile_command

    app.command("profile")(guarded(profile_command))
    for module, name in (
        ("cli.split", "split"),
        ("cli.train", "train"),
        ("cli.methods", "methods"),
        ("cli.report", "report"),
        ("cli.search", "search"),
    ):
        try:
            mod = __import__(module, fromlist=["_"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        app.command(name)(guarded(getattr(mod, f"{name}_command")))


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
