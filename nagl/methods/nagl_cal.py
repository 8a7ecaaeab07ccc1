"""``nagl-cal``: NAGL whose abnormal-guided map has a weight fixed on the SOURCE.

The head is NAGL's and is trained exactly as ``nagl`` (same losses, same merge in
the loss). Only the test-time merge differs:

    S = 1 - s_n + lambda * s_a

``lambda = 0`` is knn-normal and ``lambda = 1`` ranks every image as ``nagl`` does
(``(s_a + 1 - s_n) / 2`` is the same map times 1/2), so the calibration chooses
between, and around, the two. After training and checkpoint selection the loop calls
:meth:`NaglCalMethod.calibrate` with the held-out source validation episodes:
``lambda`` is the value of :data:`ABNORMAL_WEIGHTS` whose image scores (the test-time
top-1 % rule) have the highest image AUROC over those episodes (ties: the smaller
weight). It is stored in the method config (``model.json``), so it travels with the
checkpoint and enters the method config hash of every result row. Nothing from a
target dataset is read.

``match_defect_type`` (training episodes): True, an abnormal query gets references of
its own defect type (the paper); False (the default, chosen on the sources: see
docs/methods.md), of another type of its category where it has one (test-time
references are drawn over all types, independently of the query).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from nagl.errors import NaglError
from nagl.methods.base import image_scores
from nagl.methods.nagl import NaglMethod
from nagl.methods.registry import register_method
from nagl.training.batch import BatchSpec, EpisodeBatch

# The candidate weights of s_a; 0 = knn-normal, 1 = nagl's ranking.
ABNORMAL_WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


@register_method
class NaglCalMethod(NaglMethod):
    """NAGL with ``S = 1 - s_n + abnormal_weight * s_a``, the weight calibrated on the source.

    Before calibration ``abnormal_weight`` is 1 (nagl's ranking); a trained checkpoint
    always holds the calibrated value.
    """

    name = "nagl-cal"

    def __init__(self, dim: int, proxies: int = 25, heads: int = 4, seed: int = 0, loss_form: str = "paper",
                 abnormal_weight: float = 1.0, match_defect_type: bool = False):
        super().__init__(dim, proxies=proxies, heads=heads, seed=seed, loss_form=loss_form)
        weight = float(abnormal_weight)
        if not math.isfinite(weight) or weight < 0:
            raise NaglError(f"nagl-cal: abnormal_weight must be a finite number >= 0, got {abnormal_weight!r}")
        if not isinstance(match_defect_type, bool):
            raise NaglError(f"nagl-cal: match_defect_type must be true or false, got {match_defect_type!r}")
        self.config.update(abnormal_weight=weight, match_defect_type=match_defect_type)

    def batch_spec(self, normal_shots: tuple[int, ...], abnormal_shots: tuple[int, ...]) -> BatchSpec:
        return replace(super().batch_spec(normal_shots, abnormal_shots),
                       match_defect_type=self.config["match_defect_type"], calibrate_on_validation=True)

    def training_settings(self) -> dict[str, Any]:
        """NAGL's settings without the weight: it is an outcome of calibration, not a setting."""
        return {k: v for k, v in super().training_settings().items() if k != "abnormal_weight"}

    def merge(self, s_n: torch.Tensor, s_a: torch.Tensor) -> torch.Tensor:
        return 1.0 - s_n + self.config["abnormal_weight"] * s_a

    @torch.no_grad()
    def calibrate(self, batches: Sequence[EpisodeBatch]) -> dict[str, Any]:
        """Fix ``abnormal_weight`` on held-out source episodes (see the module docstring)."""
        episodes = [episode for batch in batches for episode in batch.episodes]
        labels = np.array([e.label for e in episodes])
        if len(set(labels.tolist())) < 2:
            raise NaglError("nagl-cal: calibration needs source validation episodes with normal and abnormal "
                            "queries; train with a profile that holds out a validation split "
                            "(val_fraction > 0, val_episodes >= 2), e.g. the `embedded` profile")
        self.trainable_module().eval()
        h, w = batches[0].grid
        s_n, s_a = [], []
        for batch in batches:
            n, a = self.batch_maps(batch)
            s_n.append(n)
            s_a.append(a)
        s_n_all, s_a_all = torch.cat(s_n), torch.cat(s_a)
        aurocs = {weight: _auroc(labels, image_scores((1.0 - s_n_all + weight * s_a_all).reshape(-1, h, w)).numpy())
                  for weight in ABNORMAL_WEIGHTS}
        best = max(aurocs.values())
        chosen = min(weight for weight, value in aurocs.items() if value == best)
        self.config["abnormal_weight"] = chosen
        return {"abnormal_weight": chosen, "rule": "max source-validation image AUROC, ties: smaller weight",
                "n_episodes": len(episodes), "val_auroc": {str(k): v for k, v in aurocs.items()}}
