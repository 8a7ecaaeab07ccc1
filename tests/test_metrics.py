"""Metrics against independent computations: scikit-learn, and a slow, obviously correct AUPRO."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label as sk_label
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from nagl.errors import NaglError
from nagl.metrics import aupro, image_metrics, pixel_auroc, pixel_metrics


def sklearn_f1max(labels, scores) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def slow_aupro(masks, maps, fpr_limit) -> float:
    """Loop over every distinct threshold; regions from scikit-image, 8-connected, per image."""
    regions = []
    for index, mask in enumerate(masks):
        labelled = sk_label(mask, connectivity=2)
        for region_id in range(1, labelled.max() + 1):
            regions.append((index, labelled == region_id))
    normal_scores = maps[~masks]
    points = [(0.0, 0.0)]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        fpr = float(np.mean(normal_scores >= threshold))
        pro = float(np.mean([np.mean(maps[i][region] >= threshold) for i, region in regions]))
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < fpr_limit:
                y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
                area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


def blob_masks(rng, n, size, fraction=0.15):
    """Masks with several irregular connected regions, some images without any."""
    noise = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 1.5, 1.5))
    masks = np.zeros_like(noise, dtype=bool)
    for i in range(n):
        if i % 3 != 2:
            masks[i] = noise[i] > np.quantile(noise[i], 1 - fraction)
    return masks


# ------------------------------------------------------------------ image --


@pytest.mark.parametrize("seed", range(8))
def test_image_metrics_match_sklearn_with_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 4, n) + 0.7 * labels * rng.integers(0, 2, n)  # few distinct values
    got = image_metrics(labels, scores)
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["f1max"] == pytest.approx(sklearn_f1max(labels, scores), abs=1e-12)


def test_image_metrics_continuous_scores_match_sklearn():
    rng = np.random.default_rng(42)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(size=500) + labels
    got = image_metrics(labels, scores)
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["f1max"] == pytest.approx(sklearn_f1max(labels, scores), abs=1e-12)


def test_image_metrics_one_anomaly_and_hand_values():
    labels = [0, 0, 0, 1]
    scores = [0.1, 0.5, 0.2, 0.4]  # the anomaly ranks second: one normal above it
    got = image_metrics(labels, scores)
    assert got["auroc"] == pytest.approx(2 / 3)
    assert got["ap"] == pytest.approx(0.5)
    assert got["f1max"] == pytest.approx(2 / 3)  # threshold 0.4: TP 1, FP 1, FN 0


def test_image_metrics_tie_between_classes_gets_half_credit():
    got = image_metrics([0, 1], [0.3, 0.3])
    assert got["auroc"] == 0.5
    assert got["ap"] == 0.5
    assert got["f1max"] == pytest.approx(2 / 3)


def test_image_metrics_all_equal_scores():
    labels = [0, 1, 1, 0, 0]
    got = image_metrics(labels, [2.0] * 5)
    assert got == {"auroc": 0.5, "ap": pytest.approx(0.4), "f1max": pytest.approx(2 * 2 / (5 + 2))}


def test_image_metrics_perfect_and_inverted():
    labels = [0, 0, 1, 1]
    assert image_metrics(labels, [0, 1, 2, 3]) == {"auroc": 1.0, "ap": 1.0, "f1max": 1.0}
    assert image_metrics(labels, [3, 2, 1, 0])["auroc"] == 0.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_image_metrics_single_class_is_none_not_zero(labels):
    assert image_metrics(labels, np.arange(len(labels), dtype=float)) == {"auroc": None, "ap": None, "f1max": None}


def test_image_metrics_rejects_bad_input():
    with pytest.raises(NaglError, match="NaN"):
        image_metrics([0, 1], [0.1, float("nan")])
    with pytest.raises(NaglError, match="labels"):
        image_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(NaglError, match="match"):
        image_metrics([0, 1, 1], [0.1, 0.2])


# ------------------------------------------------------------------ pixel --


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_metrics_match_sklearn_and_slow_aupro(seed, dtype):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 4, 14)
    # Rounded maps: many ties inside and across the classes.
    maps = np.round(rng.random(masks.shape) * 0.6 + 0.4 * masks * rng.random(masks.shape), 1).astype(dtype)
    got = pixel_metrics(masks, maps)
    flat_labels, flat_scores = masks.ravel(), maps.ravel().astype(np.float64)
    assert got["auroc"] == pytest.approx(roc_auc_score(flat_labels, flat_scores), abs=1e-12)
    assert got["ap"] == pytest.approx(average_precision_score(flat_labels, flat_scores), abs=1e-12)
    assert got["f1max"] == pytest.approx(sklearn_f1max(flat_labels, flat_scores), abs=1e-12)
    assert got["aupro"] == pytest.approx(slow_aupro(masks, maps.astype(np.float64), 0.3), abs=1e-10)
    assert aupro(masks, maps) == got["aupro"]
    assert pixel_auroc(masks, maps) == got["auroc"]  # the checks' AUROC-only path: the same number


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_continuous_maps_and_limits_match_slow(fpr_limit):
    rng = np.random.default_rng(7)
    masks = blob_masks(rng, 3, 12, fraction=0.2)
    maps = ndimage.gaussian_filter(rng.random(masks.shape), sigma=(0, 1, 1)) + 0.2 * masks
    assert aupro(masks, maps, fpr_limit) == pytest.approx(slow_aupro(masks, maps, fpr_limit), abs=1e-10)


def test_aupro_regions_are_8_connected_and_never_span_images():
    # Image 0: a diagonal pair (one 8-connected region) and a lone pixel (a second region).
    # Image 1: a 4-pixel region at the same place as image 0's pair.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    masks[1, 0, 0] = masks[1, 0, 1] = masks[1, 1, 0] = masks[1, 1, 1] = True
    maps = np.zeros(masks.shape)
    maps[0, 0, 0] = 1.0
    # Threshold 1: FPR 0, PRO = mean(1/2, 0, 0) = 1/6; then (1, 1). Area to FPR 1: (1/6 + 1) / 2.
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx((1 / 6 + 1) / 2)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(slow_aupro(masks, maps, 1.0))


def test_aupro_perfect_inverted_and_constant_maps():
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, 3, 10)
    assert aupro(masks, masks.astype(float)) == 1.0
    assert aupro(masks, masks.astype(float) + rng.random(masks.shape) * 0.5) == 1.0
    assert aupro(masks, 1.0 - masks) == 0.0
    # One threshold: the curve is the diagonal, so the mean PRO up to 0.3 is 0.15.
    assert aupro(masks, np.full(masks.shape, 0.5)) == pytest.approx(0.15)
    constant = pixel_metrics(masks, np.full(masks.shape, 0.5, dtype=np.float32))
    assert constant["auroc"] == 0.5
    assert constant["ap"] == pytest.approx(masks.mean())


def test_aupro_never_above_one_with_many_tiny_regions():
    masks = np.zeros((3, 40, 40), dtype=bool)
    masks[:, ::3, ::3] = True  # 1,176 single-pixel regions: rounding-prone weights
    rng = np.random.default_rng(0)
    for maps in (masks + rng.random(masks.shape) * 0.9, masks * 1.0, rng.random(masks.shape)):
        for limit in (0.01, 0.3, 1.0):
            value = aupro(masks, maps, limit)
            assert 0.0 <= value <= 1.0
    assert aupro(masks, masks * 1.0) == 1.0


def test_pixel_metrics_undefined_cases_are_none():
    maps = np.random.default_rng(0).random((2, 5, 5))
    none = {"auroc": None, "ap": None, "f1max": None, "aupro": None}
    assert pixel_metrics(None, maps) == none  # a dataset without masks
    assert pixel_metrics(np.zeros(maps.shape, dtype=bool), maps) == none  # empty masks
    assert pixel_metrics(np.ones(maps.shape, dtype=bool), maps) == none  # no normal pixel
    assert aupro(None, maps) is None
    assert pixel_auroc(None, maps) is None and pixel_auroc(np.zeros(maps.shape, dtype=bool), maps) is None


def test_pixel_metrics_accept_uint8_masks_and_reject_bad_shapes():
    rng = np.random.default_rng(1)
    masks = blob_masks(rng, 2, 8)
    maps = rng.random(masks.shape)
    assert pixel_metrics(masks.astype(np.uint8) * 255, maps) == pixel_metrics(masks, maps)
    with pytest.raises(NaglError, match="shape"):
        pixel_metrics(masks[:1], maps)
    with pytest.raises(NaglError, match=r"\(N, H, W\)"):
        pixel_metrics(masks[0], maps[0])
    with pytest.raises(NaglError, match="fpr_limit"):
        pixel_metrics(masks, maps, fpr_limit=0.0)


def test_float32_path_groups_negative_zero_with_zero():
    masks = np.array([[[True, False, False, True]]])
    maps = np.array([[[0.0, -0.0, 1.0, -1.0]]], dtype=np.float32)
    got = pixel_metrics(masks, maps)
    ref = pixel_metrics(masks, maps.astype(np.float64))
    assert got == ref
    assert got["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
