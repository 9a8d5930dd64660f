"""Per-step layer-wise cosines from per-task gradients: the profiler's inner kernel.

For each shared layer k, the K x K Gram matrix ``G_k = J_k J_k^T`` of the task gradients restricted to the
layer's parameters gives every pairwise cosine at once: ``cos_ij = G_ij / sqrt(G_ii G_jj)``.
"""

from __future__ import annotations

import torch


def layer_cosines(
    rows: list[list[torch.Tensor | None]],
    layer_params: list[tuple[int, int]],
    n_layers: int,
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """``(layers, pairs)`` cosines from per-parameter K x K Gram matrices summed per layer; NaN if a norm is 0."""
    K = len(rows)
    gram = torch.zeros((n_layers, K, K), dtype=torch.float32, device=device)
    for layer, i in layer_params:
        grads = [r[i] for r in rows]
        if all(g is None for g in grads):
            continue
        like = next(g for g in grads if g is not None)
        M = torch.stack([(g if g is not None else torch.zeros_like(like)).reshape(-1) for g in grads])
        gram[layer] += (M @ M.T).float()
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # (L, K)
    denom = norms[:, pair_i] * norms[:, pair_j]
    cos = gram[:, pair_i, pair_j] / denom
    return torch.where(denom > 0, cos, torch.full_like(cos, float("nan")))
