"""Per-step layer-wise cosines of task gradients: the profiler's inner kernel.

For each shared layer k, the K x K Gram matrix ``G_k = J_k J_k^T`` of the task gradients restricted to the
layer's parameters gives every pairwise cosine at once: ``cos_ij = G_ij / sqrt(G_ii G_jj)``.

The task gradients arrive as the ``(K, P)`` matrix ``J`` of :func:`recon._backward.task_gradients`, whose
columns follow the parameters, so each layer is one or a few column spans of ``J`` and its Gram matrix is
``J[:, span] @ J[:, span].T`` with no copy. On the CPU each span is cut into column blocks of about 2 MiB
(``K x block`` floats): one ``addmm_`` per block reads each gradient element once while it is in cache, and the
float32 sum is blocked, which is also more accurate than one long dot product; a whole-span product on large
layers was 1.4x slower at K = 8 (measured). These block products are too small to gain from intra-op threads
but each would open an OpenMP parallel region, and on a busy machine every region can stall on a descheduled
thread (4.5 s instead of 0.2 s at K = 8 under load, measured), so the CPU path runs with one intra-op thread
and restores the caller's setting afterwards. On other devices one ``addmm_`` per span: launches cost more there
than bandwidth.

A parameter of a shared layer that only one task reached this step is not in ``J``; it adds its squared norm
to that task's diagonal entry and nothing else. Task gradients made in chunks (:class:`recon._chunks.TaskChunks`)
bring their per-parameter Gram matrices instead of J: a layer's is the sum of its parameters'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from recon._backward import TaskGradients
from recon._chunks import TaskChunks, one_thread

_BLOCK_BYTES = 1 << 21  # per-block working set on the CPU (K rows together)


class LayerCosines:
    """``(layers, pairs)`` cosines of one step's task gradients, NaN where a task's layer gradient is zero
    (:meth:`grams`: the Gram matrices they come from).

    Args:
        params: the parameters ``TaskGradients`` refers to by index.
        layer_params: ``(layer index, parameter index)`` for every parameter of a measured layer.
        n_layers: number of measured layers.
        n_tasks: K; the pairs are ``torch.triu_indices(K, K, 1)`` in that order.
    """

    def __init__(
        self, params: Sequence[Tensor], layer_params: Sequence[tuple[int, int]], n_layers: int, n_tasks: int
    ) -> None:
        self._sizes = [p.numel() for p in params]
        self._layer_of = dict((i, layer) for layer, i in layer_params)
        self.n_layers = n_layers
        self.n_tasks = n_tasks
        self._spans: list[tuple[int, int, int]] | None = None
        self._shared_idx: list[int] | None = None

    def _layer_spans(self, shared_idx: list[int]) -> list[tuple[int, int, int]]:
        """``(layer, start, stop)`` column spans of ``J``, adjacent parameters of a layer merged."""
        if shared_idx != self._shared_idx:
            spans: list[tuple[int, int, int]] = []
            offset = 0
            for i in shared_idx:
                n = self._sizes[i]
                layer = self._layer_of.get(i)
                if layer is not None:
                    if spans and spans[-1][0] == layer and spans[-1][2] == offset:
                        spans[-1] = (layer, spans[-1][1], offset + n)
                    else:
                        spans.append((layer, offset, offset + n))
                offset += n
            self._spans, self._shared_idx = spans, list(shared_idx)
        return self._spans

    def __call__(self, grads: TaskGradients | TaskChunks, device: torch.device) -> Tensor:
        return gram_cosines(self.grams(grads, device))

    def grams(self, grads: TaskGradients | TaskChunks, device: torch.device) -> Tensor:
        """``(layers, K, K)``: each shared layer's Gram matrix ``G_ij = <g_i, g_j>`` of the step's task gradients."""
        K = self.n_tasks
        gram = torch.zeros((self.n_layers, K, K), dtype=torch.float32, device=device)
        J = grads.J if isinstance(grads, TaskGradients) else None
        if isinstance(grads, TaskChunks):  # per-parameter Gram matrices, summed per layer
            per_param = grads.param_grams().to(device)
            for j, i in enumerate(grads.shared_idx):
                layer = self._layer_of.get(i)
                if layer is not None:
                    gram[layer] += per_param[j]
        elif J is not None:
            spans = self._layer_spans(grads.shared_idx)
            if J.device.type == "cpu":
                with one_thread(J.device):
                    _cpu_grams(J, spans, gram)
            else:
                for layer, start, stop in spans:
                    block = J[:, start:stop].to(torch.promote_types(J.dtype, torch.float32))
                    gram[layer] += (block @ block.T).to(gram)
        for i, k in grads.own:  # a layer's parameter one task reached: its own diagonal entry only
            layer = self._layer_of.get(i)
            if layer is not None:
                g = grads.rows[k][i]
                g = g.to_dense() if g.layout != torch.strided else g
                gram[layer, k, k] += g.float().square().sum().to(device)
        return gram


def _cpu_grams(J: Tensor, spans: list[tuple[int, int, int]], gram: Tensor) -> None:
    K = J.shape[0]
    block = max(4096, _BLOCK_BYTES // (J.element_size() * K))
    dtype = torch.promote_types(J.dtype, torch.float32)  # half precision gradients: float32 sums
    direct = dtype == gram.dtype
    for layer, start, stop in spans:
        acc = gram[layer] if direct else torch.zeros((K, K), dtype=dtype)
        for c in range(start, stop, block):
            view = J[:, c : min(c + block, stop)].to(dtype)
            acc.addmm_(view, view.T)
        if not direct:
            gram[layer] += acc.to(gram)


def gram_cosines(gram: Tensor) -> Tensor:
    """``(L, pairs)`` cosines from ``(L, K, K)`` Gram matrices, pairs in ``triu_indices(K, K, 1)`` order;
    NaN where either norm is zero."""
    K = gram.shape[-1]
    pair_i, pair_j = torch.triu_indices(K, K, offset=1, device=gram.device)
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # (L, K)
    denom = norms[:, pair_i] * norms[:, pair_j]
    cos = gram[:, pair_i, pair_j] / denom
    return torch.where(denom > 0, cos, torch.full_like(cos, float("nan")))
