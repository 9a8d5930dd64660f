"""Per-step layer-wise cosines from per-task gradients: the profiler's inner kernel.

For each shared layer k, the K x K Gram matrix ``G_k = J_k J_k^T`` of the task gradients restricted to the
layer's parameters gives every pairwise cosine at once: ``cos_ij = G_ij / sqrt(G_ii G_jj)``.

On the CPU each parameter's gradients are streamed through one small reusable block (``K x block`` floats,
about 512 KiB, so it stays in cache): ``torch.stack(..., out=block)`` then ``gram.addmm_(block, block.T)``. Each
gradient element is read from memory once, nothing of parameter size is allocated (no ``K x numel`` stack, no
zero tensors for tasks that do not reach a parameter), and the float32 sum is blocked, which is also more
accurate than one long dot product. These block ops are too small to gain from intra-op threads (at most 1.3x
on 2 cores, measured) but each would open an OpenMP parallel region, and on a busy machine every region can
stall on a descheduled thread (the kernel took 4.5 s instead of 0.2 s at K=8 under load): so the CPU path runs
with one intra-op thread and restores the caller's setting afterwards. On other devices one ``stack`` +
``addmm_`` per parameter is used: launches cost more there than bandwidth.
"""

from __future__ import annotations

import torch

_BLOCK_BYTES = 1 << 19  # per-block working set on the CPU (K rows together)


def layer_cosines(
    rows: list[list[torch.Tensor | None]],
    layer_params: list[tuple[int, int]],
    n_layers: int,
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """``(layers, pairs)`` cosines from per-parameter K x K Gram matrices summed per layer; NaN if a norm is 0.

    ``rows[k][i]`` is task k's gradient of parameter i (None where the task does not reach it: a zero row);
    ``layer_params`` lists ``(layer index, parameter index)``; ``pair_i, pair_j`` index the task pairs.
    """
    threads = torch.get_num_threads()
    single = torch.device(device).type == "cpu" and threads > 1
    if single:
        torch.set_num_threads(1)
    try:
        gram = _layer_grams(rows, layer_params, n_layers, torch.device(device))
    finally:
        if single:
            torch.set_num_threads(threads)
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # (L, K)
    denom = norms[:, pair_i] * norms[:, pair_j]
    cos = gram[:, pair_i, pair_j] / denom
    return torch.where(denom > 0, cos, torch.full_like(cos, float("nan")))


def _layer_grams(
    rows: list[list[torch.Tensor | None]], layer_params: list[tuple[int, int]], n_layers: int, device: torch.device
) -> torch.Tensor:
    """``(layers, K, K)`` float32 Gram matrices of the task gradients, summed over each layer's parameters."""
    K = len(rows)
    gram = torch.zeros((n_layers, K, K), dtype=torch.float32, device=device)
    block = max(1024, _BLOCK_BYTES // (4 * K))
    work: torch.Tensor | None = None
    for layer, i in layer_params:
        present = [k for k in range(K) if rows[k][i] is not None]
        if not present:
            continue
        flats = [rows[k][i].reshape(-1) for k in present]
        p = len(present)
        dtype = torch.promote_types(flats[0].dtype, torch.float32)
        direct = p == K and dtype == torch.float32 and flats[0].device == gram.device
        acc = gram[layer] if direct else torch.zeros((p, p), dtype=dtype, device=flats[0].device)
        if flats[0].device.type != "cpu":
            M = torch.stack(flats).to(dtype)
            acc.addmm_(M, M.T)
        else:
            if work is None or work.dtype != dtype:
                work = torch.empty(K * block, dtype=dtype)
            same = flats[0].dtype == dtype
            whole = work[: p * block].view(p, block)
            for pieces in zip(*(f.split(block) for f in flats), strict=True):
                m = pieces[0].numel()
                blk = whole if m == block else work[: p * m].view(p, m)
                if same:
                    torch.stack(pieces, out=blk)
                else:
                    for r, piece in enumerate(pieces):
                        blk[r].copy_(piece)
                acc.addmm_(blk, blk.T)
        if not direct:
            idx = torch.tensor(present, device=gram.device)
            gram[layer].index_put_((idx[:, None], idx[None, :]), acc.to(gram), accumulate=True)
    return gram
