"""Loading MTAN's preprocessed NYUv2 / Cityscapes ``.npy`` folders, shared by ``nyuv2.py`` and
``cityscapes.py``.

The layout is the one MTAN's ``im2im_pred/create_dataset.py`` (``lorenmt/mtan``) reads, and CAGrad
(``Cranial-XIX/CAGrad``, ``nyuv2/create_dataset.py``, ``cityscapes/create_dataset.py``) and Recon
(``moukamisama/Recon``, ``data/NYUv2.py``, ``data/CityScapes.py``) copy::

    <root>/train/image/<i>.npy    H x W x 3 float image
    <root>/train/label/<i>.npy    H x W segmentation labels, -1 = no label   (Cityscapes: label_7/, label_19/)
    <root>/train/depth/<i>.npy    H x W x 1 depth, 0 = no depth
    <root>/train/normal/<i>.npy   H x W x 3 unit surface normals, all-zero = none (NYUv2 only)
    <root>/val/...                the same for the validation (test) split

with ``i = 0 .. N-1`` and ``N`` the number of ``*.npy`` files in ``image/``. Each sample becomes
``(image 3xHxW float32, {task: target})`` with the segmentation target an int64 ``HxW`` map, depth ``1xHxW``
and normals ``3xHxW`` float32, exactly the reference's ``np.moveaxis(..., -1, 0)``.

The training augmentation is the reference's ``RandomScaleCrop`` (credited there to Jialong Wu, lorenmt/mtan
issue 34) and horizontal flip, on by default as in CAGrad's ``run.sh`` and Recon's training scripts: a crop of
1/s of the image for s drawn from {1.0, 1.2, 1.5}, resized back (bilinear with ``align_corners=True`` for
image and normals, nearest for labels and depth), depth divided by s; then with probability 1/2 a horizontal
flip that also negates the normals' x component. Random numbers come from torch's global generator (the
reference mixes Python's ``random`` and torch), so seeding torch makes a run repeatable with
``num_workers=0``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from recon._errors import ReconError

SCALES = (1.0, 1.2, 1.5)


# ---------------------------------------------------------------------------------------- settings


def env_root(var: str, dataset: str, folders: Sequence[str]) -> Path:
    """The data root named by environment variable ``var``; a one-line ReconError if unset or not a folder."""
    value = os.environ.get(var, "").strip()
    layout = ", ".join(f"{f}/" for f in folders)
    if not value:
        raise ReconError(
            f"{var} is not set; export {var}=/path/to/{dataset} (MTAN/CAGrad's preprocessed {dataset}: "
            f"train/ and val/ holding {layout} with <i>.npy files; this tool downloads nothing)"
        )
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ReconError(f"{var}={value}: no such folder; point {var} at the preprocessed {dataset} folder")
    return root


def env_int(var: str, default: int, *, minimum: int = 1) -> int:
    value = os.environ.get(var, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ReconError(f"{var}={value!r} is not {kind}; set it like {var}={default}")
    return number


def env_float(var: str, default: float) -> float:
    value = os.environ.get(var, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise ReconError(f"{var}={value!r} is not a positive number; set it like {var}={default:g}")
    return number


def env_flag(var: str, default: bool) -> bool:
    value = os.environ.get(var, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ReconError(f"{var}={value!r} is not a yes/no value; set it to 1 or 0")


def env_ints(var: str, default: Sequence[int], *, count: int | None = None) -> tuple[int, ...]:
    """Comma- or ``x``-separated positive integers, e.g. ``288x384`` or ``64,128,256``."""
    value = os.environ.get(var, "").strip()
    if not value:
        return tuple(default)
    parts = [p.strip() for p in value.replace("x", ",").replace("X", ",").split(",")]
    try:
        numbers = tuple(int(p) for p in parts)
    except ValueError:
        numbers = ()
    example = ("x" if count == 2 else ",").join(str(d) for d in default)
    if not numbers or min(numbers) < 1 or (count is not None and len(numbers) != count):
        raise ReconError(f"{var}={value!r} is not valid; set it like {var}={example}")
    return numbers


def env_choice(var: str, default: str, choices: Sequence[str]) -> str:
    value = os.environ.get(var, "").strip().lower() or default
    if value not in choices:
        raise ReconError(f"{var}={value!r} is not one of {', '.join(choices)}; set it like {var}={default}")
    return value


# ------------------------------------------------------------------------------------------- dataset


def _numbered(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.npy")}


class NpyDenseDataset(Dataset):
    """One split (``train`` or ``val``) of an MTAN-layout folder.

    ``folders`` maps each task to its sub-folder (``{"segmentation": "label", "depth": "depth", "normal":
    "normal"}``); ``size`` is the (H, W) every sample is resized to when stored at another size (nearest for
    labels, depth and normals, bilinear for the image); ``augment`` applies the random scale-crop and flip.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        folders: Mapping[str, str],
        *,
        size: tuple[int, int] | None = None,
        augment: bool = False,
        segmentation: str = "segmentation",
        normal: str | None = "normal",
        env_var: str = "the data root",
    ) -> None:
        self.path = Path(root) / split
        self.folders = dict(folders)
        self.size = tuple(size) if size is not None else None
        self.augment = augment
        self.segmentation = segmentation
        self.normal = normal
        if not self.path.is_dir():
            raise ReconError(f"{self.path}: no such folder; {env_var} must hold train/ and val/ (MTAN's layout)")
        expected = None
        for sub in ["image", *self.folders.values()]:
            folder = self.path / sub
            if not folder.is_dir():
                raise ReconError(
                    f"{folder}: no such folder; {self.path} must hold "
                    f"{', '.join(['image', *self.folders.values()])} (MTAN's preprocessed layout)"
                )
            names = _numbered(folder)
            if expected is None:
                n = len(names)
                if n == 0:
                    raise ReconError(f"{folder}: no .npy files; expected 0.npy .. N-1.npy (MTAN's layout)")
                expected = {f"{i}.npy" for i in range(n)}
                if names != expected:
                    odd = sorted(names - expected)[:3]
                    raise ReconError(f"{folder}: files must be named 0.npy .. {n - 1}.npy; found {odd} (MTAN's layout)")
            elif names != expected:
                missing = sorted(expected - names, key=lambda s: int(s.split(".")[0]))[:3]
                extra = sorted(names - expected)[:3]
                raise ReconError(
                    f"{folder}: does not match image/ ({len(expected)} files): missing {missing}, "
                    f"extra {extra}; every folder needs the same 0.npy .. N-1.npy"
                )
        self.length = len(expected or ())

    def __len__(self) -> int:
        return self.length

    def _load(self, sub: str, index: int, channels: int | None) -> torch.Tensor:
        """``H x W x C`` (or ``H x W``) array -> ``C x H x W`` float32 tensor (``H x W`` for
        channels=None)."""
        file = self.path / sub / f"{index}.npy"
        array = np.load(file)
        if channels is None:
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            if array.ndim != 2:
                raise ReconError(f"{file}: shape {array.shape}; expected H x W labels")
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if array.ndim == 2 and channels == 1:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] != channels:
            raise ReconError(f"{file}: shape {array.shape}; expected H x W x {channels}")
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0), dtype=np.float32))

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        image = self._load("image", index, 3)
        targets: dict[str, torch.Tensor] = {}
        for task, sub in self.folders.items():
            if task == self.segmentation:
                targets[task] = self._load(sub, index, None)
            elif task == self.normal:
                targets[task] = self._load(sub, index, 3)
            else:
                targets[task] = self._load(sub, index, 1)
        if self.size is not None and tuple(image.shape[-2:]) != self.size:
            image = _resize(image, self.size, "bilinear")
            targets = {t: _resize(v, self.size, "nearest") for t, v in targets.items()}
        if self.augment:
            image, targets = self._scale_crop_flip(image, targets)
        targets[self.segmentation] = targets[self.segmentation].round().long()
        return image, targets

    def _scale_crop_flip(self, image: torch.Tensor, targets: dict[str, torch.Tensor]):
        height, width = image.shape[-2:]
        sc = SCALES[int(torch.randint(len(SCALES), ()).item())]
        h, w = int(height / sc), int(width / sc)
        i = int(torch.randint(height - h + 1, ()).item())
        j = int(torch.randint(width - w + 1, ()).item())
        size = (height, width)
        image = _resize(image[:, i : i + h, j : j + w], size, "bilinear")
        out = {}
        for task, value in targets.items():
            crop = value[..., i : i + h, j : j + w]
            if task == self.segmentation:
                out[task] = _resize(crop, size, "nearest")
            elif task == self.normal:
                out[task] = _resize(crop, size, "bilinear")
            else:  # depth: nearest, then divided by the scale (a zoomed-in view is closer)
                out[task] = _resize(crop, size, "nearest") / sc
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
            out = {t: v.flip(-1) for t, v in out.items()}
            if self.normal in out:
                out[self.normal] = out[self.normal].clone()
                out[self.normal][0] = -out[self.normal][0]
        return image, out


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a ``C x H x W`` or ``H x W`` tensor to ``size``."""
    squeeze = x.dim() == 2
    batch = x[None, None] if squeeze else x[None]
    if mode == "bilinear":
        out = F.interpolate(batch, size=size, mode="bilinear", align_corners=True)
    else:
        out = F.interpolate(batch, size=size, mode="nearest")
    return out[0, 0] if squeeze else out[0]


def loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int = 0) -> DataLoader:
    """Training: shuffled, incomplete last batch dropped (Recon's setting); validation: in order, all
    images."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=num_workers,
    )


def check_divisible(size: tuple[int, int], levels: int, var: str) -> None:
    """SegNet pools ``levels`` times; the image size must survive it exactly."""
    factor = 2**levels
    if size[0] % factor or size[1] % factor:
        raise ReconError(
            f"image size {size[0]}x{size[1]} is not divisible by {factor} (2 ** {levels} pooling levels); "
            f"set {var} to a multiple of {factor}, or use fewer filter levels"
        )
