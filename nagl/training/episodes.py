"""Episodes over a SOURCE dataset's cached features.

An episode (``../shared/spec/nagl-method.md``): a category drawn uniformly; ``k1``
normal references (``k1`` drawn from the spec's ``normal_shots``); ``k2`` abnormal
references of one defect type (with masks when the method's loss reads masks); a
query, abnormal with probability ``abnormal_query_rate`` (an abnormal query has
the references' defect type, or with ``match_defect_type`` False another type of
the category where it has one); the query is never one of its references.

Validation queries are a seeded share of each category's images per defect type,
held out from the SOURCE dataset. Nothing from a target dataset is ever read here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nagl.data.images import load_mask
from nagl.errors import NaglError
from nagl.io import stable_hash
from nagl.methods.base import infer_grid
from nagl.training.batch import BatchSpec, Episode

FeatureLookup = Mapping[str, torch.Tensor] | Callable[[Sequence[str]], torch.Tensor]
# (sha256s, level names) -> {level: (N, G_l, C_l)}, e.g. ``FeatureCache.load_levels``
LevelLookup = Callable[[Sequence[str], Sequence[str]], Mapping[str, torch.Tensor]]

POOLED = "(pooled defects)"


@dataclass
class SourcePool:
    """The source images usable for training, split into train and validation pools.

    ``normals[category]`` / ``anomalies[category][defect]``: indices into ``items``.
    """

    items: pd.DataFrame
    normals: dict[str, list[int]] = field(default_factory=dict)
    anomalies: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def categories(self) -> list[str]:
        return sorted(c for c in self.normals if self.normals[c] and self.anomalies.get(c))


def split_source(manifest: pd.DataFrame, spec: BatchSpec, val_fraction: float, seed: int,
                 dataset: str = "source") -> tuple[SourcePool, SourcePool, list[str]]:
    """Seeded train / validation pools of the source, per category and defect type.

    A share ``val_fraction`` (rounded) of each group is held out, but the training
    pool keeps enough for an episode: ``max(normal_shots) + 1`` normal images and
    ``max(abnormal_shots) + 1`` images per defect type. Anomalies without a mask (when
    the spec needs masks) and defect types too small for an episode are not used,
    except that a category where no defect type is large enough has its usable
    anomalies pooled into one group
    (:data:`POOLED`; its abnormal queries may then differ in type from the
    references). Returns the pools and the names of categories that cannot form an
    episode.
    """
    items = manifest.reset_index(drop=True)
    need_normal = max(spec.normal_shots) + 1
    need_abnormal = max(spec.abnormal_shots) + 1
    train, val = SourcePool(items), SourcePool(items)
    skipped = []
    for category in sorted(items["category"].unique()):
        rows = items[items["category"] == category]
        groups = {"good": rows.index[rows["label"] == 0].tolist()}
        usable = rows[rows["label"] == 1]
        if spec.needs_masks:
            usable = usable[usable["mask_path"].notna()]
        for defect in sorted(usable["defect_type"].unique()):
            groups[defect] = usable.index[usable["defect_type"] == defect].tolist()
        if len(groups) > 1 and max(len(v) for k, v in groups.items() if k != "good") < need_abnormal:
            groups = {"good": groups["good"], POOLED: usable.index.tolist()}
        for group, indices in groups.items():
            need = need_normal if group == "good" else need_abnormal
            if len(indices) < need:
                continue
            rng = np.random.default_rng(int(stable_hash([dataset, category, group, seed, "val"]), 16))
            order = [indices[i] for i in rng.permutation(len(indices))]
            n_val = min(round(val_fraction * len(order)), len(order) - need)
            held, kept = sorted(order[:n_val]), sorted(order[n_val:])
            if group == "good":
                train.normals[category], val.normals[category] = kept, held
            else:
                train.anomalies.setdefault(category, {})[group] = kept
                if held:
                    val.anomalies.setdefault(category, {})[group] = held
        if category not in train.categories():
            skipped.append(str(category))
    return train, val, skipped


def draw_episode(pool: SourcePool, rng: np.random.Generator, spec: BatchSpec) -> Episode:
    """One training episode from ``pool`` (see the module docstring)."""
    categories = pool.categories()
    category = categories[rng.integers(len(categories))]
    k1 = int(spec.normal_shots[rng.integers(len(spec.normal_shots))])
    k2 = int(spec.abnormal_shots[rng.integers(len(spec.abnormal_shots))])
    defects = sorted(pool.anomalies[category])
    defect = defects[rng.integers(len(defects))]
    normals, anomalies = pool.normals[category], pool.anomalies[category][defect]
    label = int(rng.random() < spec.abnormal_query_rate)
    if label and not spec.match_defect_type and len(defects) > 1:
        # the query keeps `defect`; the references come from another type of the category
        others = [d for d in defects if d != defect]
        query = anomalies[rng.integers(len(anomalies))]
        defect = others[rng.integers(len(others))]
        references = pool.anomalies[category][defect]
        abnormal = [references[i] for i in rng.choice(len(references), size=k2, replace=False)]
        normal = [normals[i] for i in rng.choice(len(normals), size=k1, replace=False)]
    elif label:
        picked = rng.choice(len(anomalies), size=k2 + 1, replace=False)
        query, abnormal = anomalies[picked[0]], [anomalies[i] for i in picked[1:]]
        normal = [normals[i] for i in rng.choice(len(normals), size=k1, replace=False)]
    else:
        picked = rng.choice(len(normals), size=k1 + 1, replace=False)
        query, normal = normals[picked[0]], [normals[i] for i in picked[1:]]
        abnormal = [anomalies[i] for i in rng.choice(len(anomalies), size=k2, replace=False)]
    return Episode(category, int(query), label, tuple(normal), tuple(abnormal), defect)


class BalancedSampler:
    """Episodes for balanced batches (``BatchSpec.balanced``): half of each batch abnormal queries.

    Each label's queries (every normal, every usable anomaly of the pool) are taken in a
    seeded permutation, cycled; the query's references come from its own category
    (normal ones from its normals, abnormal ones from a defect type: the query's, or for
    a normal query one drawn at random), never the query itself.
    """

    def __init__(self, pool: SourcePool, rng: np.random.Generator):
        self.pool, self.rng = pool, rng
        categories = pool.categories()
        self.queries = {
            0: [(c, i, "") for c in categories for i in pool.normals[c]],
            1: [(c, i, d) for c in categories for d in sorted(pool.anomalies[c]) for i in pool.anomalies[c][d]],
        }
        self.order: dict[int, list[int]] = {0: [], 1: []}

    def _next(self, label: int) -> tuple[str, int, str]:
        if not self.order[label]:
            self.order[label] = [int(i) for i in self.rng.permutation(len(self.queries[label]))][::-1]
        return self.queries[label][self.order[label].pop()]

    def batch(self, size: int, spec: BatchSpec, normal_only: bool = False) -> list[Episode]:
        abnormal = 0 if normal_only else size // 2
        return [self._episode(label, spec) for label in [0] * (size - abnormal) + [1] * abnormal]

    def _episode(self, label: int, spec: BatchSpec) -> Episode:
        category, query, defect = self._next(label)
        rng = self.rng
        k1 = int(spec.normal_shots[rng.integers(len(spec.normal_shots))])
        k2 = int(spec.abnormal_shots[rng.integers(len(spec.abnormal_shots))])
        if not defect:
            defects = sorted(self.pool.anomalies[category])
            defect = defects[rng.integers(len(defects))]
        normals = [i for i in self.pool.normals[category] if i != query]
        anomalies = [i for i in self.pool.anomalies[category][defect] if i != query]
        normal = [normals[i] for i in rng.choice(len(normals), size=k1, replace=False)]
        abnormal = [anomalies[i] for i in rng.choice(len(anomalies), size=k2, replace=False)]
        return Episode(category, int(query), label, tuple(normal), tuple(abnormal), defect)


def draw_batch(pool: SourcePool, rng: np.random.Generator, spec: BatchSpec, size: int, epoch: int,
               sampler: BalancedSampler | None = None) -> list[Episode]:
    """One training batch of ``size`` episodes at ``epoch`` (1-based), as ``spec`` asks:
    :func:`draw_episode` each, or a balanced batch from ``sampler``; normal queries only
    in the first ``spec.normal_only_epochs`` epochs."""
    normal_only = epoch <= spec.normal_only_epochs
    if spec.balanced:
        if sampler is None:
            raise ValueError("a balanced BatchSpec needs a BalancedSampler")
        return sampler.batch(size, spec, normal_only)
    if normal_only:
        spec = replace(spec, abnormal_query_rate=0.0)
    return [draw_episode(pool, rng, spec) for _ in range(size)]


def calibration_episodes(pool: SourcePool, spec: BatchSpec, count: int, seed: int) -> list[Episode]:
    """Up to ``count`` episodes whose queries are normal images of the training pool (a seeded
    choice over all categories), each with ``k1`` normal references of its category (``normal_shots``
    cycled), never itself, and no abnormal references."""
    rng = np.random.default_rng(int(stable_hash([seed, "calibration-episodes"]), 16))
    queries = [(c, i) for c in pool.categories() for i in pool.normals[c]]
    chosen = [queries[i] for i in rng.permutation(len(queries))[:count]]
    episodes = []
    for number, (category, query) in enumerate(chosen):
        k1 = int(spec.normal_shots[number % len(spec.normal_shots)])
        normals = [i for i in pool.normals[category] if i != query]
        normal = [normals[i] for i in rng.choice(len(normals), size=min(k1, len(normals)), replace=False)]
        episodes.append(Episode(category, int(query), 0, tuple(normal), (), ""))
    return episodes


def validation_episodes(train: SourcePool, val: SourcePool, spec: BatchSpec, count: int,
                        seed: int) -> list[Episode]:
    """A fixed list of (at most ``count``) episodes whose queries are held-out source images and whose
    references come from the training pool; normal and abnormal queries alternate."""
    rng = np.random.default_rng(int(stable_hash([seed, "validation-episodes"]), 16))
    queries: dict[int, list[tuple[str, int, str]]] = {0: [], 1: []}
    for category in train.categories():
        for index in val.normals.get(category, []):
            queries[0].append((category, index, ""))
        for defect, indices in sorted(val.anomalies.get(category, {}).items()):
            if defect in train.anomalies[category]:
                queries[1].extend((category, index, defect) for index in indices)
    for label in (0, 1):
        queries[label] = [queries[label][i] for i in rng.permutation(len(queries[label]))]
    ordered = [q for pair in zip(queries[0], queries[1], strict=False) for q in pair]
    ordered += queries[0][len(ordered) // 2:] + queries[1][len(ordered) // 2:]
    episodes = []
    for number, (category, index, defect) in enumerate(ordered[:count]):
        label = int(bool(defect))
        if not defect:
            defects = sorted(train.anomalies[category])
            defect = defects[rng.integers(len(defects))]
        k1 = int(spec.normal_shots[number % len(spec.normal_shots)])
        k2 = int(spec.abnormal_shots[number % len(spec.abnormal_shots)])
        normals, anomalies = train.normals[category], train.anomalies[category][defect]
        normal = [normals[i] for i in rng.choice(len(normals), size=min(k1, len(normals)), replace=False)]
        abnormal = [anomalies[i] for i in rng.choice(len(anomalies), size=min(k2, len(anomalies)), replace=False)]
        episodes.append(Episode(category, int(index), label, tuple(normal), tuple(abnormal), defect))
    return episodes


class FeatureStore:
    """Features and masks of source images by manifest row, memoised up to ``max_bytes``.

    ``dataset_dir``: the folder the rows' paths are relative to, or, for a union source,
    a mapping from each row's ``dataset`` to its folder.
    """

    def __init__(self, items: pd.DataFrame, dataset_dir: Path | Mapping[str, Path], lookup: FeatureLookup,
                 grid: tuple[int, int] | None, mask_size: int | None = None,
                 max_bytes: int = 4 << 30, level_lookup: LevelLookup | None = None,
                 level_names: Sequence[str] = ()):
        self.items, self.lookup = items, lookup
        self.dir, self.dirs = None, None
        if isinstance(dataset_dir, Mapping):
            self.dirs = {str(name): Path(folder) for name, folder in dataset_dir.items()}
            unknown = sorted(set(items["dataset"].astype(str)) - set(self.dirs))
            if unknown:
                raise NaglError(f"source rows of datasets {', '.join(unknown)} have no folder; "
                                f"known folders: {', '.join(sorted(self.dirs))}")
        else:
            self.dir = Path(dataset_dir)
        self.mask_size, self.max_bytes, self.used = mask_size, max_bytes, 0
        self.level_lookup, self.level_names = level_lookup, tuple(level_names)
        self._features: dict[int, torch.Tensor] = {}
        self._levels: dict[int, dict[str, torch.Tensor]] = {}
        self._masks: dict[int, torch.Tensor] = {}
        first = self.features([int(items.index[0])])
        self.grid = infer_grid(first.shape[1], grid)
        self.dim = int(first.shape[2])

    def _fetch(self, shas: list[str]) -> torch.Tensor:
        if callable(self.lookup):
            out = self.lookup(shas)
        else:
            missing = [s for s in shas if s not in self.lookup]
            if missing:
                raise NaglError(f"no cached features for image sha256 {missing[0]}; "
                                f"compute the source's features first")
            out = torch.stack([torch.as_tensor(self.lookup[s]) for s in shas])
        return torch.as_tensor(out, dtype=torch.float32)

    def features(self, rows: Sequence[int]) -> torch.Tensor:
        """``(len(rows), G, C)`` features of manifest rows."""
        missing = [r for r in dict.fromkeys(rows) if r not in self._features]
        fetched: dict[int, torch.Tensor] = {}
        if missing:
            loaded = self._fetch([str(self.items.at[r, "image_sha256"]) for r in missing])
            for row, tensor in zip(missing, loaded, strict=False):
                fetched[row] = tensor
                if self.used + tensor.numel() * 4 <= self.max_bytes:
                    self._features[row] = tensor
                    self.used += tensor.numel() * 4
        return torch.stack([self._features[r] if r in self._features else fetched[r] for r in rows])

    def levels(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """``{level: (len(rows), G_l, C_l)}`` of manifest rows, for the levels the method reads."""
        if self.level_lookup is None or not self.level_names:
            raise NaglError("the method reads feature levels, but the training data has none; train it through "
                            "train_source / train_on_source with the backbone's levels (method class level_group)")
        missing = [r for r in dict.fromkeys(rows) if r not in self._levels]
        fetched: dict[int, dict[str, torch.Tensor]] = {}
        if missing or not rows:
            loaded = self.level_lookup([str(self.items.at[r, "image_sha256"]) for r in missing], self.level_names)
            if not rows:
                return {name: torch.as_tensor(loaded[name], dtype=torch.float32) for name in self.level_names}
            for index, row in enumerate(missing):
                levels = {name: torch.as_tensor(loaded[name][index], dtype=torch.float32) for name in self.level_names}
                fetched[row] = levels
                size = sum(t.numel() * 4 for t in levels.values())
                if self.used + size <= self.max_bytes:
                    self._levels[row] = levels
                    self.used += size
        per_row = [self._levels[r] if r in self._levels else fetched[r] for r in rows]
        return {name: torch.stack([levels[name] for levels in per_row]) for name in self.level_names}

    def mask(self, row: int) -> torch.Tensor:
        """The pixel mask at ``mask_size`` (all False for normal images)."""
        if self.mask_size is None:
            raise NaglError("the method's batch_spec() asks for no masks (mask_size None), but its loss reads one")
        if row not in self._masks:
            path = self.items.at[row, "mask_path"]
            folder = self.dir if self.dirs is None else self.dirs[str(self.items.at[row, "dataset"])]
            path = None if path is None or pd.isna(path) else folder / str(path)
            self._masks[row] = torch.from_numpy(load_mask(path, self.mask_size))
        return self._masks[row]


