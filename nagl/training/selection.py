"""Checkpoint selection that tracks detection, on the SOURCE only (``select = "auroc"``).

The benchmark scores a method by the image AUROC of its image scores over the
queries of a category, against one reference draw. Selection does the same on
held-out images of the source: for each source category, ``draws`` reference sets
are drawn once (normal references from the category's training pool, abnormal ones
from its training-pool anomalies of any defect type, as at test time), and every
held-out query of the category is scored against each of them. The selection score
is the mean over (category, draw) of the image AUROC: ``draws x held-out images``
scored episodes per epoch. Nothing from a target dataset is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nagl.io import stable_hash
from nagl.methods import TrainableMethod
from nagl.methods.base import NormalSide, final_image_scores, score_batch
from nagl.training.batch import BatchSpec, Episode
from nagl.training.episodes import FeatureStore, SourcePool


@dataclass(frozen=True)
class DetectionSet:
    """Held-out queries of one source category, all scored against one reference draw."""

    category: str
    normal: tuple[int, ...]
    abnormal: tuple[int, ...]
    queries: tuple[int, ...]
    labels: tuple[int, ...]

    def episodes(self) -> list[Episode]:
        """The set as episodes: each held-out query with the set's references."""
        return [Episode(self.category, query, label, self.normal, self.abnormal, "")
                for query, label in zip(self.queries, self.labels, strict=True)]


def detection_sets(train: SourcePool, val: SourcePool, spec: BatchSpec, draws: int, seed: int) -> list[DetectionSet]:
    """``draws`` reference draws per category that has held-out normal and abnormal images.

    Draw ``d`` uses ``normal_shots[d % n]`` normal and ``abnormal_shots[d % m]``
    abnormal references, so the trained shot settings take turns.
    """
    sets = []
    for category in train.categories():
        normals = list(val.normals.get(category, []))
        anomalies = sorted(i for indices in val.anomalies.get(category, {}).values() for i in indices)
        if not normals or not anomalies:
            continue
        queries = tuple(normals + anomalies)
        labels = tuple([0] * len(normals) + [1] * len(anomalies))
        pool_normal = train.normals[category]
        pool_abnormal = sorted(i for indices in train.anomalies[category].values() for i in indices)
        for draw in range(draws):
            rng = np.random.default_rng(int(stable_hash([seed, category, draw, "selection-references"]), 16))
            k1 = min(int(spec.normal_shots[draw % len(spec.normal_shots)]), len(pool_normal))
            k2 = min(int(spec.abnormal_shots[draw % len(spec.abnormal_shots)]), len(pool_abnormal))
            normal = tuple(int(pool_normal[i]) for i in rng.choice(len(pool_normal), size=k1, replace=False))
            abnormal = tuple(int(pool_abnormal[i]) for i in rng.choice(len(pool_abnormal), size=k2, replace=False))
            sets.append(DetectionSet(category, normal, abnormal, queries, labels))
    return sets


# Side of the pixel maps for a method whose image score reads them (the default eval_resolution).
SELECTION_RESOLUTION = 256


@torch.no_grad()
def set_scores(method: TrainableMethod, detection_set: DetectionSet, store: FeatureStore,
               batch: int = 8, normal_sides: dict[DetectionSet, NormalSide | None] | None = None) -> np.ndarray:
    """The method's image scores of a set's queries against its references, as evaluation computes
    them: the method's own image scores when ``score`` returns them, else its ``image_scores`` hook
    (a multi-level method gets its levels, their grids and the category; a method that ignores
    abnormal references gets none).

    A method with a normal side to share (``Method.normal_side``: work that depends on the
    frozen features and the normal references only) scores the set's queries in one call with
    it; ``normal_sides`` keeps it per set across calls (the epochs of one training).
    """
    multi = method.level_group is not None
    features = store.levels if multi else store.features
    grid = ({name: (h, w) for name, (h, w, _) in method.config["levels"].items()} if multi else store.grid)
    abnormal_rows = list(detection_set.abnormal) if method.uses_abnormal_refs else []
    normal, abnormal = features(list(detection_set.normal)), features(abnormal_rows)
    masks = (torch.stack([store.mask(r) for r in abnormal_rows])
             if store.mask_size is not None and abnormal_rows else None)
    side = None
    if detection_set.normal:
        if normal_sides is not None and detection_set in normal_sides:
            side = normal_sides[detection_set]
        else:
            k = len(detection_set.normal)
            sides = method.normal_side(features(list(detection_set.queries)), normal, [k])
            side = sides[k] if sides is not None else None
            if normal_sides is not None:
                normal_sides[detection_set] = side
    if side is not None:
        patch, part = score_batch(method, features(list(detection_set.queries)), normal, abnormal, masks, grid,
                                  detection_set.category, side)
        patches, parts = [patch], [part]
    else:
        patches, parts = [], []
        for start in range(0, len(detection_set.queries), batch):
            query = features(list(detection_set.queries[start:start + batch]))
            patch, part = score_batch(method, query, normal, abnormal, masks, grid, detection_set.category)
            patches.append(patch)
            parts.append(part)
    scores, _ = final_image_scores(method, torch.cat(patches), parts, SELECTION_RESOLUTION)
    return scores.numpy().astype(np.float64)


def detection_auroc(method: TrainableMethod, sets: Sequence[DetectionSet], store: FeatureStore,
                    batch: int = 8, normal_sides: dict[DetectionSet, NormalSide | None] | None = None) -> float:
    """Mean image AUROC over the sets (the selection score of ``select = "auroc"``); ``normal_sides``
    as in :func:`set_scores`."""
    from sklearn.metrics import roc_auc_score

    method.trainable_module().eval()
    values = [roc_auc_score(s.labels, set_scores(method, s, store, batch, normal_sides)) for s in sets]
    return float(np.mean(values))
