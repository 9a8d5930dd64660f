"""Dense-prediction losses and metrics of the multi-task benchmarks (NYUv2, Cityscapes).

The conventions are those of MTAN (Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention",
CVPR 2019; code ``lorenmt/mtan``, ``im2im_pred/utils.py``), which CAGrad (``Cranial-XIX/CAGrad``,
``nyuv2/utils.py`` and ``cityscapes/utils.py``), Nash-MTL and Recon (``moukamisama/Recon``,
``losses/common_loss.py`` and ``criterion/criteria.py``) reuse:

* a pixel is **valid** for segmentation when its label is not ``-1`` (labels outside ``[0, C)`` are ignored
  by the metrics too, as CAGrad's ``ConfMatrix`` does); for depth and normals when the target's sum over
  channels is not zero (``torch.sum(target, dim=1) != 0``: depth 0 and the all-zero normal mark missing
  ground truth).
* segmentation: cross-entropy over valid pixels; mIoU and pixel accuracy.
* depth: L1 over valid pixels; absolute error ``|p - d|`` and relative error ``|p - d| / |d|``.
* surface normals: ``1 - <p/|p|, n>`` over valid pixels; angle error ``acos(<p/|p|, n>)`` in degrees: mean,
  median, and the percentage of valid pixels with error strictly below 11.25, 22.5 and 30 degrees.

Shapes: segmentation output ``(B, C, H, W)`` logits (log-probabilities work too: ``log_softmax`` is
idempotent), target ``(B, H, W)`` integer labels; depth output and target ``(B, 1, H, W)`` (or ``(B, H, W)``);
normal output and target ``(B, 3, H, W)``.

How the metrics aggregate over a validation set
------------------------------------------------
Every metric object here is a plain ``fn(output, target) -> float`` (what a recipe's ``metrics`` dict needs)
and also offers ``reset()``, ``update(output, target)`` and ``compute()`` to accumulate over a whole set; see
:func:`evaluate`.

* ``fn(output, target)`` on a batch returns the **mean over the batch's images of each image's value**, so a
  trainer that averages per-batch values weighted by batch size gets the mean over images, whatever the batch
  size. An unweighted mean over batches differs only through a smaller last batch (not at all with batch size
  1, the recipes' validation default).
* ``compute()`` after ``update`` on every batch gives the papers' whole-set numbers: for depth and normals the
  mean over images of per-image values (exactly what Recon's evaluation computes, with validation batch size
  1; MTAN and CAGrad average per-batch values over batches of 2 or 8 images, which differs slightly); for
  segmentation the mIoU and pixel accuracy of one confusion matrix accumulated over every valid pixel of the
  set (CAGrad, Nash-MTL, Recon, and MTAN's current code, which keeps the old formula as "legacy").
* The per-image segmentation values that ``fn(output, target)`` returns follow MTAN's original ("legacy")
  ``compute_miou``/``compute_iou``: each image's mIoU is the mean IoU over the classes present in that image's
  prediction or ground truth on valid pixels, then averaged over images. This is **not** the whole-set mIoU:
  a trainer that only averages per-batch values reports MTAN-legacy numbers for segmentation, which are
  not comparable to the CAGrad/Nash-MTL/Recon tables. Use ``update``/``compute`` (or :func:`evaluate`) for
  those.

Whole-set mIoU: ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` over all valid pixels of the set, averaged over the
classes with ``TP_c + FP_c + FN_c > 0``; a class that never occurs in ground truth or prediction is skipped
(CAGrad's ``ConfMatrix`` averages over all ``C`` classes and returns NaN in that case; the two agree whenever
theirs is defined). Whole-set pixel accuracy: correct valid pixels / valid pixels.

A batch or image with no valid pixel contributes nothing to a metric; a metric with nothing at all to average
returns NaN. The losses return 0 (with a gradient of zeros) on a batch with no valid pixel instead of the
reference code's 0/0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from recon._errors import ReconError

IGNORE_INDEX = -1
"""Segmentation label of pixels without ground truth (MTAN's preprocessed NYUv2 and Cityscapes)."""

WITHIN_DEGREES = (11.25, 22.5, 30.0)
"""The normal-angle thresholds of the papers' tables."""

__all__ = [
    "IGNORE_INDEX",
    "WITHIN_DEGREES",
    "ConfusionMetric",
    "DepthAbsError",
    "DepthRelError",
    "MeanIoU",
    "NormalMeanAngle",
    "NormalMedianAngle",
    "NormalWithin",
    "PerImageMetric",
    "PixelAccuracy",
    "confusion_matrix",
    "depth_abs_error",
    "depth_loss",
    "depth_metrics",
    "depth_rel_error",
    "mean_iou",
    "miou_from_confusion",
    "normal_angle_errors",
    "normal_loss",
    "normal_mean_angle",
    "normal_median_angle",
    "normal_metrics",
    "normal_within",
    "pixel_accuracy",
    "pixel_accuracy_from_confusion",
    "segmentation_loss",
    "segmentation_metrics",
]


# --------------------------------------------------------------------------------------------- shapes


def _as_4d(x: torch.Tensor, what: str) -> torch.Tensor:
    """``(B, H, W)`` -> ``(B, 1, H, W)``; ``(B, C, H, W)`` unchanged; anything else is an error."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() != 4:
        raise ReconError(f"{what} has shape {tuple(x.shape)}; expected (B, C, H, W) or (B, H, W)")
    return x


def _check_same_hw(output: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if output.shape[0] != target.shape[0] or output.shape[-2:] != target.shape[-2:]:
        raise ReconError(
            f"{what}: output {tuple(output.shape)} and target {tuple(target.shape)} differ in batch or "
            "spatial size; predict at the target's resolution"
        )


def _depth_pair(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    output, target = _as_4d(output, "depth output"), _as_4d(target, "depth target")
    _check_same_hw(output, target, "depth")
    if output.shape[1] != 1 or target.shape[1] != 1:
        raise ReconError(f"depth: output {tuple(output.shape)} / target {tuple(target.shape)} must have one channel")
    return output, target


def _normal_pair(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if output.dim() != 4 or target.dim() != 4 or output.shape[1] != 3 or target.shape[1] != 3:
        raise ReconError(f"normal: output {tuple(output.shape)} / target {tuple(target.shape)} must be (B, 3, H, W)")
    _check_same_hw(output, target, "normal")
    return output, target


def _labels(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels ``argmax`` over classes and the target as int64, both ``(B, H, W)``."""
    if output.dim() != 4:
        raise ReconError(f"segmentation output has shape {tuple(output.shape)}; expected (B, C, H, W) logits")
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3:
        raise ReconError(f"segmentation target has shape {tuple(target.shape)}; expected (B, H, W) labels")
    _check_same_hw(output, target, "segmentation")
    return output.argmax(dim=1), target.long()


# --------------------------------------------------------------------------------------------- losses


def segmentation_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over pixels whose label is not ``-1``.

    MTAN ``model_fit(..., 'semantic')``: ``F.nll_loss(log_softmax(output), target, ignore_index=-1)``;
    here ``F.cross_entropy`` on logits, the same value. Returns 0 when no pixel is labelled (the reference:
    NaN).
    """
    target = target.long()
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    total = F.cross_entropy(output, target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (target != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def depth_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 error averaged over valid pixels (target depth != 0).

    MTAN ``model_fit(..., 'depth')``: ``sum(|p - d| * mask) / count(mask)`` with
    ``mask = (sum(target, dim=1) != 0)``. Returns 0 when no pixel is valid (the reference: NaN).
    """
    output, target = _depth_pair(output, target)
    mask = (target.sum(dim=1, keepdim=True) != 0).to(output.dtype)
    return ((output - target).abs() * mask).sum() / mask.sum().clamp(min=1)


def normal_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - <p/|p|, n>`` averaged over valid pixels (target normal's channel sum != 0).

    MTAN ``model_fit(..., 'normal')``: ``1 - sum(p * n * mask) / count(mask)``, with ``p`` already
    L2-normalised by the network's head. Here ``p`` is normalised inside the loss as well (a no-op for a
    normalised head), so the loss is 1 - cosine for the unit-length ground-truth normals of the preprocessed
    data; the target is used as stored. Returns 0 when no pixel is valid.
    """
    output, target = _normal_pair(output, target)
    mask = (target.sum(dim=1) != 0).to(output.dtype)
    dot = (F.normalize(output, p=2, dim=1) * target).sum(dim=1)
    return ((1 - dot) * mask).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------- segmentation


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, *, per_image: bool = False
) -> torch.Tensor:
    """Counts ``M[true, predicted]`` over valid pixels (target in ``[0, num_classes)``), int64.

    ``pred`` and ``target`` are label maps of the same shape; with ``per_image`` the first dimension indexes
    images and the result is ``(B, C, C)``, else ``(C, C)`` over everything.
    """
    n = num_classes
    pred, target = pred.long(), target.long()
    valid = (target >= 0) & (target < n)
    if per_image:
        b = pred.shape[0]
        image = torch.arange(b, device=pred.device).view(b, *([1] * (pred.dim() - 1))).expand_as(pred)
        idx = image[valid] * n * n + target[valid] * n + pred[valid]
        return torch.bincount(idx, minlength=b * n * n).reshape(b, n, n)
    idx = target[valid] * n + pred[valid]
    return torch.bincount(idx, minlength=n * n).reshape(n, n)


def _iou_parts(conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conf = conf.double()
    inter = torch.diagonal(conf, dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - inter
    return inter, union


def miou_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Mean IoU over the classes with a non-empty union; ``conf`` is ``(C, C)`` or batched ``(B, C, C)``.

    NaN where no class occurs at all (no valid pixel).
    """
    inter, union = _iou_parts(conf)
    present = union > 0
    iou = torch.where(present, inter / union.clamp(min=1), torch.zeros_like(inter))
    return iou.sum(-1) / present.sum(-1)  # 0/0 -> NaN


def pixel_accuracy_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Correct valid pixels over valid pixels; ``conf`` is ``(C, C)`` or ``(B, C, C)``. NaN with no valid
    pixel."""
    conf = conf.double()
    return torch.diagonal(conf, dim1=-2, dim2=-1).sum(-1) / conf.sum((-2, -1))


@torch.no_grad()
def _per_image_miou(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred, labels = _labels(output, target)
    values = miou_from_confusion(confusion_matrix(pred, labels, output.shape[1], per_image=True))
    return values[~values.isnan()]


@torch.no_grad()
def _per_image_pixel_accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred, labels = _labels(output, target)
    values = pixel_accuracy_from_confusion(confusion_matrix(pred, labels, output.shape[1], per_image=True))
    return values[~values.isnan()]


def _mean(values: torch.Tensor) -> float:
    return values.mean().item() if values.numel() else math.nan


def mean_iou(output: torch.Tensor, target: torch.Tensor) -> float:
    """Per-image mIoU averaged over the batch's images (MTAN's legacy ``compute_miou``).

    Each image: mean over classes ``c`` with a non-empty union (valid pixels where the prediction or the label
    is ``c``) of intersection / union. Not the whole-set mIoU: see :class:`MeanIoU`.
    """
    return _mean(_per_image_miou(output, target))


def pixel_accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """Per-image pixel accuracy on valid pixels, averaged over the batch's images (MTAN's legacy
    ``compute_iou``)."""
    return _mean(_per_image_pixel_accuracy(output, target))


# --------------------------------------------------------------------------------------------- depth


@torch.no_grad()
def _per_image_depth(output: torch.Tensor, target: torch.Tensor, relative: bool) -> torch.Tensor:
    output, target = _depth_pair(output.detach(), target)
    output, target = output[:, 0].double(), target[:, 0].double()
    mask = target != 0
    err = (output - target).abs()
    if relative:
        err = err / target.abs().masked_fill(~mask, 1.0)
    count = mask.sum(dim=(-2, -1))
    total = (err * mask).sum(dim=(-2, -1))
    keep = count > 0
    return total[keep] / count[keep]


def depth_abs_error(output: torch.Tensor, target: torch.Tensor) -> float:
    """Mean ``|p - d|`` over each image's valid pixels (d != 0), averaged over the batch's images.

    MTAN/CAGrad/Recon ``depth_error`` (abs part), computed per image.
    """
    return _mean(_per_image_depth(output, target, relative=False))


def depth_rel_error(output: torch.Tensor, target: torch.Tensor) -> float:
    """Mean ``|p - d| / |d|`` over each image's valid pixels, averaged over the batch's images.

    MTAN/CAGrad ``depth_error`` (rel part; Recon's ``depth_metric`` divides by ``|d|`` as here).
    """
    return _mean(_per_image_depth(output, target, relative=True))


# ------------------------------------------------------------------------------------------- normals


@torch.no_grad()
def normal_angle_errors(output: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the angle errors in degrees at its valid pixels (float64, 1-D each).

    ``acos(clamp(<p/|p|, n>, -1, 1))`` as in MTAN's ``normal_error`` (computed here in float64).
    """
    output, target = _normal_pair(output.detach(), target)
    dot = (F.normalize(output.double(), p=2, dim=1) * target.double()).sum(dim=1)
    angle = torch.rad2deg(torch.acos(dot.clamp(-1.0, 1.0)))
    mask = target.sum(dim=1) != 0
    return [angle[i][mask[i]] for i in range(angle.shape[0])]


def _median(x: torch.Tensor) -> torch.Tensor:
    """``numpy.median``: the mean of the two middle values for an even count (``torch.median`` takes the
    lower)."""
    s, _ = torch.sort(x)
    n = s.numel()
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _per_image_normal(output: torch.Tensor, target: torch.Tensor, stat: Callable) -> torch.Tensor:
    values = [stat(e) for e in normal_angle_errors(output, target) if e.numel()]
    if not values:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])


def normal_mean_angle(output: torch.Tensor, target: torch.Tensor) -> float:
    """Mean angle error (degrees) over each image's valid pixels, averaged over the batch's images."""
    return _mean(_per_image_normal(output, target, torch.mean))


def normal_median_angle(output: torch.Tensor, target: torch.Tensor) -> float:
    """Median angle error (degrees, ``numpy.median`` convention) per image, averaged over the batch's
    images."""
    return _mean(_per_image_normal(output, target, _median))


def normal_within(output: torch.Tensor, target: torch.Tensor, degrees: float) -> float:
    """Percentage (0-100) of each image's valid pixels with angle error strictly below ``degrees``, averaged.

    MTAN returns the fraction ``mean(error < t)``; the papers' tables print it as a percentage, as here.
    """
    return _mean(_per_image_normal(output, target, lambda e: (e < degrees).double().mean() * 100))


# ------------------------------------------------------------------------------ accumulating metrics


class PerImageMetric:
    """A metric that is a mean over images of a per-image value.

    ``metric(output, target)`` returns the batch's mean (pure: no state changes); ``reset()``,
    ``update(output, target)`` and ``compute()`` give the mean over every image seen since ``reset()`` (NaN if
    none).
    """

    def __init__(self, per_image: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str) -> None:
        self._per_image = per_image
        self.name = name
        self.reset()

    def reset(self) -> None:
        self._sum = 0.0
        self._count = 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> float:
        return _mean(self._per_image(output, target))

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        values = self._per_image(output, target)
        self._sum += values.sum().item()
        self._count += values.numel()

    def compute(self) -> float:
        return self._sum / self._count if self._count else math.nan

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class ConfusionMetric(PerImageMetric):
    """Segmentation metric: per-image legacy value per batch, whole-set confusion-matrix value from
    ``compute()``.

    With ``whole_set=False``, ``compute()`` returns the mean of the per-image values instead (MTAN's legacy
    formula).
    """

    def __init__(
        self,
        per_image: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        from_confusion: Callable[[torch.Tensor], torch.Tensor],
        name: str,
        *,
        whole_set: bool = True,
    ) -> None:
        self._from_confusion = from_confusion
        self.whole_set = whole_set
        super().__init__(per_image, name)

    def reset(self) -> None:
        super().reset()
        self.confusion: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if not self.whole_set:
            super().update(output, target)
            return
        pred, labels = _labels(output, target)
        conf = confusion_matrix(pred, labels, output.shape[1]).cpu()
        if self.confusion is None:
            self.confusion = conf
        elif self.confusion.shape != conf.shape:
            raise ReconError(
                f"{self.name}: the model predicted {output.shape[1]} classes after "
                f"{self.confusion.shape[0]}; call reset() between evaluations of different models"
            )
        else:
            self.confusion += conf

    def compute(self) -> float:
        if not self.whole_set:
            return super().compute()
        if self.confusion is None:
            return math.nan
        return self._from_confusion(self.confusion).item()


class MeanIoU(ConfusionMetric):
    """mIoU: batch value = per-image mIoU averaged (:func:`mean_iou`); ``compute()`` = whole-set mIoU."""

    def __init__(self, *, whole_set: bool = True) -> None:
        super().__init__(_per_image_miou, miou_from_confusion, "mIoU", whole_set=whole_set)


class PixelAccuracy(ConfusionMetric):
    """Pixel accuracy: batch value = per-image accuracy averaged; ``compute()`` = whole-set accuracy."""

    def __init__(self, *, whole_set: bool = True) -> None:
        super().__init__(
            _per_image_pixel_accuracy, pixel_accuracy_from_confusion, "pixel accuracy", whole_set=whole_set
        )


class DepthAbsError(PerImageMetric):
    """Depth absolute error (:func:`depth_abs_error`), mean over images."""

    def __init__(self) -> None:
        super().__init__(lambda o, t: _per_image_depth(o, t, relative=False), "depth abs error")


class DepthRelError(PerImageMetric):
    """Depth relative error (:func:`depth_rel_error`), mean over images."""

    def __init__(self) -> None:
        super().__init__(lambda o, t: _per_image_depth(o, t, relative=True), "depth rel error")


class NormalMeanAngle(PerImageMetric):
    """Mean normal angle error in degrees (:func:`normal_mean_angle`), mean over images."""

    def __init__(self) -> None:
        super().__init__(lambda o, t: _per_image_normal(o, t, torch.mean), "normal mean angle")


class NormalMedianAngle(PerImageMetric):
    """Median normal angle error in degrees (:func:`normal_median_angle`), mean over images of the medians."""

    def __init__(self) -> None:
        super().__init__(lambda o, t: _per_image_normal(o, t, _median), "normal median angle")


class NormalWithin(PerImageMetric):
    """Percentage of valid pixels within ``degrees`` (:func:`normal_within`), mean over images."""

    def __init__(self, degrees: float) -> None:
        self.degrees = float(degrees)
        super().__init__(
            lambda o, t: _per_image_normal(o, t, lambda e: (e < self.degrees).double().mean() * 100),
            f"normal within {degrees:g} deg",
        )


def _threshold_name(degrees: float) -> str:
    return "within_" + f"{degrees:g}".replace(".", "_")


def segmentation_metrics(*, whole_set: bool = True) -> dict[str, tuple[Any, str]]:
    """Fresh ``{"miou": ..., "pixel_acc": ...}`` entries for a recipe's ``metrics`` (both "higher")."""
    return {
        "miou": (MeanIoU(whole_set=whole_set), "higher"),
        "pixel_acc": (PixelAccuracy(whole_set=whole_set), "higher"),
    }


def depth_metrics() -> dict[str, tuple[Any, str]]:
    """Fresh ``{"abs_err": ..., "rel_err": ...}`` entries for a recipe's ``metrics`` (both "lower")."""
    return {"abs_err": (DepthAbsError(), "lower"), "rel_err": (DepthRelError(), "lower")}


def normal_metrics() -> dict[str, tuple[Any, str]]:
    """Fresh normal-angle entries: ``mean_angle``, ``median_angle`` ("lower"), ``within_11_25``,
    ``within_22_5``, ``within_30`` (percentages, "higher")."""
    out: dict[str, tuple[Any, str]] = {
        "mean_angle": (NormalMeanAngle(), "lower"),
        "median_angle": (NormalMedianAngle(), "lower"),
    }
    for t in WITHIN_DEGREES:
        out[_threshold_name(t)] = (NormalWithin(t), "higher")
    return out
