"""Every picture recon draws: used by the CLI, ``recon report`` and the notebook.

Each function returns a matplotlib ``Figure`` (nothing is shown or saved here); save it with
``recon._io.save_figure`` or ``fig.savefig``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() in {"", "agg"} else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

if TYPE_CHECKING:
    from recon._profile import ConflictProfile


def conflict_heatmap(profile: ConflictProfile, S: float | None = None, *, max_layers: int = 60) -> Figure:
    """Layers x task pairs, coloured by conflict rate: the share of recorded steps where ``cos < S``."""
    rates = profile.conflict_rates(S)
    S = profile.S if S is None else S
    if len(rates) > max_layers:  # keep the most conflicting layers readable
        order = profile.scores(S).index[:max_layers]
        rates = rates.loc[[layer for layer in rates.index if layer in set(order)]]
    n_layers, n_pairs = rates.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 2.6 + 0.9 * n_pairs), 1.2 + 0.28 * max(n_layers, 1)), constrained_layout=True)
    im = ax.imshow(rates.to_numpy(), aspect="auto", cmap="magma_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(np.arange(n_pairs), rates.columns, rotation=45 if n_pairs > 3 else 0, ha="right" if n_pairs > 3 else "center")
    ax.set_yticks(np.arange(n_layers), rates.index, fontsize=8)
    if n_pairs * n_layers <= 400:
        for (i, j), v in np.ndenumerate(rates.to_numpy()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    ax.set_xlabel("task pair")
    ax.set_title(
        f"conflict rate P(cos < {S:g})\n{profile.steps} steps" + (" (partial)" if profile.partial else ""), fontsize=10
    )
    fig.colorbar(im, ax=ax, label="conflict rate")
    return fig
