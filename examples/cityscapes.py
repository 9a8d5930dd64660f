"""Recipe: Cityscapes, two tasks: 7-class semantic segmentation and depth.

The benchmark of MTAN (Liu et al., CVPR 2019), CAGrad, Nash-MTL and Recon (ICLR 2023), on MTAN's preprocessed
Cityscapes (2975 training and 500 validation images of 128 x 256) in its ``.npy`` layout, as read by
``cityscapes/create_dataset.py`` of ``Cranial-XIX/CAGrad`` and ``data/CityScapes.py`` of
``moukamisama/Recon``::

    $RECON_CITYSCAPES_ROOT/{train,val}/image/<i>.npy      128 x 256 x 3 float
    $RECON_CITYSCAPES_ROOT/{train,val}/label_7/<i>.npy    128 x 256, classes 0..6, -1 = unlabelled
    $RECON_CITYSCAPES_ROOT/{train,val}/depth/<i>.npy      128 x 256 x 1 (MTAN's inverse depth), 0 = none

MTAN's release also holds ``label_2/`` and ``label_19/``; ``RECON_CITYSCAPES_CLASSES=19`` reads ``label_19/``
(CAGrad and Recon use 7 classes). Nothing is downloaded: get the data where MTAN's README points and set the
variable. Usage::

    RECON_CITYSCAPES_ROOT=~/data/cityscapes recon profile examples/cityscapes.py --epochs 1

Settings (environment variables, read when the functions are called; defaults are Recon's Cityscapes setting):

===================================  ==================  ====================================================
``RECON_CITYSCAPES_ROOT``            (required)          the folder holding ``train/`` and ``val/``
``RECON_CITYSCAPES_CLASSES``         7                   2, 7 or 19: reads ``label_<n>/``
``RECON_CITYSCAPES_BATCH_SIZE``      8                   training batch size (MTAN, CAGrad, Recon)
``RECON_CITYSCAPES_VAL_BATCH_SIZE``  1                   validation batch size (Recon)
``RECON_CITYSCAPES_IMAGE_SIZE``      128x256             H x W; other stored sizes are resized
``RECON_CITYSCAPES_AUGMENT``         1                   random scale-crop and flip on training images
``RECON_CITYSCAPES_ARCH``            segnet              ``segnet`` (Recon's Cityscapes model) or ``mtan``
``RECON_CITYSCAPES_FILTERS``         64,128,256,512,512  SegNet widths, one per pooling level
``RECON_CITYSCAPES_LR``              5e-5                Adam learning rate (Recon; CAGrad uses 1e-4)
``RECON_CITYSCAPES_NUM_WORKERS``     0                   DataLoader workers
===================================  ==================  ====================================================

Not reproduced here: the step decay of the learning rate (x0.5 after 100 of 200 epochs in Recon/CAGrad), since
a recipe's ``optimizer`` cannot schedule. Metrics (``recon.dense``): mIoU, pixel accuracy, depth absolute and
relative error; see ``recon.dense`` for how they aggregate over the validation set.
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

IMAGE_SIZE = (128, 256)


def _classes() -> int:
    return int(_data.env_choice("RECON_CITYSCAPES_CLASSES", "7", ("2", "7", "19")))


def _filters() -> tuple[int, ...]:
    return _data.env_ints("RECON_CITYSCAPES_FILTERS", _models.PAPER_FILTERS)


def build_model() -> torch.nn.Module:
    arch = _data.env_choice("RECON_CITYSCAPES_ARCH", "segnet", ("segnet", "mtan"))
    return _models.build(arch, {"segmentation": _classes(), "depth": 1}, _filters())


losses = {
    "segmentation": dense.segmentation_loss,
    "depth": dense.depth_loss,
}

metrics = {
    "segmentation": dense.segmentation_metrics(),
    "depth": dense.depth_metrics(),
}


def optimizer(params):
    return torch.optim.Adam(params, lr=_data.env_float("RECON_CITYSCAPES_LR", 5e-5))


def _loader(split: str, *, train: bool):
    folders = {"segmentation": f"label_{_classes()}", "depth": "depth"}
    root = _data.env_root("RECON_CITYSCAPES_ROOT", "Cityscapes", ["image", *folders.values()])
    size = _data.env_ints("RECON_CITYSCAPES_IMAGE_SIZE", IMAGE_SIZE, count=2)
    _data.check_divisible(size, len(_filters()), "RECON_CITYSCAPES_IMAGE_SIZE")
    dataset = _data.NpyDenseDataset(
        root,
        split,
        folders,
        size=size,
        augment=train and _data.env_flag("RECON_CITYSCAPES_AUGMENT", True),
        normal=None,
        env_var="RECON_CITYSCAPES_ROOT",
    )
    if train:
        batch_size = _data.env_int("RECON_CITYSCAPES_BATCH_SIZE", 8)
    else:
        batch_size = _data.env_int("RECON_CITYSCAPES_VAL_BATCH_SIZE", 1)
    workers = _data.env_int("RECON_CITYSCAPES_NUM_WORKERS", 0, minimum=0)
    return _data.loader(dataset, batch_size, train=train, num_workers=workers)


def train_data():
    return _loader("train", train=True)


def val_data():
    return _loader("val", train=False)
