"""What every command shares: consoles, device choice, table printing, and error -> exit-code handling."""

from __future__ import annotations

import functools
import os
import shlex
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from recon import NonFiniteLossError, ReconError

console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}

EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; anything else must be a device torch knows."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ReconError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReconError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def say(message: str, *, style: str | None = None, prefix: str = "", err: bool = False) -> None:
    """Print ``message`` as plain text, never parsed as markup (a gloo error's ``[/...]`` stays as it is) and
    never wrapped (a command in it can be pasted)."""
    text = Text.assemble((prefix, style or ""), message) if prefix else Text(message, style=style or "")
    (err_console if err else console).print(text, highlight=False, soft_wrap=True)


def command(name: str, *args: str | Path, **flags: str | int | Path | bool | None) -> str:
    """The exact ``recon`` command line to paste: arguments quoted for the shell, flags whose value is None
    left out, True flags bare. A path inside the current folder is written relative to it."""
    parts = ["recon", name, *(_shell_path(a) for a in args)]
    for key, value in flags.items():
        if value is None or value is False:
            continue
        parts.append("--" + key.replace("_", "-"))
        if value is not True:
            parts.append(_shell_path(value) if isinstance(value, Path) else shlex.quote(str(value)))
    return " ".join(parts)


def _shell_path(path: str | Path) -> str:
    path = Path(path)
    if path.is_absolute():
        relative = os.path.relpath(path)
        path = Path(relative) if not relative.startswith("..") else path
    return shlex.quote(str(path))


def fail(message: str, code: int) -> typer.Exit:
    say(message, prefix="error: ", style="bold red", err=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    say(message, prefix="warning: ", style="yellow", err=True)


def _os_error(e: OSError) -> str:
    """An unreadable or unwritable file as one line: the file, the reason and the fix."""
    name = e.filename or "a file"
    if isinstance(e, PermissionError):
        return f"cannot access {name}: permission denied; check its permissions (or pass --out elsewhere)"
    if isinstance(e, FileNotFoundError):
        return f"{name} does not exist; check the path"
    return f"cannot read or write {name}: {e.strerror or e}; check the file and the disk"


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input -> one line, exit 2; interrupt -> exit 130; any other failure -> exit 1 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except ReconError as e:
            if STATE["debug"]:
                traceback.print_exc()
            raise fail(str(e), EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except NonFiniteLossError as e:
            raise fail(str(e), EXIT_FAILURE) from None
        except OSError as e:
            if STATE["debug"]:
                traceback.print_exc()
            raise fail(_os_error(e), EXIT_FAILURE) from None
        except Exception as e:
            if STATE["debug"]:
                traceback.print_exc()
            else:
                err_console.print("(run with --debug for the traceback)", style="dim")
            raise fail(f"{type(e).__name__}: {e}", EXIT_FAILURE) from None

    return wrapper


def frame_table(
    frame: pd.DataFrame, *, title: str | None = None, index: str | None = None, fmt: dict | None = None
) -> Table:
    """A rich table of a DataFrame; ``fmt`` maps a column to a format string or function."""
    fmt = fmt or {}
    table = Table(title=None if title is None else Text(title), title_justify="left", header_style="bold")
    if index is not None:
        table.add_column(index, style="cyan", no_wrap=True)
    for col in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[col])
        table.add_column(str(col), justify="right" if numeric else "left")
    for key, row in frame.iterrows():
        cells = [str(key)] if index is not None else []
        for col in frame.columns:
            value, f = row[col], fmt.get(col)
            if callable(f):
                cells.append(f(value))
            elif f is not None and pd.notna(value):
                cells.append(format(value, f))
            else:
                cells.append("" if pd.isna(value) else str(value))
        table.add_row(*(Text(c) for c in cells))  # cells are data, never markup
    return table
