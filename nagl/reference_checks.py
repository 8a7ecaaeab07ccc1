"""The reference-use check: does a method use its abnormal references?

A clean cell with ``k_abnormal > 0`` of a method that takes abnormal references
is scored again with its abnormal references swapped, everything else (normal
references, queries, their features) unchanged. Two variants
(``nagl.protocol.REFERENCE_CHECK_VARIANTS``):

- ``other-category-anomaly``: anomalies of ANOTHER category of the same target,
  with their own masks. A target with one category has no such anomaly: the
  variant is skipped for it (no row).
- ``normal-pseudo-mask``: normal ``train/good`` images of the cell's category that
  are not among its normal references (so never a query or a reference of the
  cell), each with the same pseudo-mask: the centre square whose side is
  ``PSEUDO_MASK_SIDE`` of the image side. Skipped when the category has no such
  spare image.

Each variant's references are drawn once per (target, category, seed) with their
own seeded generator (``[split_seed, 4]`` and ``[split_seed, 5]``), as a
permutation of the path-sorted candidates; the first k serve ``k_abnormal = k``,
as in the clean split. A method whose image AUROC barely moves under either swap
does not use what its abnormal reference shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from nagl.methods.base import anomaly_maps, image_scores
from nagl.metrics import image_metrics
from nagl.metrics import pixel_auroc as pixel_auroc_of
from nagl.protocol import REFERENCE_CHECK_VARIANTS, ReferenceSplit, split_seed

OTHER_CATEGORY, NORMAL_PSEUDO_MASK = REFERENCE_CHECK_VARIANTS
PSEUDO_MASK_SIDE = 0.5  # side of the centre-square pseudo-mask, relative to the image side
_GENERATOR_ROLE = {OTHER_CATEGORY: 4, NORMAL_PSEUDO_MASK: 5}  # 0-3: the clean and reference-code draws
CHECK_COLUMNS = ["variant", "image_auroc", "pixel_auroc"]


@dataclass(frozen=True, eq=False)
class SwappedReferences:
    """The abnormal references of one variant for one (target, category, seed), in nesting order."""

    variant: str
    rows: pd.DataFrame  # manifest rows
    square_mask: bool  # every reference gets the centre-square pseudo-mask instead of its own mask


def _seeded_draw(candidates: pd.DataFrame, count: int, split: ReferenceSplit, variant: str) -> pd.DataFrame:
    candidates = candidates.sort_values("image_path", kind="stable").reset_index(drop=True)
    rng = np.random.default_rng([split_seed(split.dataset, split.category, split.seed), _GENERATOR_ROLE[variant]])
    return candidates.iloc[rng.permutation(len(candidates))[:count]].reset_index(drop=True)


def draw_swapped_references(manifest: pd.DataFrame, split: ReferenceSplit, max_k_abnormal: int) -> list[SwappedReferences]:
    """Both variants' references for ``split``'s (target, category, seed); a variant without candidates is left out."""
    target = manifest[manifest["dataset"] == split.dataset]
    other = target[(target["category"] != split.category) & (target["split"] == "test") & (target["label"] == 1)]
    spare = target[(target["category"] == split.category) & (target["split"] == "train") & (target["label"] == 0)
                   & ~target["image_path"].isin(set(split.normal["image_path"]))]
    drawn = [SwappedReferences(OTHER_CATEGORY, _seeded_draw(other, max_k_abnormal, split, OTHER_CATEGORY), False),
             SwappedReferences(NORMAL_PSEUDO_MASK, _seeded_draw(spare, max_k_abnormal, split, NORMAL_PSEUDO_MASK), True)]
    return [variant for variant in drawn if len(variant.rows)]


def centre_square(size: int) -> np.ndarray:
    """The pseudo-mask of the ``normal-pseudo-mask`` variant: a centred square, ``PSEUDO_MASK_SIDE`` of the side."""
    side = max(1, round(size * PSEUDO_MASK_SIDE))
    start = (size - side) // 2
    mask = np.zeros((size, size), dtype=bool)
    mask[start:start + side, start:start + side] = True
    return mask


def check_row(variant: str, labels: np.ndarray, patch_map: torch.Tensor, query_masks: np.ndarray | None,
              resolution: int) -> dict | None:
    """A row of ``reference_checks`` (without run_id) from the variant's patch maps; None if AUROC is undefined."""
    image_auroc = image_metrics(labels, image_scores(patch_map).numpy().astype(np.float64))["auroc"]
    if image_auroc is None:
        return None
    pixel_auroc = None
    if query_masks is not None:
        pixel_auroc = pixel_auroc_of(query_masks, anomaly_maps(patch_map, resolution).numpy())
    return {"variant": variant, "image_auroc": image_auroc, "pixel_auroc": pixel_auroc}


def check_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=CHECK_COLUMNS)
    return frame.astype({"variant": object, "image_auroc": "float64", "pixel_auroc": "float64"})
