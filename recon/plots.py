"""Every picture recon draws: used by ``recon profile``, ``recon report`` and the notebook.

Each function returns a matplotlib :class:`~matplotlib.figure.Figure` and neither shows nor saves it; save one
with ``fig.savefig(path)`` (or :func:`save_figure` for an atomic write). Figures are built without
pyplot, so they never pile up in pyplot's global state; in a notebook a returned figure displays itself.

Colours are colour-blind safe: the Okabe-Ito palette for overlaid runs (with distinct line styles too),
``magma_r`` for rates and the diverging ``RdBu`` for cosines (red: conflicting, cos < 0; blue: aligned).

- :func:`conflict_heatmap`: layers x task pairs, the share of profiled steps in conflict (cos < S).
- :func:`cosine_over_time`: layers x training steps, the layer-wise cosine (mean over pairs, or one pair).
- :func:`cosine_distribution`: the distribution of layer-wise cosines over shared layers, several runs overlaid
  (the paper's Figures 1 and 3); :func:`cosine_distributions`: one such panel per method.
- :func:`score_bars`: S-conflict (or interference) scores per layer with the branched (top-k) layers marked and
  each layer's bootstrap ``p_top_k``.
- :func:`training_curves`: per-task train loss and validation metrics per epoch, several runs overlaid.
- :func:`conflict_share_curves`: the share of shared-layer cosines below 0 per epoch, several runs overlaid.
- :func:`save_figure`: write a figure atomically and close it.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

if TYPE_CHECKING:
    from recon._profile import ConflictProfile

__all__ = [
    "OKABE_ITO",
    "conflict_heatmap",
    "conflict_share_curves",
    "cosine_distribution",
    "cosine_distributions",
    "cosine_over_time",
    "save_figure",
    "score_bars",
    "training_curves",
]

#: Okabe & Ito (2008), the colour-blind safe qualitative palette (the pale yellow last: weak on white).
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_STYLES = ("-", "--", "-.", ":")
_COS_CMAP = "RdBu"  # ColorBrewer diverging, colour-blind safe; red = negative cosine = conflict
_RATE_CMAP = "magma_r"
_BRANCHED, _KEPT = "#D55E00", "#0072B2"


def __getattr__(name: str) -> Any:
    """``plots.plt`` imports pyplot lazily (callers use ``plots.plt.close(fig)``)."""
    if name == "plt":
        import matplotlib.pyplot as plt

        return plt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _style(i: int) -> dict[str, Any]:
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "linestyle": _STYLES[(i // 2) % len(_STYLES)]}


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _empty(message: str, title: str) -> Figure:
    """A small figure that says why there is nothing to draw (instead of an exception or a blank image)."""
    fig = _figure(5.0, 2.0)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes)
    return fig


def _keep_layers(profile: ConflictProfile, layers: Sequence[str] | None, max_layers: int, S: float) -> list[str]:
    """The layers to draw, in model order: the given ones, else the ``max_layers`` highest-scoring ones."""
    if layers is not None:
        unknown = [name for name in layers if name not in profile.layers]
        if unknown:
            raise ValueError(f"not shared layers of this profile: {unknown}; choose from {profile.layers}")
        chosen = set(layers)
    elif len(profile.layers) > max_layers:
        chosen = set(profile.scores(S).index[:max_layers])
    else:
        chosen = set(profile.layers)
    return [name for name in profile.layers if name in chosen]


def _nanmean(x: np.ndarray, axis: Any) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices (skipped pairs) stay NaN
        return np.nanmean(x, axis=axis)


# --- (a) conflict rate per layer and task pair ------------------------------------------------------------
def conflict_heatmap(profile: ConflictProfile, S: float | None = None, *, max_layers: int = 60) -> Figure:
    """Layers x task pairs, coloured by conflict rate: the share of recorded steps where ``cos < S``.

    Layers are in model order; with more than ``max_layers`` shared layers only the highest-scoring are drawn.
    """
    S = profile.S if S is None else S
    title = f"conflict rate P(cos < {S:g}) per shared layer and task pair"
    if not profile.layers or not profile.steps:
        return _empty("no shared layers or no profiled steps", title)
    rates = profile.conflict_rates(S)
    shown = _keep_layers(profile, None, max_layers, S)
    rates = rates.loc[shown]
    n_layers, n_pairs = rates.shape
    fig = _figure(max(5.0, 2.8 + 0.9 * n_pairs), 1.6 + 0.26 * n_layers)
    ax = fig.subplots()
    values = rates.to_numpy()
    im = ax.imshow(values, aspect="auto", cmap=_RATE_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    rotate = n_pairs > 3
    ax.set_xticks(np.arange(n_pairs), rates.columns, rotation=40 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticks(np.arange(n_layers), rates.index, fontsize=8)
    if n_pairs * n_layers <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.55 else "black")
    ax.set_xlabel("task pair")
    ax.set_ylabel("shared layer (model order)")
    more = f", top {n_layers} of {len(profile.layers)} layers" if n_layers < len(profile.layers) else ""
    ax.set_title(
        f"{title}\n{profile.steps} profiled steps{more}" + (" (partial)" if profile.partial else ""), fontsize=10
    )
    fig.colorbar(im, ax=ax, label="conflict rate", shrink=0.9)
    return fig


# --- (b) cosine over training time ------------------------------------------------------------------------
def _pair_index(profile: ConflictProfile, pair: str | Sequence[str] | None) -> int | None:
    if pair is None:
        return None
    if isinstance(pair, str):
        names = [f"{a}-{b}" for a, b in profile.pairs]
        if pair in names:
            return names.index(pair)
        raise ValueError(f"unknown task pair {pair!r}; choose from {names}")
    a, b = pair
    for i, (x, y) in enumerate(profile.pairs):
        if {x, y} == {a, b}:
            return i
    raise ValueError(f"unknown task pair {tuple(pair)!r}; choose from {profile.pairs}")


def _bin_steps(values: np.ndarray, max_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Average ``(steps, ...)`` into at most ``max_bins`` consecutive bins; returns (binned, bin edges in steps)."""
    steps = values.shape[0]
    if steps <= max_bins:
        return values, np.arange(steps + 1)
    edges = np.linspace(0, steps, max_bins + 1).round().astype(int)
    binned = np.stack([_nanmean(values[a:b], axis=0) for a, b in zip(edges[:-1], edges[1:], strict=True)])
    return binned, edges


def cosine_over_time(
    profile: ConflictProfile,
    pair: str | Sequence[str] | None = None,
    S: float | None = None,
    *,
    layers: Sequence[str] | None = None,
    max_bins: int = 200,
    max_layers: int = 60,
    vmax: float | None = None,
) -> Figure:
    """Layers x training steps: the layer-wise cosine, averaged over task pairs (or for one ``pair``).

    More than ``max_bins`` steps are averaged into ``max_bins`` consecutive bins. A strip on top shows, per
    step (bin), the share of drawn cosines below ``S``. The colour range is symmetric around 0: ``vmax``, or the
    99th percentile of ``|cos|``.
    """
    S = profile.S if S is None else S
    which = "mean over task pairs" if pair is None else None
    p = _pair_index(profile, pair)
    if p is not None:
        which = "pair " + "-".join(profile.pairs[p])
    title = f"layer-wise cosine over training ({which})"
    if not profile.layers or not profile.steps:
        return _empty("no shared layers or no profiled steps", title)
    shown = _keep_layers(profile, layers, max_layers, S)
    cols = [profile.layers.index(name) for name in shown]
    arr = np.asarray(profile.cosine_array, dtype=np.float32)[:, cols, :]  # (T, L, P)
    if p is not None:
        arr = arr[:, :, p : p + 1]
    with np.errstate(invalid="ignore"):
        below = np.where(np.isnan(arr), np.nan, (arr < S).astype(np.float32))
    share_binned, edges = _bin_steps(_nanmean(below.reshape(len(arr), -1), axis=1), max_bins)
    cos_binned, _ = _bin_steps(_nanmean(arr, axis=2), max_bins)  # (bins, L)
    finite = cos_binned[np.isfinite(cos_binned)]
    if vmax is None:
        vmax = float(np.percentile(np.abs(finite), 99)) if finite.size else 1.0
        vmax = float(np.clip(np.ceil(vmax * 20) / 20, 0.05, 1.0))  # round up to 0.05

    n_layers = len(shown)
    fig = _figure(9.0, 2.4 + 0.24 * n_layers)
    ax_share, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, max(3, n_layers * 0.3)])
    centers = (edges[:-1] + edges[1:]) / 2.0
    ax_share.plot(centers, 100 * share_binned, color="#000000", lw=1.2)
    ax_share.set_ylim(0, 100)
    ax_share.set_ylabel(f"% cos < {S:g}", fontsize=8)
    ax_share.tick_params(labelsize=7)
    ax_share.grid(alpha=0.3)
    steps = profile.steps
    im = ax.imshow(
        cos_binned.T,
        aspect="auto",
        cmap=_COS_CMAP,
        vmin=-vmax,
        vmax=vmax,
        interpolation="nearest",
        extent=(0, steps, n_layers - 0.5, -0.5),
    )
    ax.set_yticks(np.arange(n_layers), shown, fontsize=8)
    ax.set_xlim(0, steps)
    ax.set_xlabel(
        "training step" + (f" (binned, ~{steps / len(centers):.0f} steps per column)" if steps > max_bins else "")
    )
    ax.set_ylabel("shared layer")
    more = f"; top {n_layers} of {len(profile.layers)} layers" if n_layers < len(profile.layers) else ""
    ax_share.set_title(f"{title}{more}\nred: conflicting (cos < 0), blue: aligned", fontsize=10)
    fig.colorbar(im, ax=[ax_share, ax], label="cos" if p is not None else "mean cos", shrink=0.8, extend="both")
    return fig


# --- (c) distribution of cosines, several runs overlaid ---------------------------------------------------
def _as_cosines(obj: Any, layers: Sequence[str] | None) -> np.ndarray:
    """A flat array of finite cosines from a profile, an array/tensor, or a DataFrame with a ``cos`` column."""
    from recon._profile import ConflictProfile

    if isinstance(obj, ConflictProfile):
        arr = np.asarray(obj.cosine_array, dtype=np.float32)
        if layers is not None:
            keep = [obj.layers.index(name) for name in layers if name in obj.layers]
            arr = arr[:, keep, :]
    elif isinstance(obj, pd.DataFrame):
        arr = obj["cos"].to_numpy(dtype=np.float32)
    elif hasattr(obj, "detach"):  # a torch tensor
        arr = obj.detach().cpu().numpy().astype(np.float32)
    else:
        arr = np.asarray(obj, dtype=np.float32)
    arr = arr.reshape(-1)
    return arr[np.isfinite(arr)]


def _kde(values: np.ndarray, grid: np.ndarray, max_points: int = 20000) -> np.ndarray:
    """Gaussian KDE density on ``grid`` (a random subsample of ``max_points`` keeps it quick)."""
    from scipy.stats import gaussian_kde

    if values.size > max_points:
        values = np.random.default_rng(0).choice(values, max_points, replace=False)
    if values.size < 2 or np.ptp(values) == 0:
        return np.full_like(grid, np.nan)
    return gaussian_kde(values)(grid)


def _cosine_axis(data: Mapping[str, np.ndarray], S: float, bins: int, xlim: tuple[float, float] | None):
    """The shared x range (symmetric around 0 unless given) and round-width bin edges for cosine histograms."""
    if xlim is None:
        reach = max((float(np.percentile(np.abs(v), 99.5)) for v in data.values() if v.size), default=1.0)
        reach = max(reach, abs(S), 0.1)
        lim = min(1.0, float(np.ceil(reach * 10 - 1e-9) / 10))
        xlim = (-lim, lim)
    # a round bin width (multiples of it include 0, so bars left of 0 are exactly the conflicting cosines)
    span = xlim[1] - xlim[0]
    width = next((w for w in (0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.2) if span / w <= bins), 0.25)
    edges = np.arange(np.floor(xlim[0] / width), np.ceil(xlim[1] / width) + 1) * width
    return xlim, edges, float(width)


def _draw_distribution(ax, data: Mapping[str, np.ndarray], S: float, xlim, edges, width: float, kind: str) -> float:
    """Draws the runs' histograms/densities on ``ax``; returns the highest value drawn (for the y range)."""
    grid = np.linspace(xlim[0], xlim[1], 400)
    top = 0.0
    for i, (label, values) in enumerate(data.items()):
        style = _style(i)
        if values.size == 0:
            ax.plot([], [], label=f"{label}: no cosines", **style)
            continue
        share0, share_s = float(np.mean(values < 0)), float(np.mean(values < S))
        text = f"{share0:.1%} below 0" + (f", {share_s:.1%} below S" if S != 0 else "") + f"  (n={values.size:,})"
        text = f"{label}: {text}" if label else text
        clipped = np.clip(values, xlim[0], xlim[1])  # values outside the range land in the end bins
        if kind in {"hist", "both"}:
            weights = np.full(values.size, 100.0 / values.size)
            ax.hist(clipped, bins=edges, weights=weights, histtype="stepfilled", alpha=0.12, color=style["color"])
            heights, *_ = ax.hist(clipped, bins=edges, weights=weights, histtype="step", lw=1.6, label=text, **style)
            top = max(top, float(np.max(heights)))
        if kind in {"kde", "both"}:
            density = _kde(values, grid) * width * 100.0  # same units as the histogram: % per bin
            ax.plot(grid, density, lw=2.0 if kind == "kde" else 1.2, label=text if kind == "kde" else None, **style)
            top = max(top, float(np.nanmax(density, initial=0.0)))
    ax.axvline(S, color="#000000", ls="--", lw=1.2, label=f"S = {S:g}")
    if S != 0:
        ax.axvline(0.0, color="#000000", ls=":", lw=0.8)
    ax.set_xlim(*xlim)
    ax.grid(alpha=0.3)
    return top


def _default_S(runs: Mapping[str, Any], S: float | None) -> float:
    from recon._profile import ConflictProfile

    if S is not None:
        return float(S)
    return next((float(r.S) for r in runs.values() if isinstance(r, ConflictProfile)), 0.0)


_COS_LABEL = r"layer-wise cosine $\cos\phi_{ij}^{(k)}$"


def cosine_distribution(
    runs: Any,
    S: float | None = None,
    *,
    layers: Sequence[str] | None = None,
    bins: int = 40,
    kind: str = "hist",
    xlim: tuple[float, float] | None = None,
    title: str | None = None,
) -> Figure:
    """The distribution of layer-wise cosines over all shared layers, several runs overlaid (paper Fig. 1/3).

    Args:
        runs: ``{label: ConflictProfile or array of cosines}`` (a single profile or array also works). Arrays may
            have any shape, e.g. ``recon.train(..., record_cosines=True).cosines``; NaN (skipped pairs) is dropped.
        S: the conflict threshold drawn as a vertical line; default the first profile's ``S``, else 0.
        layers: restrict profiles to these layers (arrays are taken as they are).
        kind: ``"hist"`` (step histograms), ``"kde"`` (smoothed densities) or ``"both"``.
        xlim: the cosine range; default symmetric around 0, wide enough for 99.5% of every run's cosines.

    The y axis is the share of each run's cosines per bin (in %), so runs of different lengths compare; the
    legend gives each run's share of cosines below 0 (the paper's measure of conflict) and below ``S``.
    """
    if kind not in {"hist", "kde", "both"}:
        raise ValueError(f"kind={kind!r}; use 'hist', 'kde' or 'both'")
    if not isinstance(runs, Mapping):
        runs = {"": runs}
    S = _default_S(runs, S)
    data = {str(label): _as_cosines(obj, layers) for label, obj in runs.items()}
    title = title or "distribution of layer-wise cosines across shared layers"
    if not any(v.size for v in data.values()):
        return _empty("no recorded cosines", title)
    xlim, edges, width = _cosine_axis(data, S, bins, xlim)
    fig = _figure(7.5, 4.4 + 0.18 * len(data))
    ax = fig.subplots()
    top = _draw_distribution(ax, data, S, xlim, edges, width, kind)
    ax.set_ylim(0, max(top, 1e-9) * 1.05)
    ax.set_xlabel(_COS_LABEL + r" (task pairs $i<j$, shared layers $k$, all steps)")
    ax.set_ylabel(f"share of cosines per bin (%, bin width {width:.3g})")
    ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=1 if len(labels) <= 4 else 2, fontsize=8)
    return fig


def cosine_distributions(
    panels: Mapping[str, Mapping[str, Any]],
    S: float = 0.0,
    *,
    ncols: int = 3,
    bins: int = 40,
    kind: str = "hist",
    xlim: tuple[float, float] | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per group of runs on shared axes, e.g. ``{"PCGrad": {"PCGrad": ..., "PCGrad + Recon": ...}}``.

    The layout of the paper's Figure 3 (each method without and with Recon); every panel is drawn as in
    :func:`cosine_distribution`, with its own legend of shares below 0.
    """
    if kind not in {"hist", "kde", "both"}:
        raise ValueError(f"kind={kind!r}; use 'hist', 'kde' or 'both'")
    title = title or "distribution of layer-wise cosines across shared layers"
    data = {name: {str(k): _as_cosines(v, None) for k, v in runs.items()} for name, runs in panels.items()}
    every = {f"{p}/{k}": v for p, runs in data.items() for k, v in runs.items()}
    if not any(v.size for v in every.values()):
        return _empty("no recorded cosines", title)
    xlim, edges, width = _cosine_axis(every, S, bins, xlim)
    ncols = max(1, min(ncols, len(data)))
    nrows = -(-len(data) // ncols)
    fig = _figure(4.2 * ncols, 3.3 * nrows + 0.5)
    axes = np.atleast_1d(np.asarray(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False))).ravel()
    top = 0.0
    for ax, (name, runs) in zip(axes, data.items(), strict=False):
        top = max(top, _draw_distribution(ax, runs, S, xlim, edges, width, kind))
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax.tick_params(labelsize=8)
    for i in range(len(data), len(axes)):
        axes[i].set_axis_off()
        if i - ncols >= 0:
            axes[i - ncols].xaxis.set_tick_params(labelbottom=True)  # the panel above an empty slot is the lowest
    axes[0].set_ylim(0, max(top, 1e-9) * 1.35)  # shared y: room for each panel's legend
    fig.supxlabel(_COS_LABEL, fontsize=9)
    fig.supylabel(f"share of cosines per bin (%, bin width {width:.3g})", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


# --- (d) S-conflict scores ---------------------------------------------------------------------------------
def score_bars(
    profile: ConflictProfile,
    k: int | None = None,
    S: float | None = None,
    *,
    branched: Sequence[str] | None = None,
    max_layers: int = 40,
    score: str = "s-conflict",
) -> Figure:
    """S-conflict score (or ``score="interference"``) of every shared layer, highest first, with the branched
    layers marked and each bar labelled with its ``p_top_k`` (:meth:`recon.ConflictProfile.confidence`).

    The branched layers are ``branched`` when given (e.g. a split plan's layers), else the top ``k``. With
    more than ``max_layers`` layers, the highest-scoring ``max_layers`` are drawn (plus any branched ones).
    """
    S = profile.S if S is None else S
    title = f"S-conflict scores (S = {S:g})" if score == "s-conflict" else "interference scores"
    if not profile.layers:
        return _empty("no shared layers", title)
    scores = profile.scores(S, score=score, k=k or None)
    marked = list(branched) if branched is not None else list(scores.index[: k or 0])
    ranked = list(scores.index)
    shown = ranked[:max_layers] + [name for name in ranked[max_layers:] if name in marked]
    frame = scores.loc[shown]
    n = len(frame)
    fig = _figure(7.5, 1.5 + 0.24 * n)
    ax = fig.subplots()
    y = np.arange(n)
    colors = [_BRANCHED if name in marked else _KEPT for name in frame.index]
    ax.barh(y, frame["score"], color=colors, height=0.75)
    ax.set_yticks(y, frame.index, fontsize=8)
    ax.invert_yaxis()
    top = int(profile.steps * len(profile.pairs))
    p_name = f"p(top-{scores.attrs['k']})"
    for yi, v, p in zip(y, frame["score"], frame["p_top_k"], strict=True):
        text = f" {int(v)}" if score == "s-conflict" else f" {v:.3g}"
        ax.text(v, yi, f"{text}  {p_name} {p:.2f}", va="center", fontsize=7)
    if branched is None and k and k < n:
        ax.axhline(k - 0.5, color="#000000", ls="--", lw=1.0)
    if score == "s-conflict":
        ax.set_xlim(0, max(top, 1) * 1.35)
        ax.axvline(top, color="#000000", ls=":", lw=0.8)
        what = f"count of cos < {S:g} over {profile.steps} steps x {len(profile.pairs)} pairs (max {top})"
        ax.set_xlabel(f"S-conflict score: {what}")
    else:
        low, high = min(0.0, float(frame["score"].min())), max(0.0, float(frame["score"].max()))
        ax.set_xlim(low - 0.05 * (high - low), high + 0.35 * (high - low) + 1e-12)
        ax.axvline(0, color="#000000", lw=0.8)
        ax.set_xlabel(f"interference: mean over {profile.steps} steps of sum over pairs of -<g_i, g_j>")
    ax.set_ylabel("shared layer (by score)")
    label = f"branched ({len(marked)})" if branched is not None else f"top-{k} (branched)"
    handles = [Patch(color=_BRANCHED, label=label), Patch(color=_KEPT, label="kept shared")]
    ax.legend(handles=handles if marked else handles[1:], fontsize=8, loc="lower right")
    more = f", top {n} of {len(profile.layers)} layers" if n < len(profile.layers) else ""
    ax.set_title(title + more, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


# --- (e) training curves -----------------------------------------------------------------------------------
MetricsLike = Any  # a path to metrics.csv, a DataFrame, or a mapping {label: either}


def _read_metrics(metrics: MetricsLike) -> dict[str, pd.DataFrame]:
    if isinstance(metrics, (str, os.PathLike, pd.DataFrame)):
        metrics = {"": metrics}
    frames = {}
    for label, m in metrics.items():
        frame = m if isinstance(m, pd.DataFrame) else pd.read_csv(Path(m))
        if "epoch" not in frame.columns:
            frame = frame.assign(epoch=np.arange(1, len(frame) + 1))
        frames[str(label)] = frame
    return frames


def split_metric_columns(columns: Sequence[str], tasks: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{task: {"train_loss" | metric: column}}`` for ``train_loss_<task>`` and ``val_<task>_<metric>`` columns.

    Task names may contain underscores: the longest task name that prefixes a column wins.
    """
    out: dict[str, dict[str, str]] = {t: {} for t in tasks}
    by_length = sorted(tasks, key=len, reverse=True)
    for col in columns:
        if col.startswith("train_loss_") and col[len("train_loss_") :] in out:
            out[col[len("train_loss_") :]]["train_loss"] = col
            continue
        if col.startswith("val_"):
            rest = col[4:]
            for t in by_length:
                if rest.startswith(t + "_") and len(rest) > len(t) + 1:
                    out[t][rest[len(t) + 1 :]] = col
                    break
    return out


def _tasks_of(frames: Mapping[str, pd.DataFrame]) -> list[str]:
    seen: dict[str, None] = {}
    for frame in frames.values():
        for col in frame.columns:
            m = re.fullmatch(r"train_loss_(.+)", str(col))
            if m:
                seen[m.group(1)] = None
    return list(seen)


def training_curves(
    metrics: MetricsLike,
    *,
    tasks: Sequence[str] | None = None,
    directions: Mapping[str, Mapping[str, str]] | None = None,
    title: str | None = None,
) -> Figure:
    """Per-task curves per epoch: train loss on the top row, then one row per validation metric.

    Args:
        metrics: a ``metrics.csv`` path or DataFrame, or ``{label: path or DataFrame}`` to overlay several
            runs (a single-task baseline simply has no curves for the other tasks).
        tasks: the columns' tasks, in order (default: from the ``train_loss_<task>`` columns).
        directions: ``{task: {metric: "higher" | "lower"}}`` (a summary.json's ``directions``) for the labels.
    """
    frames = _read_metrics(metrics)
    tasks = list(tasks) if tasks is not None else _tasks_of(frames)
    title = title or "training curves"
    if not tasks or not frames:
        return _empty("no per-task columns (train_loss_<task>) found", title)
    columns = {label: split_metric_columns(list(f.columns), tasks) for label, f in frames.items()}
    names: dict[str, list[str]] = {t: [] for t in tasks}
    for cols in columns.values():
        for t in tasks:
            for name in cols[t]:
                if name != "train_loss" and name not in names[t]:
                    names[t].append(name)
    rows = 1 + max((len(v) for v in names.values()), default=0)
    fig = _figure(3.3 * len(tasks) + 0.4, 2.3 * rows + 0.6)
    axes = np.atleast_2d(np.asarray(fig.subplots(rows, len(tasks), squeeze=False)))
    many = max(len(f) for f in frames.values()) > 30
    for c, t in enumerate(tasks):
        panels = ["train_loss", *names[t]]
        for r in range(rows):
            ax = axes[r, c]
            if r >= len(panels):
                ax.set_axis_off()
                continue
            name = panels[r]
            for i, (label, frame) in enumerate(frames.items()):
                col = columns[label][t].get(name)
                if col is None or frame[col].isna().all():
                    continue
                ax.plot(
                    frame["epoch"],
                    frame[col],
                    marker=None if many else "o",
                    ms=3,
                    lw=1.5,
                    label=label or None,
                    **_style(i),
                )
            direction = (directions or {}).get(t, {}).get(name)
            arrow = {"higher": " (higher is better)", "lower": " (lower is better)"}.get(direction or "", "")
            ax.set_title(f"{t}: " + ("train loss" if name == "train_loss" else f"val {name}{arrow}"), fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if r == len(panels) - 1 or r == rows - 1:
                ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.get_major_locator().set_params(integer=True)
    labels = [label for label in frames if label]
    if labels:
        handles = [Line2D([], [], lw=1.5, marker=None if many else "o", ms=3, **_style(i)) for i in range(len(frames))]
        fig.legend(handles, list(frames), loc="outside lower center", ncols=min(len(frames), 6), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def conflict_share_curves(metrics: MetricsLike, *, title: str | None = None) -> Figure:
    """The ``conflict_share`` column of metrics.csv per epoch (share of shared-layer cosines below 0), overlaid."""
    frames = {k: f for k, f in _read_metrics(metrics).items() if "conflict_share" in f.columns}
    title = title or "share of shared-layer task-pair cosines below 0, per epoch"
    if not frames:
        return _empty("no run recorded conflict_share", title)
    fig = _figure(6.5, 3.6)
    ax = fig.subplots()
    many = max(len(f) for f in frames.values()) > 30
    for i, (label, frame) in enumerate(frames.items()):
        ax.plot(
            frame["epoch"],
            100 * frame["conflict_share"],
            marker=None if many else "o",
            ms=3,
            lw=1.5,
            label=label or None,
            **_style(i),
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("% of cosines < 0")
    ax.set_ylim(0, 100)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    if any(frames):
        ax.legend(fontsize=8)
    return fig


def network_figure(
    usage: dict[str, frozenset[str]],
    tasks: list[str],
    branches: dict[str, list[str]],
    modules: dict[str, Any],
    max_layers: int = 120,
    *,
    groups: Mapping[str, Sequence[Sequence[str]]] | None = None,
):
    """A split network at a glance: layers (rows, in model order) x tasks (columns).

    One grey bar across the tasks that share a layer, one orange cell per task for a branched layer, a blue
    cell for a layer only one task uses. A layer branched into task groups (``groups``, as in
    ``net.meta["recon"]["groups"]``) shows each group's cells in its own shade, labelled with the copy's name.
    Above :data:`MANY_TASKS` tasks a column per task is unreadable: each layer is then one bar of its users,
    cut into its copies (:func:`_network_summary`).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    layers = [name for name, used in usage.items() if used][:max_layers]
    if len(tasks) > MANY_TASKS:
        return _network_summary(usage, tasks, branches, modules, layers, groups or {})
    height = min(0.22 * len(layers) + 1.4, 40.0)
    fig = Figure(figsize=(2.6 + 1.1 * len(tasks), height))
    ax = fig.add_subplot()
    colours = {"shared": "#bbbbbb", "branched": "#E69F00", "task": "#56B4E9"}
    column = {t: i for i, t in enumerate(tasks)}
    for row, name in enumerate(layers):
        used = sorted(column[t] for t in usage[name] if t in column)
        if not used:
            continue
        parts = (groups or {}).get(name)
        if name in branches and parts and any(len(g) > 1 for g in parts):
            for g, group in enumerate(parts):
                shade = _GROUP_SHADES[g % len(_GROUP_SHADES)]
                for t in group:
                    ax.add_patch(Rectangle((column[t] + 0.06, row + 0.1), 0.88, 0.8, color=shade))
                    ax.text(column[t] + 0.5, row + 0.55, group[0], ha="center", va="center", fontsize=5)
        elif name in branches:
            for t in branches[name]:
                ax.add_patch(Rectangle((column[t] + 0.06, row + 0.1), 0.88, 0.8, color=colours["branched"]))
        elif len(used) > 1:
            ax.add_patch(
                Rectangle((used[0] + 0.06, row + 0.1), used[-1] - used[0] + 0.88, 0.8, color=colours["shared"])
            )
        else:
            ax.add_patch(Rectangle((used[0] + 0.06, row + 0.1), 0.88, 0.8, color=colours["task"]))
    ax.set_xlim(0, len(tasks))
    ax.set_ylim(len(layers), 0)
    ax.set_xticks([i + 0.5 for i in range(len(tasks))], tasks)
    ax.xaxis.tick_top()
    labels = [f"{name}  ({type(modules[name]).__name__})" if name in modules else name for name in layers]
    ax.set_yticks([i + 0.5 for i in range(len(layers))], labels, fontsize=7)
    ax.tick_params(length=0)
    for side in ("right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    handles = [
        Patch(color=colours["shared"], label="shared (one copy)"),
        Patch(color=colours["branched"], label="branched (one copy per task)"),
        *(
            [Patch(color=_GROUP_SHADES[1], label="branched into task groups (one copy per shade, named in it)")]
            if groups and any(len(g) > 1 for parts in groups.values() for g in parts)
            else []
        ),
        Patch(color=colours["task"], label="used by one task"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=1, fontsize=7, frameon=False)
    ax.set_title("layers with parameters, in model order", fontsize=9, pad=18)
    fig.tight_layout()
    return fig


_GROUP_SHADES = ("#E69F00", "#B5651D", "#F0C05A", "#8C4A0B", "#D55E00")
MANY_TASKS = 12  # above this many tasks the network figure summarises groups instead of a column per task


def group_label(group: Sequence[str]) -> str:
    """A task group in a few characters: ``left_odd`` or ``left_odd+3`` (its first task and how many more)."""
    return group[0] if len(group) == 1 else f"{group[0]}+{len(group) - 1}"


def _network_summary(
    usage: dict[str, frozenset[str]], tasks: list[str], branches: dict[str, list[str]], modules: dict[str, Any],
    layers: list[str], groups: Mapping[str, Sequence[Sequence[str]]],
) -> Figure:  # fmt: skip
    """The network figure for many tasks: per layer one bar as long as the number of tasks using it, cut into
    one segment per copy (a task group's segment as wide as the group, labelled with :func:`group_label`)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    fig = Figure(figsize=(10.0, min(0.22 * len(layers) + 1.6, 40.0)))
    ax = fig.add_subplot()
    order = {t: i for i, t in enumerate(tasks)}
    for row, name in enumerate(layers):
        users = sorted((t for t in usage[name] if t in order), key=order.get)
        if name in branches:
            parts = groups.get(name) or [[t] for t in branches[name]]
        else:
            parts = [users]
        x = 0.0
        for g, group in enumerate(parts):
            shade = "#bbbbbb" if name not in branches else _GROUP_SHADES[g % len(_GROUP_SHADES)]
            shade = "#56B4E9" if len(users) == 1 else shade
            ax.add_patch(Rectangle((x + 0.05, row + 0.1), len(group) - 0.1, 0.8, color=shade, linewidth=0))
            if len(group) >= 3:
                ax.text(x + len(group) / 2, row + 0.55, group_label(group), ha="center", va="center", fontsize=5)
            x += len(group)
        copies = f"{len(parts)} copies" if name in branches else ("shared" if len(users) > 1 else users[0])
        ax.text(len(tasks) + 0.5, row + 0.55, copies, va="center", fontsize=6)
    ax.set_xlim(0, len(tasks) + 6)
    ax.set_ylim(len(layers), 0)
    ax.set_xticks([0, len(tasks)], ["0", f"{len(tasks)} tasks"], fontsize=7)
    labels = [f"{name}  ({type(modules[name]).__name__})" if name in modules else name for name in layers]
    ax.set_yticks([i + 0.5 for i in range(len(layers))], labels, fontsize=7)
    ax.tick_params(length=0)
    for side in ("right", "top", "left"):
        ax.spines[side].set_visible(False)
    handles = [
        Patch(color="#bbbbbb", label="shared by the tasks that use it (one copy)"),
        Patch(color=_GROUP_SHADES[0], label="branched: one segment per copy, as wide as its task group"),
        Patch(color="#56B4E9", label="used by one task"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=1, fontsize=7, frameon=False)
    ax.set_title(f"layers with parameters, in model order ({len(tasks)} tasks: bars, not columns)", fontsize=9)
    fig.tight_layout()
    return fig


def budget_curve_figure(
    curve: pd.DataFrame | Mapping[str, pd.DataFrame],
    *,
    chosen: tuple[float, float] | None = None,
    title: str | None = None,
    score: str = "s-conflict",
) -> Figure:
    """Score removed against parameters added: the best split at each parameter cost (the Pareto front of
    :func:`recon._plan.budget_curve`), as a step curve; several curves (``{label: frame}``, e.g. per-task
    copies against task groups) share the axes. ``chosen`` marks a plan as (params added in %, score removed).
    Where the curve flattens, more capacity stops removing conflict. ``score``: what the curve removes
    (``"s-conflict"`` or ``"interference"``), for the axis label."""
    curves = dict(curve) if isinstance(curve, Mapping) else {"": curve}
    if not curves or all(len(c) == 0 for c in curves.values()):
        return _empty("no shared layer to branch", title or "budget curve")
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    for i, (label, frame) in enumerate(curves.items()):
        x = 100 * np.asarray(frame["params_fraction"], dtype=float)
        y = np.asarray(frame["score_removed"], dtype=float)
        ax.step(x, y, where="post", label=label or None, **_style(i))
        ax.plot(x, y, "o", markersize=3, color=_style(i)["color"])
    if chosen is not None:
        ax.plot([chosen[0]], [chosen[1]], "*", markersize=12, color="black", label="chosen plan")
    ax.set_xlabel("parameters added (% of the model)")
    ax.set_ylabel("S-conflict score removed" if score == "s-conflict" else "interference removed")
    ax.grid(alpha=0.3)
    if len(curves) > 1 or chosen is not None:
        ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or "what a split removes for what it costs", fontsize=10)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file renamed into place: an interrupt leaves no half
    image) and close it; returns the path."""
    from recon._io import save_figure as write

    out = write(path, fig, dpi=dpi)
    plt = __getattr__("plt")
    plt.close(fig)
    return out
