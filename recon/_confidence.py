"""How stable a profile's ranking is: a bootstrap over the recorded steps.

A layer's score (S-conflict, Definition 3 of Shi et al., ICLR 2023, or interference) is a sum over recorded
steps of a per-step value, so the ranking it gives is a statistic of the steps the warm-up happened to record.
Efron's bootstrap (Efron, "Bootstrap methods: another look at the jackknife", Ann. Statist. 1979) resamples the
T recorded steps with replacement, recomputes every layer's score on each resample and reports, per layer, the
share of resamples in which it is among the k highest: ``p_top_k``. A layer with ``p_top_k`` near 1 is in the
top k whatever steps were recorded; one near 0.5 is there by the luck of the draw, and a longer profile (more
steps) narrows it. Only recorded steps are resampled, so a profile that records every N-th step bootstraps
over the steps it has.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["CONFIDENCE_K", "RESAMPLES", "STABLE", "resampled_steps", "top_k_probability", "unstable"]

CONFIDENCE_K = 4  # the k of ``p_top_k`` when none is asked for (the CLI's usual --top-k 4)
RESAMPLES = 1000
STABLE = 0.8  # a chosen layer below this probability makes the chosen set "unstable"
_BLOCK_ELEMENTS = 2_000_000  # resampled step indices held at once


def resampled_steps(n_steps: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of ``(b, n_steps)`` step indices drawn uniformly with replacement, ``resamples`` rows in all,
    from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // max(n_steps, 1))
    for start in range(0, resamples, block):
        yield rng.integers(0, n_steps, size=(min(block, resamples - start), n_steps))


def top_k_probability(per_step: np.ndarray, k: int, *, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Per layer, the share of bootstrap resamples of the recorded steps in which it ranks among the ``k``
    highest (ties broken by layer order, as :meth:`recon.ConflictProfile.scores` breaks them).

    Args:
        per_step: ``(steps, layers)``, each recorded step's contribution to each layer's score.
        k: the size of the set (clipped to the number of layers).
        resamples: bootstrap resamples; seeded by ``seed``, so the result is reproducible.

    Each resample's scores are one matrix product (resample counts ``(b, T)`` times ``per_step``), so the whole
    bootstrap is a few vectorised numpy calls per block of resamples. NaN when no step was recorded.
    """
    per_step = np.asarray(per_step, dtype=np.float64)
    T, L = per_step.shape
    if T == 0 or L == 0:
        return np.full(L, np.nan)
    k = max(0, min(int(k), L))
    hits = np.zeros(L, dtype=np.int64)
    for idx in resampled_steps(T, resamples, seed):
        b = idx.shape[0]
        counts = np.bincount((idx + T * np.arange(b)[:, None]).ravel(), minlength=b * T).reshape(b, T)
        totals = counts.astype(np.float64) @ per_step
        top = np.argsort(-totals, axis=1, kind="stable")[:, :k]
        hits += np.bincount(top.ravel(), minlength=L)
    return hits / resamples


def unstable(chosen: dict[str, float], k: int, *, threshold: float | None = None) -> str | None:
    """One warning line when a chosen layer's ``p_top_k`` is below ``threshold`` (default :data:`STABLE`),
    else None."""
    threshold = STABLE if threshold is None else threshold
    weak = {layer: p for layer, p in chosen.items() if p == p and p < threshold}  # p == p: not NaN
    if not weak:
        return None
    listed = ", ".join(f"{layer}: {p:.2f}" for layer, p in sorted(weak.items(), key=lambda kv: kv[1]))
    return f"the top-{k} is unstable over steps ({listed}); profile longer with --steps"
