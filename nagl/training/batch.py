"""The contract between the training loop and a trainable method's loss.

A method says what an episode needs with :meth:`batch_spec` (a :class:`BatchSpec`);
the loop draws episodes accordingly and hands the method an :class:`EpisodeBatch`,
from which ``loss`` reads features and masks. This module imports no other part of
the package, so method modules can depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class BatchSpec:
    """What one training episode holds.

    ``normal_shots`` / ``abnormal_shots``: the counts ``k1`` / ``k2`` drawn per episode.
    ``mask_size``: side of the pixel masks the loss reads; abnormal references then
    need a mask (anomalies without one are not used). ``None``: the loss reads no
    masks, and every anomaly can serve. ``abnormal_query_rate``: probability that an
    episode's query is abnormal. ``match_defect_type``: an abnormal query has the
    defect type of its abnormal references (the paper); False: another type of the
    category where it has one (as at test time, where references are of any type).

    Multi-level methods: ``level_group`` names the backbone level group the loss reads
    (:meth:`EpisodeBatch.query_levels`), ``needs_embed`` adds the image embedding.
    ``balanced``: each batch is exactly half abnormal queries (the rest normal), drawn
    from each label's pool of source images in a seeded permutation, cycled; the
    query's references come from its own category. ``normal_only_epochs``: the first
    epochs draw normal queries only. ``calibration_images`` / ``calibrate_on_validation``:
    which source episodes the method's ``calibrate`` gets after training (up to this many
    normal training images as queries / the held-out source episodes: the selection's reference
    draws over every held-out image, else the validation episodes; neither: not called).
    """

    normal_shots: tuple[int, ...]
    abnormal_shots: tuple[int, ...]
    mask_size: int | None = None
    abnormal_query_rate: float = 0.5
    level_group: str | None = None
    needs_embed: bool = False
    balanced: bool = False
    normal_only_epochs: int = 0
    calibration_images: int = 0
    calibrate_on_validation: bool = False
    match_defect_type: bool = True

    @property
    def needs_masks(self) -> bool:
        return self.mask_size is not None


@dataclass(frozen=True)
class Episode:
    """Manifest rows of one episode: a query and its references (all of one category)."""

    category: str
    query: int
    label: int
    normal: tuple[int, ...]
    abnormal: tuple[int, ...]
    defect: str


class Features(Protocol):
    """Where a batch reads from: features and masks by manifest row."""

    grid: tuple[int, int]

    def features(self, rows: Sequence[int]) -> torch.Tensor: ...

    def levels(self, rows: Sequence[int]) -> dict[str, torch.Tensor]: ...

    def mask(self, row: int) -> torch.Tensor: ...


@dataclass
class EpisodeBatch:
    """A batch of episodes, with access to their cached features and masks."""

    episodes: Sequence[Episode]
    store: Features

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def grid(self) -> tuple[int, int]:
        return self.store.grid

    def labels(self) -> torch.Tensor:
        """``(B,)`` float: 1 for an abnormal query."""
        return torch.tensor([float(e.label) for e in self.episodes])

    def queries(self) -> torch.Tensor:
        """``(B, G, C)`` query features."""
        return self.store.features([e.query for e in self.episodes])

    def normal(self, i: int) -> torch.Tensor:
        """``(k1, G, C)`` normal reference features of episode ``i``."""
        return self.store.features(list(self.episodes[i].normal))

    def abnormal(self, i: int) -> torch.Tensor:
        """``(k2, G, C)`` abnormal reference features of episode ``i``."""
        return self.store.features(list(self.episodes[i].abnormal))

    def abnormal_masks(self, i: int) -> torch.Tensor:
        """``(k2, S, S)`` bool masks of episode ``i``'s abnormal references."""
        return torch.stack([self.store.mask(r) for r in self.episodes[i].abnormal])

    def query_masks(self) -> torch.Tensor:
        """``(B, S, S)`` bool query masks (all False for a normal query)."""
        return torch.stack([self.store.mask(e.query) for e in self.episodes])

    def categories(self) -> list[str]:
        """The category of each episode (its query's)."""
        return [e.category for e in self.episodes]

    def query_levels(self) -> dict[str, torch.Tensor]:
        """``{level: (B, G_l, C_l)}`` of the queries (``"embed"``: ``(B, D)``), the levels the method reads."""
        return self.store.levels([e.query for e in self.episodes])

    def normal_levels(self, i: int) -> dict[str, torch.Tensor]:
        """``{level: (k1, G_l, C_l)}`` of episode ``i``'s normal references."""
        return self.store.levels(list(self.episodes[i].normal))

    def abnormal_levels(self, i: int) -> dict[str, torch.Tensor]:
        """``{level: (k2, G_l, C_l)}`` of episode ``i``'s abnormal references."""
        return self.store.levels(list(self.episodes[i].abnormal))
