"""Digits40: forty binary attributes of the MultiDigits canvas, forty heads on one shared trunk (the Recon
paper's CelebA setting has 40 attributes; this is its CPU-scale stand-in on real offline scans).

The canvas, the data halves and the trunk are ``multidigits.py``'s (two real 8x8 scans of scikit-learn's
``load_digits`` side by side on a 10x14 canvas with a random vertical jitter). Each image gets 40 labels:

* twelve about the left digit and the same twelve about the right one: its value (odd, at least 5, prime,
  zero, has a closed loop, drawn with straight strokes only, a perfect square, a multiple of 3, at most 2) and
  its drawing on the canvas (high, low: where its ink's centre of mass sits; inked: more ink than the median
  digit of the training half);
* sixteen about both: equal, sum at least 10, left greater, both odd, same parity, far apart (|a - b| >= 5),
  both at least 5, either zero, product at least 20, sum a multiple of 3, both prime, sum at most 5, the
  same height, left higher, left inked more, ink in the overlapping columns above the median.

These are natural groups (``GROUPS``: value and drawing of each digit, and the pair), which is what
``recon split --groups auto`` looks for at K = 40. Same environment variables as ``multidigits.py``
(``RECON_DIGITS_TRAIN``/``_VAL``/``_BATCH``).

    recon profile examples/digits40.py --every auto && recon split --budget-params 0.1 --groups auto
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from multidigits import BATCH_SIZE, CANVAS, N_TRAIN, N_VAL, OVERLAP, MultiDigitNet, TaskTargets, accuracy, make_pairs
from torch import nn
from torch.utils.data import DataLoader

_VALUE = ("odd", "large", "prime", "zero", "loop", "straight", "square", "mult3", "small")
_DRAWING = ("high", "low", "inked")
GROUPS = {
    "left_value": tuple(f"left_{a}" for a in _VALUE),
    "left_drawing": tuple(f"left_{a}" for a in _DRAWING),
    "right_value": tuple(f"right_{a}" for a in _VALUE),
    "right_drawing": tuple(f"right_{a}" for a in _DRAWING),
    "pair_value": (
        "equal", "sum_large", "left_greater", "both_odd", "same_parity", "far_apart", "both_large",
        "either_zero", "product_large", "sum_mult3", "both_prime", "sum_small",
    ),
    "pair_drawing": ("same_height", "left_higher", "left_inkier", "overlap_inked"),
}  # fmt: skip
TASKS = tuple(t for group in GROUPS.values() for t in group)
assert len(TASKS) == 40

_SETS = {
    "prime": (2, 3, 5, 7),
    "loop": (0, 4, 6, 8, 9),
    "straight": (1, 4, 7),
    "square": (0, 1, 4, 9),
    "mult3": (0, 3, 6, 9),
}
_LEFT_COLS = slice(0, CANVAS[1] - 8)  # the columns only the left digit reaches
_RIGHT_COLS = slice(8, CANVAS[1])  # ... only the right one
_SHARED_COLS = slice(CANVAS[1] - 8, 8)  # the OVERLAP columns both reach
assert _SHARED_COLS.stop - _SHARED_COLS.start == OVERLAP


def _member(d: torch.Tensor, name: str) -> torch.Tensor:
    return torch.isin(d, torch.tensor(_SETS[name]))


def _drawing(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: the ink's centre-of-mass row of each digit's own columns, and the ink of each region."""
    ink = (x[:, 0] + 1) / 2  # back to [0, 1]
    rows = torch.arange(CANVAS[0], dtype=ink.dtype)

    def centre(cols: slice) -> torch.Tensor:
        region = ink[:, :, cols].sum(dim=2)
        return (region * rows).sum(dim=1) / region.sum(dim=1).clamp_min(1e-6)

    return {
        "left_row": centre(_LEFT_COLS),
        "right_row": centre(_RIGHT_COLS),
        "left_ink": ink[:, :, _LEFT_COLS].sum(dim=(1, 2)),
        "right_ink": ink[:, :, _RIGHT_COLS].sum(dim=(1, 2)),
        "shared_ink": ink[:, :, _SHARED_COLS].sum(dim=(1, 2)),
    }


@functools.lru_cache(maxsize=1)
def _medians() -> dict[str, float]:
    """Thresholds of the drawing attributes: medians over the training half, so val labels use the same ones."""
    x, _ = make_pairs("train", N_TRAIN)
    return {k: float(v.median()) for k, v in _drawing(x).items()}


def attributes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(n, 40)`` binary labels, one column per task in :data:`TASKS`, from images and ``(n, 2)`` digits."""
    draw, med = _drawing(x), _medians()
    columns = {}
    for side, d in (("left", y[:, 0]), ("right", y[:, 1])):
        row, ink = draw[f"{side}_row"], draw[f"{side}_ink"]
        columns.update({
            f"{side}_odd": d % 2 == 1, f"{side}_large": d >= 5, f"{side}_prime": _member(d, "prime"),
            f"{side}_zero": d == 0, f"{side}_loop": _member(d, "loop"), f"{side}_straight": _member(d, "straight"),
            f"{side}_square": _member(d, "square"), f"{side}_mult3": _member(d, "mult3"), f"{side}_small": d <= 2,
            f"{side}_high": row < med[f"{side}_row"] - 0.5, f"{side}_low": row > med[f"{side}_row"] + 0.5,
            f"{side}_inked": ink > med[f"{side}_ink"],
        })  # fmt: skip
    a, b = y[:, 0], y[:, 1]
    columns.update({
        "equal": a == b, "sum_large": a + b >= 10, "left_greater": a > b, "both_odd": (a % 2 == 1) & (b % 2 == 1),
        "same_parity": a % 2 == b % 2, "far_apart": (a - b).abs() >= 5, "both_large": (a >= 5) & (b >= 5),
        "either_zero": (a == 0) | (b == 0), "product_large": a * b >= 20, "sum_mult3": (a + b) % 3 == 0,
        "both_prime": _member(a, "prime") & _member(b, "prime"), "sum_small": a + b <= 5,
        "same_height": (draw["left_row"] - draw["right_row"]).abs() < 0.5,
        "left_higher": draw["left_row"] < draw["right_row"] - 0.5,
        "left_inkier": draw["left_ink"] > draw["right_ink"], "overlap_inked": draw["shared_ink"] > med["shared_ink"],
    })  # fmt: skip
    return torch.stack([columns[t] for t in TASKS], dim=1).long()


def build_model() -> nn.Module:
    return MultiDigitNet(TASKS, n_classes=2)


losses = {t: F.cross_entropy for t in TASKS}
metrics = {t: {"acc": (accuracy, "higher")} for t in TASKS}


def _loader(split: str, n: int, shuffle: bool) -> DataLoader:
    x, y = make_pairs(split, n)
    return DataLoader(
        TaskTargets(x, attributes(x, y), TASKS), batch_size=BATCH_SIZE, shuffle=shuffle, drop_last=shuffle
    )


def train_data() -> DataLoader:
    return _loader("train", N_TRAIN, shuffle=True)


def val_data() -> DataLoader:
    return _loader("val", N_VAL, shuffle=False)
