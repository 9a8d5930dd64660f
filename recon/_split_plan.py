"""The record of a split: :class:`SplitPlan` (``split/plan.json``), enough to rebuild the split model."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.fx as fx

from recon._errors import ReconError

__all__ = ["INITS", "META_KEY", "SplitPlan", "plan_of"]

META_KEY = "recon"
INITS = ("reinit", "copy")


# ------------------------------------------------------------------------------------------------ plan
@dataclasses.dataclass
class SplitPlan:
    """What :func:`split` did, as a small JSON object (``split/plan.json``): enough to rebuild the model.

    ``layers`` are in score order when they come from a profile. ``groups`` maps a layer to its task groups
    (``{layer: [[task, ...], ...]}``; a layer not in it has one copy per task, and a plan written before groups
    existed has none). ``S``, ``top_k``, ``scores``, ``budget_params`` and ``budget_flops`` record how they
    were chosen (:func:`recon.plan_split`); ``capture``, ``leaf_modules`` and ``concrete_args`` how the model
    was captured. Unknown keys read from JSON are kept in ``extra`` and written back.
    """

    tasks: list[str]
    layers: list[str]
    init: str = "reinit"
    S: float | None = None
    top_k: int | None = None
    scores: dict[str, float] | None = None
    groups: dict[str, list[list[str]]] | None = None
    budget_params: float | None = None
    budget_flops: float | None = None
    leaf_modules: list[str] = dataclasses.field(default_factory=list)
    concrete_args: dict[str, Any] | None = None
    model_class: str | None = None
    capture: str | None = None  # how the graph was captured: "fx", "export", "fx+leaves[...]" (None: an older plan, fx)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data = {k: v for k, v in data.items() if v is not None or k in ("tasks", "layers", "init")}
        data.update(self.extra)
        return data

    def to_json(self) -> str:
        try:
            return json.dumps(self.to_dict(), indent=2) + "\n"
        except TypeError as exc:
            raise ReconError(
                f"the split plan is not JSON-serialisable ({exc}); give concrete_args JSON values, or pass "
                "them again to recon.load_split"
            ) from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SplitPlan:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [k for k in ("tasks", "layers") if k not in data]
        if missing:
            raise ReconError(f"the split plan has no {missing}; write it with recon split (plan.json)")
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        plan = cls(**known, extra=extra)
        plan.tasks, plan.layers = list(plan.tasks), list(plan.layers)
        plan.leaf_modules = list(plan.leaf_modules or [])
        if plan.groups is not None:
            if not isinstance(plan.groups, Mapping) or set(plan.groups) - set(plan.layers):
                raise ReconError("the split plan's 'groups' must map branched layers to lists of task lists")
            plan.groups = {k: [list(g) for g in v] for k, v in plan.groups.items()}
        if plan.init not in INITS:
            raise ReconError(f"the split plan has init={plan.init!r}; use one of {list(INITS)}")
        return plan

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> SplitPlan:
        if isinstance(text, Mapping):
            return cls.from_dict(text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReconError(f"the split plan is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ReconError("the split plan must be a JSON object with 'tasks' and 'layers'")
        return cls.from_dict(data)

    def layer_spec(self) -> list[str] | dict[str, list[list[str]] | None]:
        """What :func:`split` takes: the layers, or ``{layer: groups}`` when the plan has groups."""
        if not self.groups:
            return list(self.layers)
        return {layer: self.groups.get(layer) for layer in self.layers}

    def save(self, path: str | os.PathLike) -> Path:
        from recon._io import write_text

        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SplitPlan:
        path = Path(path)
        if not path.is_file():
            raise ReconError(f"no split plan at {path}; run `recon split` first or give the path to plan.json")
        return cls.from_json(path.read_text(encoding="utf-8"))


def plan_of(net: fx.GraphModule) -> SplitPlan:
    """The :class:`SplitPlan` of a model made by :func:`split` (``S``/``top_k``/``scores`` left empty)."""
    meta = getattr(net, "meta", {}).get(META_KEY) if isinstance(net, fx.GraphModule) else None
    if not meta:
        raise ReconError("this model was not made by recon.split; split it first")
    return SplitPlan(
        tasks=list(meta["tasks"]),
        layers=list(meta["layers"]),
        init=meta["init"],
        groups={k: [list(g) for g in v] for k, v in meta.get("groups", {}).items()},
        leaf_modules=list(meta["leaf_modules"]),
        concrete_args=meta["concrete_args"],
        model_class=meta["model_class"],
        capture=meta.get("capture", "fx"),
    )
