"""SegNet and MTAN for the dense benchmarks (NYUv2, Cityscapes), shared by ``nyuv2.py`` and ``cityscapes.py``.

Both follow the SegNet-based networks of MTAN (Liu et al., CVPR 2019, ``lorenmt/mtan``,
``im2im_pred/model_segnet_split.py`` and ``model_segnet_mtan.py``), as reused by CAGrad
(``Cranial-XIX/CAGrad``) and Recon (``moukamisama/Recon``, ``archs/SegNet_recon_arch.py`` and
``archs/MTAN_recon_arch.py``):

* a VGG-16-like encoder of ``L = len(filters)`` levels (conv3x3-BatchNorm-ReLU blocks: 2, 2, 3, 3, 3 per
  level)
  with 2x2 max pooling that keeps its indices, and a mirrored decoder that unpools with those indices;
* :class:`SegNet`: that encoder-decoder shared by every task, then one head per task (conv3x3, conv1x1), the
  "split" multi-task SegNet (Recon's Cityscapes model);
* :class:`MTAN`: the same shared network plus, per task, soft attention masks
  (conv1x1-BN-ReLU-conv1x1-BN-sigmoid) on every level of the encoder and the decoder, with shared
  attention-path convolutions (Recon's NYUv2 model).

Heads output raw logits for segmentation, unconstrained values for depth, and L2-normalised vectors for normal
tasks. ``filters=(64, 128, 256, 512, 512)`` is the papers' network; smaller widths (and fewer levels) make
tiny test models. The input's height and width must be divisible by ``2 ** len(filters)``. The forward has no
data-dependent Python control flow, so ``torch.fx.symbolic_trace`` can rewrite both models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PAPER_FILTERS = (64, 128, 256, 512, 512)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3x3 (padding 1) - BatchNorm - ReLU, MTAN's ``conv_layer``."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


def head(c_in: int, c_out: int) -> nn.Sequential:
    """Task head: conv3x3 then conv1x1, MTAN's ``conv_layer(..., pred=True)``."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 1))


def attention(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """Soft attention mask: conv1x1-BN-ReLU-conv1x1-BN-sigmoid, MTAN's ``att_layer``."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, 1),
        nn.BatchNorm2d(c_mid),
        nn.ReLU(),
        nn.Conv2d(c_mid, c_out, 1),
        nn.BatchNorm2d(c_out),
        nn.Sigmoid(),
    )


def _init(module: nn.Module) -> None:
    """MTAN's initialisation: Xavier-normal convolutions with zero bias, BatchNorm at (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _Trunk(nn.Module):
    """The shared SegNet encoder-decoder and the task heads."""

    def __init__(
        self,
        task_channels: Mapping[str, int],
        filters: Sequence[int],
        unit_norm: Sequence[str],
        in_channels: int,
    ) -> None:
        super().__init__()
        f = [int(c) for c in filters]
        if len(f) < 2 or min(f) < 1:
            raise ValueError(f"filters must list at least two positive widths, got {tuple(filters)}")
        if not task_channels:
            raise ValueError("task_channels must name at least one task")
        self.filters = tuple(f)
        self.tasks = list(task_channels)
        self.unit_norm = [t for t in self.tasks if t in set(unit_norm)]
        levels = len(f)
        self.encoder_block = nn.ModuleList(
            [conv_block(in_channels, f[0])] + [conv_block(f[i], f[i + 1]) for i in range(levels - 1)]
        )
        self.decoder_block = nn.ModuleList(
            [conv_block(f[0], f[0])] + [conv_block(f[i + 1], f[i]) for i in range(levels - 1)]
        )
        # Level 0 and 1 have one extra conv, deeper levels two (VGG-16: 2, 2, 3, 3, 3 convolutions).
        enc = [conv_block(f[0], f[0])]
        dec = [conv_block(f[0], f[0])]
        for i in range(levels - 1):
            if i == 0:
                enc.append(conv_block(f[1], f[1]))
                dec.append(conv_block(f[0], f[0]))
            else:
                enc.append(nn.Sequential(conv_block(f[i + 1], f[i + 1]), conv_block(f[i + 1], f[i + 1])))
                dec.append(nn.Sequential(conv_block(f[i], f[i]), conv_block(f[i], f[i])))
        self.conv_block_enc = nn.ModuleList(enc)
        self.conv_block_dec = nn.ModuleList(dec)
        self.down_sampling = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.up_sampling = nn.MaxUnpool2d(kernel_size=2, stride=2)
        self.heads = nn.ModuleDict({t: head(f[0], int(c)) for t, c in task_channels.items()})

    def _shared(self, x: torch.Tensor):
        """Encoder-decoder; returns the per-level features MTAN's attention reads."""
        levels = len(self.filters)
        enc_pre, enc_post, indices = [], [], []
        for i in range(levels):
            pre = self.encoder_block[i](x)
            post = self.conv_block_enc[i](pre)
            pooled = self.down_sampling(post)
            x = pooled[0]
            enc_pre.append(pre)
            enc_post.append(post)
            indices.append(pooled[1])
        ups, decs = [], []
        for j in range(levels):
            k = levels - 1 - j
            up = self.up_sampling(x, indices[k])
            x = self.conv_block_dec[k](self.decoder_block[k](up))
            ups.append(up)
            decs.append(x)
        return enc_pre, enc_post, ups, decs

    def _predict(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for t in self.tasks:
            y = self.heads[t](features[t])
            if t in self.unit_norm:
                y = F.normalize(y, p=2, dim=1)
            out[t] = y
        return out


class SegNet(_Trunk):
    """Multi-task SegNet with hard parameter sharing: shared encoder-decoder, one head per task.

    ``task_channels`` maps each task to its output channels (e.g. ``{"segmentation": 13, "depth": 1,
    "normal": 3}``); outputs of the tasks in ``unit_norm`` are L2-normalised over channels.
    """

    def __init__(
        self,
        task_channels: Mapping[str, int],
        filters: Sequence[int] = PAPER_FILTERS,
        unit_norm: Sequence[str] = ("normal",),
        in_channels: int = 3,
    ) -> None:
        super().__init__(task_channels, filters, unit_norm, in_channels)
        _init(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        decs = self._shared(x)[3]
        return self._predict({t: decs[-1] for t in self.tasks})


class MTAN(_Trunk):
    """Multi-Task Attention Network on SegNet: the shared network plus per-task attention at every level.

    Task-specific: ``encoder_att.<task>.<level>``, ``decoder_att.<task>.<level>`` and ``heads.<task>``.
    Shared: the SegNet trunk and the attention path's ``encoder_block_att`` / ``decoder_block_att``.
    """

    def __init__(
        self,
        task_channels: Mapping[str, int],
        filters: Sequence[int] = PAPER_FILTERS,
        unit_norm: Sequence[str] = ("normal",),
        in_channels: int = 3,
    ) -> None:
        super().__init__(task_channels, filters, unit_norm, in_channels)
        f = self.filters
        levels = len(f)
        last = levels - 1
        self.encoder_att = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    [attention(f[0], f[0], f[0])] + [attention(2 * f[j], f[j], f[j]) for j in range(1, levels)]
                )
                for t in self.tasks
            }
        )

        # decoder_att[k] gates the decoder's level-k output (f[k-1] channels; f[0] at level 0). Its input is
        # the unpooled feature (f[k]) concatenated with the attention path (f[k-1]; f[last] at the deepest
        # level, where MTAN's f[3] == f[4]).
        def dec_att(k: int) -> nn.Sequential:
            if k == 0:
                return attention(2 * f[0], f[0], f[0])
            c_path = f[last] if k == last else f[k - 1]
            return attention(f[k] + c_path, f[k - 1], f[k - 1])

        self.decoder_att = nn.ModuleDict({t: nn.ModuleList([dec_att(k) for k in range(levels)]) for t in self.tasks})
        self.encoder_block_att = nn.ModuleList(
            [conv_block(f[j], f[j + 1]) for j in range(last)] + [conv_block(f[last], f[last])]
        )
        self.decoder_block_att = nn.ModuleList(
            [conv_block(f[0], f[0])]
            + [conv_block(f[k], f[k - 1]) for k in range(1, last)]
            + [conv_block(f[last], f[last])]
        )
        self.att_down = nn.MaxPool2d(kernel_size=2, stride=2)
        self.att_up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        _init(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        enc_pre, enc_post, ups, decs = self._shared(x)
        levels = len(self.filters)
        features = {}
        for t in self.tasks:
            a = enc_pre[0]
            for j in range(levels):
                inp = enc_pre[0] if j == 0 else torch.cat([enc_pre[j], a], dim=1)
                mask = self.encoder_att[t][j](inp)
                a = self.att_down(self.encoder_block_att[j](mask * enc_post[j]))
            for j in range(levels):
                k = levels - 1 - j
                a = self.decoder_block_att[k](self.att_up(a))
                mask = self.decoder_att[t][k](torch.cat([ups[j], a], dim=1))
                a = mask * decs[j]
            features[t] = a
        return self._predict(features)


def build(arch: str, task_channels: Mapping[str, int], filters: Sequence[int] = PAPER_FILTERS) -> nn.Module:
    """``"mtan"`` or ``"segnet"``; anything else is a ValueError naming the choices."""
    arch = arch.lower()
    if arch == "mtan":
        return MTAN(task_channels, filters)
    if arch == "segnet":
        return SegNet(task_channels, filters)
    raise ValueError(f"unknown architecture {arch!r}; choose 'mtan' or 'segnet'")
