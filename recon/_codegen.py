"""``split/model.py``: a split model's forward as readable PyTorch (next to the rewriter, ``recon._split``).

fx prints a ``GraphModule``'s forward as Python; this module adds the imports that code needs, a header that
says what the file is and how the graph was captured, and, for graphs captured with ``torch.export``
(aten-level operations), a comment naming the original module (from each node's ``nn_module_stack``) wherever
the code moves from one module to the next, so the aten operations read as the modules that made them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.fx as fx

__all__ = ["generated_code"]


def _imports(code: fx.graph.PythonCode) -> list[str]:
    imports = []
    for name, obj in sorted(code.globals.items()):
        if name in {"inf", "nan", "NoneType", "device", "torch"} or name.startswith("__"):
            continue
        if not re.search(rf"\b{re.escape(name)}\b", code.src):  # fx lists some globals it never uses
            continue
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if isinstance(obj, type(torch)):
            imports.append(f"import {obj.__name__} as {name}" if obj.__name__ != name else f"import {name}")
        elif module and qualname and "." not in qualname and "<" not in qualname:
            imports.append(f"from {module} import {qualname}" + (f" as {name}" if name != qualname else ""))
    return imports


def _origin(node: fx.Node) -> str:
    """``path (Class)`` of the innermost module that made ``node`` ("" when unknown or the model itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    for value in reversed(list(stack.values())):
        if isinstance(value, tuple) and len(value) == 2 and value[0] and not str(value[0]).startswith("_"):
            cls = value[1] if isinstance(value[1], str) else getattr(value[1], "__name__", str(value[1]))
            return f"{value[0]} ({cls.rsplit('.', 1)[-1]})"
    return ""


def _annotate(graph: fx.Graph, src: str) -> str:
    """Insert ``# module (Class)`` before the first line of each run of lines made by the same module."""
    origin = {n.name: _origin(n) for n in graph.nodes}
    lines, last = [], ""
    for line in src.strip("\n").splitlines():
        match = re.match(r"\s+(\w+) = ", line)
        where = origin.get(match.group(1), "") if match else ""
        if where and where != last:
            lines.append(f"    # {where}")
        last = where or last
        lines.append(line)
    return "\n".join(lines)


def generated_code(net: fx.GraphModule, plan, recipe: Path | str) -> str:
    """``split/model.py``: the split model's forward as readable PyTorch, with the imports it needs."""
    code = net.graph.python_code(root_module="self")
    how = getattr(plan, "capture", None) or "fx"
    exported = how == "export"
    src = _annotate(net.graph, code.src) if exported else code.src
    branches = (getattr(plan, "extra", None) or {}).get("branches") or net.meta.get("recon", {}).get("branches", {})
    branched = "\n".join(f"#   {layer}: {', '.join(tasks)}" for layer, tasks in branches.items())
    body = "\n".join(("    " + line) if line.strip() else "" for line in src.strip("\n").splitlines())
    capture_note = (
        "The graph was captured with torch.export (aten-level operations, the batch dimension dynamic); module\n"
        "calls name the original modules, and a comment names the module each run of aten operations comes from.\n"
        "Mode-dependent arguments (dropout's train flag, sdpa's dropout_p) read the module's ``training`` flag."
        if exported
        else f"The graph was captured with {how} (torch.fx symbolic tracing; leaves are called as one module)."
    )
    rebuild = ", example_inputs=batch" if exported else ""
    header = f'''"""The split model written by `recon split`: the forward of a torch.fx GraphModule.

Recipe: {recipe}
Model: {plan.model_class}, tasks {plan.tasks}, init={plan.init!r}.
{capture_note}
Each branched layer's path holds one copy per task (``<layer>.<task>``); every operation after a branched
layer runs once per task that it feeds. This file is for reading: rebuild the module itself with
``recon.load_split(build_model, "plan.json"{rebuild})`` and load its state_dict.
"""
'''
    lines = [header, "# branched layers -> tasks with their own copy:", branched or "#   (none)", ""]
    lines += ["import torch", *_imports(code), "", "", f"class {type(net).__name__}(torch.nn.Module):", body, ""]
    return "\n".join(lines)
