"""Recipe: NYUv2, three tasks: 13-class semantic segmentation, depth, surface normals.

The benchmark of MTAN (Liu et al., CVPR 2019), CAGrad, Nash-MTL and Recon (ICLR 2023), on MTAN's preprocessed
NYUv2 (795 training and 654 validation images of 288 x 384) in its ``.npy`` layout, as read by
``im2im_pred/create_dataset.py`` of ``lorenmt/mtan`` and ``data/NYUv2.py`` of ``moukamisama/Recon``::

    $RECON_NYUV2_ROOT/{train,val}/image/<i>.npy     288 x 384 x 3 float
    $RECON_NYUV2_ROOT/{train,val}/label/<i>.npy     288 x 384, classes 0..12, -1 = unlabelled
    $RECON_NYUV2_ROOT/{train,val}/depth/<i>.npy     288 x 384 x 1, 0 = no depth
    $RECON_NYUV2_ROOT/{train,val}/normal/<i>.npy    288 x 384 x 3 unit normals, all-zero = none

Nothing is downloaded: get the data where MTAN's README points and set the variable. Usage::

    RECON_NYUV2_ROOT=~/data/nyuv2 recon profile examples/nyuv2.py --epochs 1

Settings (environment variables, read when the functions are called; defaults are Recon's NYUv2 setting):

=============================  =======================  ==================================================
``RECON_NYUV2_ROOT``           (required)               the folder holding ``train/`` and ``val/``
``RECON_NYUV2_BATCH_SIZE``     2                        training batch size (MTAN, CAGrad, Recon)
``RECON_NYUV2_VAL_BATCH_SIZE`` 1                        validation batch size (Recon)
``RECON_NYUV2_IMAGE_SIZE``     288x384                  H x W; other stored sizes are resized
``RECON_NYUV2_AUGMENT``        1                        random scale-crop and flip on training images
``RECON_NYUV2_ARCH``           mtan                     ``mtan`` (Recon's NYUv2 model) or ``segnet``
``RECON_NYUV2_FILTERS``        64,128,256,512,512       SegNet widths, one per pooling level
``RECON_NYUV2_LR``             1e-4                     Adam learning rate (Recon, CAGrad)
``RECON_NYUV2_NUM_WORKERS``    0                        DataLoader workers
=============================  =======================  ==================================================

Not reproduced here: the step decay of the learning rate (x0.5 after 100 of 200 epochs in Recon/CAGrad), since
a recipe's ``optimizer`` cannot schedule; the loss-weighting schemes (DWA, uncertainty) of MTAN.
Metrics (``recon.dense``): mIoU and pixel accuracy, depth absolute and relative error, normal angle mean and
median (degrees) and % within 11.25/22.5/30 degrees. Their per-batch value is a mean over images; the papers'
whole-set mIoU needs the accumulating interface (``update``/``compute``), see ``recon.dense``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

from recon import dense


def _sibling(name: str):
    """Import ``<this folder>/<name>.py`` (works whether or not this folder is on sys.path)."""
    path = Path(__file__).resolve().with_name(f"{name}.py")
    key = f"recon_examples_{name}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_models = _sibling("_dense_models")
_data = _sibling("_dense_data")

NUM_CLASSES = 13
TASK_CHANNELS = {"segmentation": NUM_CLASSES, "depth": 1, "normal": 3}
FOLDERS = {"segmentation": "label", "depth": "depth", "normal": "normal"}
IMAGE_SIZE = (288, 384)


def _filters() -> tuple[int, ...]:
    return _data.env_ints("RECON_NYUV2_FILTERS", _models.PAPER_FILTERS)


def build_model() -> torch.nn.Module:
    arch = _data.env_choice("RECON_NYUV2_ARCH", "mtan", ("mtan", "segnet"))
    return _models.build(arch, TASK_CHANNELS, _filters())


losses = {
    "segmentation": dense.segmentation_loss,
    "depth": dense.depth_loss,
    "normal": dense.normal_loss,
}

metrics = {
    "segmentation": dense.segmentation_metrics(),
    "depth": dense.depth_metrics(),
    "normal": dense.normal_metrics(),
}


def optimizer(params):
    return torch.optim.Adam(params, lr=_data.env_float("RECON_NYUV2_LR", 1e-4))


def _loader(split: str, *, train: bool):
    root = _data.env_root("RECON_NYUV2_ROOT", "NYUv2", ["image", *FOLDERS.values()])
    size = _data.env_ints("RECON_NYUV2_IMAGE_SIZE", IMAGE_SIZE, count=2)
    _data.check_divisible(size, len(_filters()), "RECON_NYUV2_IMAGE_SIZE")
    dataset = _data.NpyDenseDataset(
        root,
        split,
        FOLDERS,
        size=size,
        augment=train and _data.env_flag("RECON_NYUV2_AUGMENT", True),
        env_var="RECON_NYUV2_ROOT",
    )
    if train:
        batch_size = _data.env_int("RECON_NYUV2_BATCH_SIZE", 2)
    else:
        batch_size = _data.env_int("RECON_NYUV2_VAL_BATCH_SIZE", 1)
    workers = _data.env_int("RECON_NYUV2_NUM_WORKERS", 0, minimum=0)
    return _data.loader(dataset, batch_size, train=train, num_workers=workers)


def train_data():
    return _loader("train", train=True)


def val_data():
    return _loader("val", train=False)
