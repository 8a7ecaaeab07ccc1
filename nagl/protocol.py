"""Seeded, nested, leakage-free reference splits (gad-protocol.md, "References at test time").

For each (target dataset, category, seed) one split is drawn, once:

- ``normal``: ``max_k_normal`` images from ``train/good``;
- ``abnormal``: ``max_k_abnormal`` images from the test anomalies (all defect types);
- ``queries``: the whole test set minus the abnormal references.

The k-shot setting uses the first k references of each role, so smaller shot sets
are nested in larger ones, and every shot setting and method at one seed is scored
on the same queries. The draw uses only (dataset, category, seed) and the sorted
candidate lists: it never looks at a query, and the manifest's row order does not
matter. Each role has its own generator, so growing ``max_k_normal`` leaves the
abnormal draw unchanged, and growing either keeps the earlier references as a prefix.
Candidates are sorted by image path and permuted by numpy's PCG64 generator seeded
with ``[split_seed(dataset, category, seed), role]``.

``split.json`` (``ReferenceSplit.to_json``): ``format`` ("nagl-reference-split/1"),
``dataset``, ``category``, ``seed``, ``split_seed``, ``max_k_normal``,
``max_k_abnormal``, ``hash``, and ``normal`` / ``abnormal`` / ``queries`` as lists of
full manifest rows (references in nesting order, queries by image path). ``hash`` is
the sha256 of the canonical JSON of dataset, category, seed and, per role, the
(image_path, image_sha256) pairs: equal hashes mean identical references and queries.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nagl.data.layout import MANIFEST_COLUMNS
from nagl.errors import NaglError
from nagl.io import atomic_write_json, canonical_json, read_json

SPLIT_FORMAT = "nagl-reference-split/1"
# ``runs.protocol``: ``clean`` is ours (the only one in headlines); ``reference-code``
# reproduces the public code's leaking test protocol (draw_reference_code_split).
PROTOCOLS = ("clean", "reference-code")
# ``reference_checks.variant``: the swapped abnormal references of the reference-use check.
REFERENCE_CHECK_VARIANTS = ("other-category-anomaly", "normal-pseudo-mask")
_ROLES = ("normal", "abnormal", "queries")


def split_seed(dataset: str, category: str, seed: int) -> int:
    """The generator seed of a split: a stable hash of (dataset, category, seed) only."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise NaglError(f"seed must be an integer, got {seed!r}; fix the `seeds` list in the config")
    key = canonical_json({"dataset": str(dataset), "category": str(category), "seed": int(seed)})
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def _clean_rows(frame: pd.DataFrame, sort: bool = True) -> pd.DataFrame:
    """Manifest columns only, in canonical order and types; sorted by image path unless ``sort`` is false."""
    rows = frame.loc[:, list(MANIFEST_COLUMNS)].copy()
    rows["label"] = rows["label"].astype("int64")
    rows["width"] = rows["width"].astype("int64")
    rows["height"] = rows["height"].astype("int64")
    rows["mask_path"] = rows["mask_path"].astype(object).where(rows["mask_path"].notna(), None)
    if sort:
        rows = rows.sort_values("image_path", kind="stable")
    return rows.reset_index(drop=True)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain JSON values (column-wise: far cheaper than pandas' to_dict on small frames)."""
    columns = [frame[name].tolist() for name in MANIFEST_COLUMNS]
    records = [dict(zip(MANIFEST_COLUMNS, values, strict=False)) for values in zip(*columns, strict=False)]
    for record in records:
        if isinstance(record["mask_path"], float) and math.isnan(record["mask_path"]):
            record["mask_path"] = None
    return records


def _split_hash(dataset: str, category: str, seed: int, roles: dict[str, Any]) -> str:
    """sha256 of canonical JSON of dataset, category, seed and each role's (path, content hash) list."""
    ident: dict[str, Any] = {"dataset": dataset, "category": category, "seed": seed}
    for role in _ROLES:
        ident[role] = [[path, sha] for path, sha in roles[role]]
    return hashlib.sha256(canonical_json(ident).encode()).hexdigest()


def verify_split_json(obj: Any, source: str = "split.json") -> str:
    """Check a ``split.json`` object (format, keys, rows, hash) without building frames; return its hash."""
    if not isinstance(obj, dict) or obj.get("format") != SPLIT_FORMAT:
        raise NaglError(f"{source} is not a reference split (expected format {SPLIT_FORMAT!r}); rerun the evaluation")
    missing = [key for key in ("dataset", "category", "seed", "hash", *_ROLES) if key not in obj]
    if missing:
        raise NaglError(f"{source} lacks {', '.join(missing)}; rerun the evaluation that wrote it")
    if not isinstance(obj["seed"], int) or isinstance(obj["seed"], bool):
        raise NaglError(f"{source}: seed must be an integer, got {obj['seed']!r}; rerun the evaluation")
    for role in _ROLES:
        rows = obj[role]
        if not isinstance(rows, list) or any(
            not isinstance(r, dict)
            or set(MANIFEST_COLUMNS) - set(r)
            or not isinstance(r["image_path"], str)
            or not isinstance(r["image_sha256"], str)
            for r in rows
        ):
            raise NaglError(f"{source}: `{role}` must be a list of manifest rows with {list(MANIFEST_COLUMNS)}")
    roles = {role: [(r["image_path"], r["image_sha256"]) for r in obj[role]] for role in _ROLES}
    if _split_hash(obj["dataset"], obj["category"], obj["seed"], roles) != obj["hash"]:
        raise NaglError(f"{source}: the stored hash does not match its content (edited or corrupt); rerun the evaluation")
    return obj["hash"]


def _draw(candidates: pd.DataFrame, count: int, seed_value: int, role: int) -> pd.DataFrame:
    """The first ``count`` rows of a seeded permutation of the (sorted) candidates."""
    rng = np.random.default_rng([seed_value, role])
    order = rng.permutation(len(candidates))[:count]
    return candidates.iloc[order].reset_index(drop=True)


@dataclass(frozen=True, eq=False)
class ReferenceSplit:
    dataset: str
    category: str
    seed: int
    normal: pd.DataFrame
    abnormal: pd.DataFrame
    queries: pd.DataFrame

    @property
    def max_k_normal(self) -> int:
        return len(self.normal)

    @property
    def max_k_abnormal(self) -> int:
        return len(self.abnormal)

    def normal_for(self, k: int) -> pd.DataFrame:
        """The k-shot normal references: the first k of the drawn ones."""
        return self._first(self.normal, k, "normal", "k_normal")

    def abnormal_for(self, k: int) -> pd.DataFrame:
        """The k-shot abnormal references: the first k of the drawn ones."""
        return self._first(self.abnormal, k, "abnormal", "k_abnormal")

    def _first(self, frame: pd.DataFrame, k: int, role: str, setting: str) -> pd.DataFrame:
        if k < 0 or k > len(frame):
            raise NaglError(
                f"{setting}={k} is outside the reference split of {self.dataset}/{self.category} "
                f"(seed {self.seed}), which holds {len(frame)} {role} references; "
                f"draw the split with the largest {setting} of the config"
            )
        return frame.iloc[:k].reset_index(drop=True)

    @property
    def hash(self) -> str:
        """sha256 of the split's identity: dataset, category, seed and every path with its content hash."""
        roles = {role: zip(getattr(self, role)["image_path"], getattr(self, role)["image_sha256"], strict=False) for role in _ROLES}
        return _split_hash(self.dataset, self.category, self.seed, roles)

    def to_json(self) -> dict[str, Any]:
        """The content of a cell's ``split.json``: the full manifest rows of each role, plus the hash."""
        return {
            "format": SPLIT_FORMAT,
            "dataset": self.dataset,
            "category": self.category,
            "seed": self.seed,
            "split_seed": split_seed(self.dataset, self.category, self.seed),
            "max_k_normal": self.max_k_normal,
            "max_k_abnormal": self.max_k_abnormal,
            "hash": self.hash,
            **{role: _records(getattr(self, role)) for role in _ROLES},
        }

    @classmethod
    def from_json(cls, obj: Any, source: str = "split.json") -> ReferenceSplit:
        """Rebuild a split from :meth:`to_json` output; the stored hash must match the content."""
        verify_split_json(obj, source)
        frames = {
            # Reference order is the nesting order: keep it as stored.
            role: _clean_rows(pd.DataFrame(obj[role], columns=list(MANIFEST_COLUMNS)), sort=role == "queries")
            for role in _ROLES
        }
        return cls(str(obj["dataset"]), str(obj["category"]), obj["seed"], **frames)

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def read(cls, path: str | Path) -> ReferenceSplit:
        try:
            obj = read_json(path)
        except (OSError, ValueError) as error:
            raise NaglError(f"cannot read reference split {path}: {error}") from error
        return cls.from_json(obj, source=str(path))


def draw_reference_split(
    manifest: pd.DataFrame,
    dataset: str,
    category: str,
    seed: int,
    max_k_normal: int,
    max_k_abnormal: int,
) -> ReferenceSplit:
    """Draw the reference split of one (dataset, category, seed) from the dataset's manifest."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise NaglError(
            f"the manifest of {dataset} lacks columns {missing}; re-prepare it with `nagl datasets prepare {dataset}`"
        )
    for name, value in (("max_k_normal", max_k_normal), ("max_k_abnormal", max_k_abnormal)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise NaglError(f"{name} must be a non-negative integer, got {value!r}; fix the shot settings in the config")
    if max_k_normal < 1:
        raise NaglError(f"max_k_normal must be at least 1, got {max_k_normal}; fix the k_normal list in the config")

    rows = manifest[(manifest["dataset"] == dataset) & (manifest["category"] == category)]
    if rows.empty:
        raise NaglError(f"{dataset}/{category}: no such category in the manifest; check the dataset and category names")
    rows = _clean_rows(rows)
    if rows["image_path"].duplicated().any():
        dup = rows.loc[rows["image_path"].duplicated(), "image_path"].iloc[0]
        raise NaglError(f"the manifest of {dataset} lists {dup} twice; re-prepare the dataset")

    train_good = rows[(rows["split"] == "train") & (rows["label"] == 0)].reset_index(drop=True)
    test = rows[rows["split"] == "test"]
    anomalies = test[test["label"] == 1].reset_index(drop=True)

    if len(train_good) < max_k_normal:
        raise NaglError(
            f"{dataset}/{category} has {len(train_good)} train/good images but {max_k_normal} normal "
            f"references are needed; lower k_normal or leave the category out"
        )
    if len(anomalies) < max_k_abnormal + 1:
        raise NaglError(
            f"{dataset}/{category} has {len(anomalies)} anomalous test images: too few to take "
            f"{max_k_abnormal} abnormal references and keep at least one anomalous query; "
            f"lower k_abnormal or leave the category out"
        )

    seed_value = split_seed(dataset, category, seed)
    normal = _draw(train_good, max_k_normal, seed_value, 0)
    abnormal = _draw(anomalies, max_k_abnormal, seed_value, 1)
    queries = test[~test["image_path"].isin(set(abnormal["image_path"]))].reset_index(drop=True)
    return ReferenceSplit(str(dataset), str(category), int(seed), normal, abnormal, queries)


@dataclass(frozen=True, eq=False)
class ReferenceCodeSplit:
    """The references of the ``reference-code`` protocol for one (dataset, category, seed).

    ``split`` holds the normal references (those of the clean split), every drawn
    abnormal reference (per defect type, in type order) and the queries: the whole
    test set, the abnormal references included. ``by_type`` maps each defect type
    to its references (nested: the first k serve k_abnormal = k); ``assigned_type``
    gives, per query of ``split.queries``, the defect type whose references it gets.
    """

    split: ReferenceSplit
    by_type: dict[str, pd.DataFrame]
    assigned_type: list[str]

    def to_json(self) -> dict[str, Any]:
        return {**self.split.to_json(), "protocol": "reference-code", "assigned_type": list(self.assigned_type)}


def draw_reference_code_split(
    manifest: pd.DataFrame,
    dataset: str,
    category: str,
    seed: int,
    max_k_normal: int,
    max_k_abnormal: int,
) -> ReferenceCodeSplit:
    """The public reference code's test protocol, reproduced ON PURPOSE to measure its leak.

    Never use it for a clean number: it is the ``reference-code`` protocol of
    gad-protocol.md's "what the public reference implementations get wrong".
    Each anomalous query gets ``max_k_abnormal`` abnormal references of its OWN
    defect type (so the reference choice depends on the query's label), drawn from
    the evaluated test set itself, and those references stay in the scored queries
    (a query may be its own reference). A normal query gets the references of a
    defect type drawn for it at random. Normal references are the clean split's
    (``train/good``), so clean and reference-code cells differ only in the abnormal
    side and the query set. Seeded by (dataset, category, seed) like the clean split:
    each type's references are a seeded permutation of that type's sorted anomalies.
    """
    if max_k_abnormal < 1:
        raise NaglError(f"the reference-code protocol needs k_abnormal >= 1, got {max_k_abnormal}")
    clean = draw_reference_split(manifest, dataset, category, seed, max_k_normal, 0)
    test = clean.queries  # no abnormal reference was removed: the whole test set, sorted by path
    anomalies = test[test["label"] == 1]
    types = sorted(anomalies["defect_type"].unique())
    seed_value = split_seed(dataset, category, seed)
    by_type = {}
    for index, defect in enumerate(types):
        candidates = anomalies[anomalies["defect_type"] == defect].reset_index(drop=True)
        if len(candidates) < max_k_abnormal:
            raise NaglError(
                f"{dataset}/{category}: defect type {defect!r} has {len(candidates)} test images, fewer than the "
                f"{max_k_abnormal} abnormal references of the reference-code protocol; lower k_abnormal or drop "
                f"`reference-code` from `protocols`"
            )
        rng = np.random.default_rng([seed_value, 2, index])
        by_type[defect] = candidates.iloc[rng.permutation(len(candidates))[:max_k_abnormal]].reset_index(drop=True)
    normal_draw = np.random.default_rng([seed_value, 3]).integers(len(types), size=len(test))
    assigned = [defect if label == 1 else types[pick]
                for defect, label, pick in zip(test["defect_type"], test["label"], normal_draw, strict=True)]
    abnormal = pd.concat([by_type[t] for t in types], ignore_index=True)
    split = ReferenceSplit(clean.dataset, clean.category, clean.seed, clean.normal, abnormal, test)
    return ReferenceCodeSplit(split, by_type, assigned)
