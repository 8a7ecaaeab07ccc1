"""Training-free nearest-neighbour peers of NAGL.

- ``knn-normal`` (PatchCore / AnomalyDINO style): ``S = 1 - s_n``, where ``s_n`` is
  the best ``sim`` of a query patch over the normal bank. It is NAGL with no
  abnormal reference.
- ``knn-naive`` (the paper's "naive normal + abnormal nearest neighbour" ablation):
  ``S = (s_abn + 1 - s_n) / 2``, ``s_abn`` = the best ``sim`` of a query patch over
  the abnormal patches of the abnormal references (mask pooled to the grid, or the
  pseudo-mask). With no abnormal reference it equals ``knn-normal``.

Both follow the shared reference rules of :func:`nagl.methods.base.prepare_references`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nagl.methods.base import (
    MaskInput,
    Method,
    NormalSide,
    References,
    infer_grid,
    nested_normal_side,
    normal_scores,
    prepare_references,
)
from nagl.methods.registry import register_method


@register_method
class KnnNormal(Method):
    name = "knn-normal"
    trainable = False
    uses_abnormal_refs = False

    def __init__(self, dim: int):
        super().__init__(dim)

    @torch.no_grad()
    def score(self, query: torch.Tensor, normal: torch.Tensor | None = None,
              abnormal: torch.Tensor | None = None, abnormal_masks: MaskInput = None,
              grid: tuple[int, int] | None = None, chunk: int = 8,
              normal_side: NormalSide | None = None) -> torch.Tensor:
        h, w = grid = infer_grid(query.shape[1], grid)
        query = query.float()
        refs = prepare_references(normal, abnormal, abnormal_masks, grid)
        s_n = normal_side.s_n if normal_side is not None else normal_scores(query, refs.bank, chunk)
        return self._merge(query, refs, s_n, chunk).reshape(-1, h, w)

    def normal_side(self, query: torch.Tensor, normal: torch.Tensor, shots: Sequence[int]) -> dict[int, NormalSide]:
        return nested_normal_side(query.float(), normal, shots)

    def _merge(self, query: torch.Tensor, refs: References, s_n: torch.Tensor, chunk: int) -> torch.Tensor:
        """The patch map from ``s_n`` (and, in subclasses, the abnormal references)."""
        return 1.0 - s_n


@register_method
class KnnNaive(KnnNormal):
    name = "knn-naive"
    uses_abnormal_refs = True

    def _merge(self, query: torch.Tensor, refs: References, s_n: torch.Tensor, chunk: int) -> torch.Tensor:
        if refs.k_abnormal == 0:
            return 1.0 - s_n
        s_abn = normal_scores(query, refs.abnormal[refs.patch_mask], chunk)
        return (s_abn + 1.0 - s_n) / 2.0
