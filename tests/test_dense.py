"""The NYUv2 / Cityscapes recipes (on tiny generated files of MTAN's layout) and the dense metrics.

Metrics are checked against values computed by hand on small tensors, and against straight re-implementations
of the reference code's formulas (MTAN's legacy per-image mIoU loop, CAGrad's ``ConfMatrix``).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recon import dense  # noqa: E402
from recon._errors import ReconError  # noqa: E402
from recon._train import evaluate  # noqa: E402

EXAMPLES = ROOT / "examples"
H = W = 16


# ------------------------------------------------------------------------------------------ helpers


def _recipe(name: str):
    """Import ``examples/<name>.py`` by path, as the CLI does."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"test_dense_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_split(folder: Path, n: int, labels: dict[str, int], normals: bool, rng: np.random.Generator):
    for sub in ["image", *labels, "depth"] + (["normal"] if normals else []):
        (folder / sub).mkdir(parents=True)
    for i in range(n):
        np.save(folder / "image" / f"{i}.npy", rng.random((H, W, 3), dtype=np.float32))
        for sub, classes in labels.items():
            label = rng.integers(-1, classes, size=(H, W)).astype(np.float32)  # MTAN stores float labels
            np.save(folder / sub / f"{i}.npy", label)
        depth = rng.uniform(0.5, 10, size=(H, W, 1)).astype(np.float32)
        depth[0, :4] = 0  # missing depth
        np.save(folder / "depth" / f"{i}.npy", depth)
        if normals:
            normal = rng.normal(size=(H, W, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[1, :3] = 0  # missing normals
            np.save(folder / "normal" / f"{i}.npy", normal)


def _nyuv2(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "nyuv2"
    _write_split(root / "train", 3, {"label": 13}, True, rng)
    _write_split(root / "val", 2, {"label": 13}, True, rng)
    return root


def _cityscapes(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    root = tmp_path / "cityscapes"
    _write_split(root / "train", 3, {"label_7": 7, "label_19": 19}, False, rng)
    _write_split(root / "val", 2, {"label_7": 7, "label_19": 19}, False, rng)
    return root


def _tiny(monkeypatch, prefix: str, root: Path, **extra: str) -> None:
    monkeypatch.setenv(f"RECON_{prefix}_ROOT", str(root))
    monkeypatch.setenv(f"RECON_{prefix}_IMAGE_SIZE", f"{H}x{W}")
    monkeypatch.setenv(f"RECON_{prefix}_FILTERS", "4,8,8")
    monkeypatch.setenv(f"RECON_{prefix}_BATCH_SIZE", "2")
    for key, value in extra.items():
        monkeypatch.setenv(f"RECON_{prefix}_{key}", value)


def _one_hot_logits(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, H, W) labels -> (B, C, H, W) logits whose argmax is the label."""
    return nn.functional.one_hot(labels, classes).permute(0, 3, 1, 2).float() * 5.0


# ------------------------------------------------------------------------------------------ recipes


def test_recipes_import_without_data(monkeypatch):
    for var in ("RECON_NYUV2_ROOT", "RECON_CITYSCAPES_ROOT"):
        monkeypatch.delenv(var, raising=False)
    for name in ("nyuv2", "cityscapes"):
        recipe = _recipe(name)
        assert callable(recipe.build_model) and callable(recipe.train_data) and callable(recipe.val_data)
        assert set(recipe.metrics) == set(recipe.losses)
        for named in recipe.metrics.values():
            for fn, direction in named.values():
                assert callable(fn) and direction in ("higher", "lower")


def test_nyuv2_batches(tmp_path, monkeypatch):
    root = _nyuv2(tmp_path)
    _tiny(monkeypatch, "NYUV2", root)
    recipe = _recipe("nyuv2")
    train = list(recipe.train_data())
    assert len(train) == 1  # 3 images, batch 2, incomplete batch dropped
    image, targets = train[0]
    assert image.shape == (2, 3, H, W) and image.dtype == torch.float32
    assert set(targets) == {"segmentation", "depth", "normal"}
    assert targets["segmentation"].shape == (2, H, W) and targets["segmentation"].dtype == torch.int64
    assert targets["depth"].shape == (2, 1, H, W) and targets["depth"].dtype == torch.float32
    assert targets["normal"].shape == (2, 3, H, W) and targets["normal"].dtype == torch.float32
    assert int(targets["segmentation"].min()) >= -1 and int(targets["segmentation"].max()) <= 12

    val = list(recipe.val_data())
    assert len(val) == 2  # validation batch size 1 by default (Recon)
    image, targets = val[1]  # validation: no augmentation, no shuffling: exactly the files
    np.testing.assert_array_equal(image[0].numpy(), np.moveaxis(np.load(root / "val/image/1.npy"), -1, 0))
    np.testing.assert_array_equal(targets["segmentation"][0].numpy(), np.load(root / "val/label/1.npy"))
    np.testing.assert_array_equal(targets["depth"][0].numpy(), np.moveaxis(np.load(root / "val/depth/1.npy"), -1, 0))
    np.testing.assert_array_equal(targets["normal"][0].numpy(), np.moveaxis(np.load(root / "val/normal/1.npy"), -1, 0))


@pytest.mark.parametrize("arch", ["mtan", "segnet"])
def test_nyuv2_forward_losses_metrics(tmp_path, monkeypatch, arch):
    torch.manual_seed(0)
    _tiny(monkeypatch, "NYUV2", _nyuv2(tmp_path), ARCH=arch)
    recipe = _recipe("nyuv2")
    model = recipe.build_model()
    image, targets = next(iter(recipe.train_data()))
    out = model(image)
    assert out["segmentation"].shape == (2, 13, H, W)
    assert out["depth"].shape == (2, 1, H, W)
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, H, W))
    losses = {t: fn(out[t], targets[t]) for t, fn in recipe.losses.items()}
    for value in losses.values():
        assert value.dim() == 0 and torch.isfinite(value)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt = recipe.optimizer(model.parameters())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    with torch.no_grad():
        for task, named in recipe.metrics.items():
            for fn, _ in named.values():
                assert math.isfinite(fn(out[task], targets[task]))
    result = evaluate(model, recipe.val_data(), list(recipe.metrics), recipe.metrics)
    assert set(result["normal"]) == {"mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"}
    assert all(math.isfinite(v) for named in result.values() for v in named.values())
    assert model.training  # evaluate puts the mode back


def test_cityscapes_batches_and_forward(tmp_path, monkeypatch):
    torch.manual_seed(0)
    root = _cityscapes(tmp_path)
    _tiny(monkeypatch, "CITYSCAPES", root, VAL_BATCH_SIZE="2")
    recipe = _recipe("cityscapes")
    image, targets = next(iter(recipe.val_data()))
    assert image.shape == (2, 3, H, W)
    assert set(targets) == {"segmentation", "depth"}
    np.testing.assert_array_equal(targets["segmentation"][0].numpy(), np.load(root / "val/label_7/0.npy"))
    model = recipe.build_model()
    out = model(image)
    assert set(out) == {"segmentation", "depth"} and out["segmentation"].shape == (2, 7, H, W)
    for task, fn in recipe.losses.items():
        assert torch.isfinite(fn(out[task], targets[task]))
    assert recipe.optimizer(model.parameters()).param_groups[0]["lr"] == pytest.approx(5e-5)

    monkeypatch.setenv("RECON_CITYSCAPES_CLASSES", "19")
    image, targets = next(iter(recipe.val_data()))
    np.testing.assert_array_equal(targets["segmentation"][0].numpy(), np.load(root / "val/label_19/0.npy"))
    assert recipe.build_model()(image)["segmentation"].shape == (2, 19, H, W)


def test_resize_to_requested_size(tmp_path, monkeypatch):
    _tiny(monkeypatch, "NYUV2", _nyuv2(tmp_path), IMAGE_SIZE="32x24")
    image, targets = next(iter(_recipe("nyuv2").val_data()))
    assert image.shape == (1, 3, 32, 24)
    assert targets["segmentation"].shape == (1, 32, 24) and targets["normal"].shape == (1, 3, 32, 24)


def test_augmentation_scale_crop_flip(tmp_path, monkeypatch):
    root = tmp_path / "nyuv2"
    for split in ("train", "val"):
        for sub in ("image", "label", "depth", "normal"):
            (root / split / sub).mkdir(parents=True)
        np.save(root / split / "image/0.npy", np.zeros((H, W, 3), np.float32))
        np.save(root / split / "label/0.npy", np.full((H, W), 4.0, np.float32))
        np.save(root / split / "depth/0.npy", np.full((H, W, 1), 3.0, np.float32))
        np.save(root / split / "normal/0.npy", np.tile(np.float32([0.6, 0.0, 0.8]), (H, W, 1)))
    _tiny(monkeypatch, "NYUV2", root, BATCH_SIZE="1")
    recipe = _recipe("nyuv2")
    depths, signs = set(), set()
    for seed in range(40):
        torch.manual_seed(seed)
        _, targets = next(iter(recipe.train_data()))
        assert targets["segmentation"].unique().tolist() == [4]
        depths.update(round(d, 4) for d in targets["depth"].unique().tolist())
        normal = targets["normal"][0]
        sign = 1.0 if normal[0, 0, 0] > 0 else -1.0
        expected = torch.tensor([0.6 * sign, 0.0, 0.8]).view(3, 1, 1).expand(3, H, W)
        torch.testing.assert_close(normal, expected)
        signs.add(sign)
    # depth divided by the scale, one of 1.0, 1.2, 1.5; the flip negates the normals' x component
    assert depths == {3.0, 2.5, 2.0}
    assert signs == {1.0, -1.0}


def test_missing_root_and_bad_layout(tmp_path, monkeypatch):
    recipe = _recipe("nyuv2")
    monkeypatch.delenv("RECON_NYUV2_ROOT", raising=False)
    with pytest.raises(ReconError, match="RECON_NYUV2_ROOT is not set") as err:
        recipe.train_data()
    assert "\n" not in str(err.value)

    monkeypatch.setenv("RECON_NYUV2_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(ReconError, match="no such folder"):
        recipe.val_data()

    root = _nyuv2(tmp_path)
    _tiny(monkeypatch, "NYUV2", root)
    (root / "val/normal/1.npy").unlink()
    with pytest.raises(ReconError, match=r"normal.*missing \['1.npy'\]"):
        recipe.val_data()
    for f in (root / "val/normal").iterdir():
        f.unlink()
    (root / "val/normal").rmdir()
    with pytest.raises(ReconError, match="val/normal: no such folder"):
        recipe.val_data()

    monkeypatch.setenv("RECON_NYUV2_IMAGE_SIZE", "20x16")
    with pytest.raises(ReconError, match="not divisible by 8"):
        recipe.train_data()
    monkeypatch.setenv("RECON_NYUV2_BATCH_SIZE", "two")
    monkeypatch.setenv("RECON_NYUV2_IMAGE_SIZE", "16x16")
    with pytest.raises(ReconError, match="RECON_NYUV2_BATCH_SIZE='two'"):
        recipe.train_data()
    monkeypatch.setenv("RECON_NYUV2_ARCH", "resnet")
    with pytest.raises(ReconError, match="RECON_NYUV2_ARCH"):
        recipe.build_model()


@pytest.mark.parametrize("arch", ["MTAN", "SegNet"])
def test_models_are_fx_traceable(arch):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _dense_models
    finally:
        sys.path.remove(str(EXAMPLES))
    torch.manual_seed(0)
    model = getattr(_dense_models, arch)({"seg": 5, "depth": 1, "normal": 3}, filters=(4, 8, 8, 8)).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 16, 32)
    expected, got = model(x), traced(x)
    for task in expected:
        torch.testing.assert_close(got[task], expected[task])
    names = dict(model.named_modules())
    assert "heads.seg.0" in names
    if arch == "MTAN":
        assert "encoder_att.depth.3.0" in names and "decoder_att.normal.0.3" in names


# ------------------------------------------------------------------------------------------ metrics


def test_segmentation_loss_ignores_minus_one():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]])  # (1, 2 classes, 1, 2)
    target = torch.tensor([[[0, -1]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))  # pixel 0 only
    assert dense.segmentation_loss(logits, target).item() == pytest.approx(expected)
    # log-probabilities (MTAN's heads) give the same loss
    log_probs = torch.log_softmax(logits, dim=1)
    assert dense.segmentation_loss(log_probs, target).item() == pytest.approx(expected)
    assert dense.segmentation_loss(logits, torch.full((1, 1, 2), -1)).item() == 0.0


def test_miou_and_pixel_accuracy_by_hand():
    # valid pixels: (t0,p0) (t0,p1) (t1,p1); the -1 pixel's prediction (1) is not counted
    target = torch.tensor([[[0, 0], [1, -1]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    logits = _one_hot_logits(pred, 2)
    assert dense.mean_iou(logits, target) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert dense.pixel_accuracy(logits, target) == pytest.approx(2 / 3)
    conf = dense.confusion_matrix(pred, target, 2)
    assert conf.tolist() == [[1, 1], [0, 1]]


def test_miou_per_image_versus_whole_set():
    # image A: all class 0, predicted right; image B: all class 1, half predicted as 0
    target = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    pred = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [0, 0]]])
    logits = _one_hot_logits(pred, 3)  # class 2 never occurs: skipped
    per_image = (1.0 + (0 / 2 + 2 / 4) / 2) / 2  # A: only class 0 present -> 1; B: IoU0 = 0, IoU1 = 2/4
    whole_set = (4 / 6 + 2 / 4) / 2  # class 0: TP 4, FP 2; class 1: TP 2, FN 2
    assert dense.mean_iou(logits, target) == pytest.approx(per_image)
    assert dense.pixel_accuracy(logits, target) == pytest.approx((1.0 + 0.5) / 2)

    miou, acc = dense.MeanIoU(), dense.PixelAccuracy()
    assert miou(logits, target) == pytest.approx(per_image)  # the per-batch value
    for i in range(2):  # one image per batch
        miou.update(logits[i : i + 1], target[i : i + 1])
        acc.update(logits[i : i + 1], target[i : i + 1])
    assert miou.compute() == pytest.approx(whole_set)
    assert acc.compute() == pytest.approx(6 / 8)
    miou.reset()
    assert math.isnan(miou.compute())

    legacy = dense.MeanIoU(whole_set=False)
    legacy.update(logits[:1], target[:1])
    legacy.update(logits[1:], target[1:])
    assert legacy.compute() == pytest.approx(per_image)


def _legacy_mtan_miou(x_pred: torch.Tensor, x_output: torch.Tensor) -> float:
    """MTAN's original ``compute_miou`` (im2im_pred/utils.py before Oct 2019), rewritten plainly."""
    labels = x_pred.argmax(1)
    total = 0.0
    for i in range(x_pred.shape[0]):
        valid = (x_output[i] >= 0).float()
        ious = []
        for j in range(x_pred.shape[1]):
            comb = (labels[i] == j).float() + (x_output[i] == j).float()
            union = torch.sum((comb > 0).float() * valid)
            if union == 0:
                continue
            ious.append((torch.sum((comb > 1).float()) / union).item())
        total += sum(ious) / len(ious)
    return total / x_pred.shape[0]


def _cagrad_confmatrix(pred: torch.Tensor, target: torch.Tensor, n: int) -> tuple[float, float]:
    """CAGrad's ``ConfMatrix.get_metrics`` (nyuv2/utils.py): mean over all classes, accuracy."""
    k = (target >= 0) & (target < n)
    h = torch.bincount(n * target[k] + pred[k], minlength=n * n).reshape(n, n).float()
    iu = torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))
    return torch.mean(iu).item(), (torch.diag(h).sum() / h.sum()).item()


def test_segmentation_metrics_match_reference_formulas():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 8, 8, generator=gen)
    target = torch.randint(-1, 5, (4, 8, 8), generator=gen)
    assert dense.mean_iou(logits, target) == pytest.approx(_legacy_mtan_miou(logits, target))
    miou, acc = dense.MeanIoU(), dense.PixelAccuracy()
    for i in range(0, 4, 2):
        miou.update(logits[i : i + 2], target[i : i + 2])
        acc.update(logits[i : i + 2], target[i : i + 2])
    ref_miou, ref_acc = _cagrad_confmatrix(logits.argmax(1).flatten(), target.flatten(), 5)
    assert miou.compute() == pytest.approx(ref_miou)
    assert acc.compute() == pytest.approx(ref_acc)


def test_depth_loss_and_errors_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[9.0, 9.0], [9.0, 9.0]]]])
    target = torch.tensor([[[[2.0, 0.0], [1.0, 4.0]]], [[[0.0, 0.0], [0.0, 5.0]]]])
    # image 0 valid: |1-2| = 1 (rel 1/2), |3-1| = 2 (rel 2), |4-4| = 0; image 1 valid: |9-5| = 4 (rel 4/5)
    assert dense.depth_loss(pred, target).item() == pytest.approx((1 + 2 + 0 + 4) / 4)  # over valid pixels
    assert dense.depth_abs_error(pred, target) == pytest.approx((3 / 3 + 4) / 2)  # mean over images
    assert dense.depth_rel_error(pred, target) == pytest.approx(((0.5 + 2 + 0) / 3 + 0.8) / 2)
    assert dense.depth_abs_error(pred[:1], target[:1]) == pytest.approx(1.0)
    empty = torch.zeros_like(target)
    assert dense.depth_loss(pred, empty).item() == 0.0
    assert math.isnan(dense.depth_abs_error(pred, empty))
    metric = dense.DepthAbsError()
    metric.update(pred[:1], target[:1])
    metric.update(pred[1:], target[1:])
    metric.update(pred, empty)  # no valid pixel: contributes nothing
    assert metric.compute() == pytest.approx(2.5)
    # (B, H, W) depth maps are accepted too
    assert dense.depth_abs_error(pred[:, 0], target[:, 0]) == pytest.approx(2.5)


def _normals_at(degrees: list[float], scale: float = 1.0) -> torch.Tensor:
    """(1, 3, 1, N) unit vectors at the given angles from +z, in the x-z plane, times ``scale``."""
    rad = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    v = torch.stack([rad.sin(), torch.zeros_like(rad), rad.cos()]) * scale
    return v.float().view(1, 3, 1, -1)


def test_normal_loss_and_angle_errors_by_hand():
    angles = [0.0, 10.0, 20.0, 45.0, 90.0]
    pred = _normals_at(angles, scale=2.0)  # not unit length: normalised by the loss and metrics
    target = _normals_at([0.0] * 5)
    target[..., 4] = 0  # the 90-degree pixel has no ground truth
    cosines = [math.cos(math.radians(a)) for a in angles[:4]]
    assert dense.normal_loss(pred, target).item() == pytest.approx(1 - sum(cosines) / 4, abs=1e-6)
    assert dense.normal_mean_angle(pred, target) == pytest.approx(75 / 4, abs=1e-4)
    assert dense.normal_median_angle(pred, target) == pytest.approx(15.0, abs=1e-4)  # numpy: mean of 10, 20
    assert dense.normal_within(pred, target, 11.25) == pytest.approx(50.0)
    assert dense.normal_within(pred, target, 22.5) == pytest.approx(75.0)
    assert dense.normal_within(pred, target, 30.0) == pytest.approx(75.0)
    errors = dense.normal_angle_errors(pred, target)
    assert len(errors) == 1 and errors[0].tolist() == pytest.approx([0, 10, 20, 45], abs=1e-4)
    assert dense.normal_loss(pred, torch.zeros_like(target)).item() == 0.0


def test_normal_metrics_average_over_images():
    pred = torch.cat([_normals_at([0.0, 40.0]), _normals_at([5.0, 5.0])])
    target = torch.cat([_normals_at([0.0, 0.0]), _normals_at([0.0, 0.0])])
    metrics = {name: fn for name, (fn, _) in dense.normal_metrics().items()}
    assert list(metrics) == ["mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"]
    assert metrics["mean_angle"](pred, target) == pytest.approx((20 + 5) / 2, abs=1e-4)
    assert metrics["median_angle"](pred, target) == pytest.approx((20 + 5) / 2, abs=1e-4)
    assert metrics["within_11_25"](pred, target) == pytest.approx((50 + 100) / 2)
    for fn in metrics.values():
        fn.update(pred[:1], target[:1])
        fn.update(pred[1:], target[1:])
    assert metrics["within_30"].compute() == pytest.approx((50 + 100) / 2)
    assert metrics["mean_angle"].compute() == pytest.approx(12.5, abs=1e-4)


def test_evaluate_accumulates_whole_set():
    class Echo(nn.Module):
        def forward(self, seg, depth):
            return {"segmentation": seg, "depth": depth}

    target = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    logits = _one_hot_logits(torch.tensor([[[0, 0], [0, 0]], [[1, 1], [0, 0]]]), 2)
    depth_pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[9.0, 9.0], [9.0, 9.0]]]])
    depth = torch.tensor([[[[2.0, 0.0], [1.0, 4.0]]], [[[0.0, 0.0], [0.0, 5.0]]]])
    data = [
        (
            {"seg": logits[i : i + 1], "depth": depth_pred[i : i + 1]},
            {"segmentation": target[i : i + 1], "depth": depth[i : i + 1]},
        )
        for i in range(2)
    ]
    metrics = {
        "segmentation": {
            **dense.segmentation_metrics(),
            "plain_acc": (dense.pixel_accuracy, "higher"),  # plain function: batch-size-weighted mean
        },
        "depth": dense.depth_metrics(),
    }
    result = evaluate(Echo(), data, list(metrics), metrics)
    assert result["segmentation"]["miou"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert result["segmentation"]["pixel_acc"] == pytest.approx(6 / 8)
    assert result["segmentation"]["plain_acc"] == pytest.approx((1.0 + 0.5) / 2)
    assert result["depth"]["abs_err"] == pytest.approx(2.5)
    assert result["depth"]["rel_err"] == pytest.approx(((0.5 + 2 + 0) / 3 + 0.8) / 2)
