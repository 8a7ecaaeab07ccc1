"""Seeded splits and subsets shared by the builders that make their own splits.

- :func:`split_normals`: the datasets-wave2 rule for a release without a normal
  train/test split: sort the names, permute them with ``numpy.random.default_rng(seed)``,
  test = the first ``ceil(0.25 n)``, train = the rest.
- :func:`capped`: a documented, seeded subset for quick runs (a builder's
  ``max_images`` option): sort, permute with ``default_rng([seed, stream])``, keep the
  first ``cap``. A different ``stream`` per split keeps the subsets independent.

Both depend only on the names and the seed, never on file-system order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nagl.errors import NaglError

TEST_FRACTION = 0.25
CAP_KEYS = ("train_good", "test_good", "test_anomalous")


def split_normals(names: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """Normal images to ``(train, test)``: test = ``ceil(0.25 n)`` of a seeded permutation."""
    ordered = sorted(names)
    n_test = math.ceil(TEST_FRACTION * len(ordered))
    order = np.random.default_rng(seed).permutation(len(ordered))
    test = sorted(ordered[i] for i in order[:n_test])
    train = sorted(ordered[i] for i in order[n_test:])
    return train, test


def capped(items: Sequence[Any], cap: int | None, seed: int, stream: int) -> list[Any]:
    """At most ``cap`` of ``items`` (sortable), drawn by a seeded permutation; all when ``cap`` is None."""
    ordered = sorted(items)
    if cap is None or cap >= len(ordered):
        return ordered
    order = np.random.default_rng([seed, stream]).permutation(len(ordered))
    return sorted(ordered[i] for i in order[:cap])


def read_caps(options: Mapping[str, Any], where: str) -> dict[str, int | None]:
    """The ``max_images: {train_good, test_good, test_anomalous}`` option (each optional, a positive integer)."""
    raw = options.get("max_images") or {}
    if not isinstance(raw, Mapping) or set(raw) - set(CAP_KEYS):
        raise NaglError(f"{where}: option 'max_images' must map some of {', '.join(CAP_KEYS)} to a "
                        f"positive integer, got {raw!r}")
    caps: dict[str, int | None] = {}
    for key in CAP_KEYS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise NaglError(f"{where}: max_images.{key} must be a positive integer, got {value!r}")
        caps[key] = value
    return caps


def read_seed(options: Mapping[str, Any], where: str) -> int:
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise NaglError(f"{where}: option 'seed' must be an integer, got {seed!r}")
    return seed
