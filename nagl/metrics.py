"""Image and pixel metrics: AUROC, AP, F1-max and AUPRO, exact and tie-correct.

All curves come from one descending sort of the scores. Tied scores form one
threshold (one curve point), as in scikit-learn, so ties get half credit in AUROC
and no ordering among tied items is ever invented. Nothing is approximated on a
histogram.

- AUROC: trapezoidal area under (FPR, TPR), counted exactly in integers.
- AP: scikit-learn's step-wise definition, sum over thresholds of (R_n - R_{n-1}) P_n.
- F1-max: the largest 2TP / (2TP + FP + FN) over all thresholds.
- AUPRO (MVTec AD): ground-truth regions are the 8-connected components of each
  mask (the connectivity of the MVTec AD evaluation code); a region never spans two
  images. At a threshold t, PRO(t) is the mean over all regions of all images of the
  fraction of the region's pixels scoring >= t, and FPR(t) the fraction of normal
  pixels (over all images) scoring >= t. The curve, from (0, 0), is integrated
  (trapezoids) up to ``fpr_limit``, where it is interpolated linearly, and divided by
  ``fpr_limit``: the result lies in [0, 1].

A metric that is not defined (only one class present, or no masks at all) is
``None``, stored as NULL: never 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nagl.errors import NaglError

# 8-connectivity inside each image, none across images of the (N, H, W) stack.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True

IMAGE_METRICS = ("auroc", "ap", "f1max")
PIXEL_METRICS = ("auroc", "ap", "f1max", "aupro")


def _finite_scores(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "fiub":
        raise NaglError(f"{name} must be numeric, got dtype {array.dtype}")
    if array.dtype.kind != "f":
        array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise NaglError(f"{name} contain NaN or infinite values; the method produced invalid scores")
    return array


def _threshold_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Descending sort order and the index of the last element of each tie group."""
    order = np.argsort(scores)[::-1]
    ranked = scores[order]
    ends = np.flatnonzero(ranked[1:] != ranked[:-1])
    return order, np.append(ends, ranked.size - 1)


def _rank_pixels(scores: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region ids in descending score order, and the last index of each tie group.

    float32 scores take a faster path: one in-place sort of 64-bit keys
    (order-preserving score bits above, region id below) instead of an argsort and a
    gather; it groups ties exactly as the general path does. The keys are built in
    one buffer and the region ids are read back as a view of it, so a full-resolution
    stack costs one 64-bit array, not one per step.
    """
    if scores.dtype != np.float32:
        order, ends = _threshold_groups(scores)
        return regions[order], ends
    bits = np.add(scores, np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into +0.0; a copy to work in
    flip = bits >= np.uint32(0x80000000)  # negative scores: invert every bit
    np.invert(bits, out=bits, where=flip)
    np.logical_not(flip, out=flip)  # the others: set the sign bit
    np.bitwise_or(bits, np.uint32(0x80000000), out=bits, where=flip)
    keys = bits.astype(np.uint64)
    del bits, flip
    keys <<= np.uint64(32)
    keys |= regions.astype(np.uint32, copy=False)
    keys.sort()
    changes = np.bitwise_xor(keys[1:], keys[:-1])
    changes >>= np.uint64(32)  # nonzero where the score changes
    # Ascending ends of tie groups -> descending: a group ending at i (ascending) starts at n-1-i.
    ends = (keys.size - 2) - np.flatnonzero(changes)[::-1]
    del changes
    low_words = keys.view(np.uint32)[0::2] if np.little_endian else keys.view(np.uint32)[1::2]
    return low_words[::-1], np.append(ends, keys.size - 1)


def _roc_pr(tp: np.ndarray, fp: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max from cumulative true/false positive counts per threshold."""
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    tp = tp.astype(np.int64)
    fp = fp.astype(np.int64)
    tp_prev = np.concatenate(([0], tp[:-1]))
    fp_prev = np.concatenate(([0], fp[:-1]))
    # Twice the trapezoid area in count units: an exact integer.
    doubled_area = int(np.sum((fp - fp_prev) * (tp + tp_prev)))
    auroc = doubled_area / (2.0 * n_pos * n_neg)
    precision = tp / (tp + fp)
    ap = float(np.sum((tp - tp_prev) * precision) / n_pos)
    f1max = float(np.max(2.0 * tp / (tp + fp + n_pos)))
    return {"auroc": auroc, "ap": ap, "f1max": f1max}


def image_metrics(labels, scores) -> dict[str, float | None]:
    """Image AUROC, AP, F1-max of scores (higher = more anomalous) against 0/1 labels."""
    labels = np.asarray(labels).ravel()
    scores = _finite_scores(scores, "image scores").ravel()
    if labels.shape != scores.shape:
        raise NaglError(f"{labels.size} labels but {scores.size} image scores; they must match one to one")
    if not np.isin(labels, (0, 1)).all():
        raise NaglError("image labels must be 0 (normal) or 1 (anomalous)")
    positive = labels.astype(bool)
    if positive.all() or not positive.any():
        return dict.fromkeys(IMAGE_METRICS)
    order, ends = _threshold_groups(scores)
    tp = np.cumsum(positive[order])[ends]
    fp = ends + 1 - tp
    return _roc_pr(tp, fp)


def _pixel_inputs(masks, maps) -> tuple[np.ndarray | None, np.ndarray]:
    maps = _finite_scores(maps, "anomaly maps")
    if maps.ndim != 3:
        raise NaglError(f"anomaly maps must be an (N, H, W) array, got shape {maps.shape}")
    if masks is None:
        return None, maps
    masks = np.asarray(masks)
    masks = masks if masks.dtype == bool else masks > 0
    if masks.shape != maps.shape:
        raise NaglError(
            f"masks {masks.shape} and anomaly maps {maps.shape} differ in shape; "
            "compute both at the evaluation resolution"
        )
    return masks, maps


def _aupro_from_curve(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    x = np.concatenate(([0.0], fpr))
    y = np.concatenate(([0.0], pro))
    inside = int(np.searchsorted(x, fpr_limit, side="right"))  # x[:inside] <= fpr_limit
    xs, ys = x[:inside], y[:inside]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1])) / 2.0)
    if inside < x.size and xs[-1] < fpr_limit:
        x0, x1, y0, y1 = xs[-1], x[inside], ys[-1], y[inside]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (fpr_limit - x0) * (y0 + y_limit) / 2.0
    # Cumulative sums of region weights can overshoot 1 by rounding; clip that only.
    return float(min(max(area / fpr_limit, 0.0), 1.0))


def _check_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise NaglError(f"fpr_limit must be in (0, 1], got {fpr_limit}; fix the AUPRO setting")


def _pixel_metrics(masks, maps, fpr_limit: float, with_roc_pr: bool) -> dict[str, float | None]:
    _check_limit(fpr_limit)
    masks, maps = _pixel_inputs(masks, maps)
    undefined = dict.fromkeys(PIXEL_METRICS)
    if masks is None:
        return undefined
    n_pixels = masks.size
    n_pos = int(np.count_nonzero(masks))
    if n_pos == 0 or n_pos == n_pixels:
        return undefined

    regions, n_regions = ndimage.label(masks, structure=_STRUCTURE)
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)
    # Each pixel of region r weighs 1 / (R * |r|): summed over pixels >= t, that is PRO(t).
    region_weight = np.zeros(n_regions + 1)
    region_weight[1:] = 1.0 / (n_regions * sizes[1:])

    ranked_regions, ends = _rank_pixels(maps.ravel(), regions.ravel())
    tp = np.cumsum(ranked_regions != 0)[ends]
    fp = ends + 1 - tp
    pro = np.cumsum(region_weight[ranked_regions])[ends]
    pro /= pro[-1]  # the sum of all weights is 1 up to rounding: make it exactly 1
    fpr = fp / (n_pixels - n_pos)

    result = _roc_pr(tp, fp) if with_roc_pr else {}
    result["aupro"] = _aupro_from_curve(fpr, pro, fpr_limit)
    return result


def pixel_metrics(masks, maps, fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Pixel AUROC, AP, F1-max and AUPRO of maps (N, H, W) against boolean masks (N, H, W).

    ``masks=None`` (a dataset without masks), or masks without any anomalous or
    without any normal pixel, give None for every metric.
    """
    return _pixel_metrics(masks, maps, fpr_limit, with_roc_pr=True)


def pixel_auroc(masks, maps) -> float | None:
    """Pixel AUROC alone, the same number as :func:`pixel_metrics` gives, without its curves:
    the reference-use checks report only it.

    The trapezoid area under the ROC curve is the Mann-Whitney statistic: the share of
    (anomalous, normal) pixel pairs ranked in order, a tie counting one half. So only the
    normal pixels are sorted, and each anomalous pixel is placed among them by binary search;
    the count is an exact integer, as in :func:`_roc_pr`.
    """
    masks, maps = _pixel_inputs(masks, maps)
    if masks is None:
        return None
    n_pos = int(np.count_nonzero(masks))
    n_neg = masks.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    flat, labels = maps.ravel(), masks.ravel()
    normal = np.sort(flat[~labels])
    anomalous = flat[labels]
    below = np.searchsorted(normal, anomalous, side="left")
    not_above = np.searchsorted(normal, anomalous, side="right")
    doubled = int(below.sum(dtype=np.int64)) + int(not_above.sum(dtype=np.int64))  # 2 x below + ties
    return doubled / (2.0 * n_pos * n_neg)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float | None:
    """AUPRO up to ``fpr_limit``, normalised to [0, 1] (see the module docstring)."""
    return _pixel_metrics(masks, maps, fpr_limit, with_roc_pr=False)["aupro"]
