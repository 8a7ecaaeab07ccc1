"""Cells that are one computation: computed once, stored once, recorded as aliases.

Two cells of a run are one computation when their patch maps are equal by
construction. With at least one normal reference (``k_normal > 0``) and no
abnormal one (``k_abnormal = 0``), the methods of :data:`NORMAL_ONLY_WITHOUT_ABNORMAL`
all compute ``1 - s_n`` over the first ``k_normal`` normal references:
``knn-normal`` always (it ignores abnormal references, so it is evaluated at
``k_abnormal = 0`` only), NAGL and nagl-cal whose head is then not used, ``knn-naive``
which has no ``s_abn`` term.

Every cell of one target that reduces to ``1 - s_n`` thus depends only on its key
without the fields :data:`ALIAS_FREE_FIELDS` (all cells of a run share the split
of a (target, category, seed), the backbone and the sizes). Of each such group
one cell, the *canonical* one, is computed; the others are *aliases*: their
folder holds only ``run.json`` (their own key and settings, ``alias_of`` = the
canonical cell's ``run_id``, without the measured timings). Ingest gives an
alias the canonical cell's metrics, timings and, where the alias is a gallery
cell, its gallery; the scores are stored once, under the canonical ``run_id``.

``tests/test_no_duplicate_work.py`` checks numerically that every method listed
here computes the canonical map. A method joins a list only with such a check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nagl.config import RunConfig, cell_settings_hash
from nagl.errors import NaglError
from nagl.io import atomic_write_json
from nagl.results.schema import plain, schema_columns

# The map is 1 - s_n at k_abnormal = 0.
NORMAL_ONLY_WITHOUT_ABNORMAL = frozenset({"knn-normal", "knn-naive", "nagl", "nagl-cal"})
# Key fields that do not change a 1 - s_n map (the training source and seed: the head is unused).
ALIAS_FREE_FIELDS = ("method", "source", "train_seed", "k_abnormal")
# Columns of `runs` that an alias takes from its canonical cell at ingest: what was measured.
MEASURED_COLUMNS = ("eval_seconds", "images_per_second")
# Columns that must agree between an alias and its canonical cell: the same queries, split and features.
SHARED_COLUMNS = ("backbone", "backbone_identity", "target", "category", "k_normal", "seed", "image_size",
                  "eval_resolution", "n_queries", "n_anomalous_queries", "target_dataset_hash", "split_hash")


def is_normal_knn_cell(method: str, k_normal: int, k_abnormal: int) -> bool:
    """Whether a cell's map is ``1 - s_n`` over its normal references (so it may be an alias)."""
    return k_normal > 0 and k_abnormal == 0 and method in NORMAL_ONLY_WITHOUT_ABNORMAL


def _group(key: Any) -> tuple | None:
    if not is_normal_knn_cell(key.method, key.k_normal, key.k_abnormal):
        return None
    fields = dataclasses.asdict(key)
    return tuple(value for name, value in fields.items() if name not in ALIAS_FREE_FIELDS)


def canonical_cells(keys: Sequence[Any], trainable: Iterable[str]) -> dict[Any, Any]:
    """For every cell key of a run (one target at least), the key of the cell that computes it.

    ``keys``: every cell of the run on the target, in the workflow's job order (a
    frozen dataclass with the fields ``method``, ``source``, ``k_normal``,
    ``k_abnormal``). A cell outside any group maps to itself. The canonical cell of
    a group is its first training-free member, else its first member: it does not
    wait for training, and is the same cell in every job that asks.
    """
    trainable = set(trainable)
    canonical: dict[tuple, Any] = {}
    for key in sorted(keys, key=lambda k: k.method in trainable):  # stable: job order within each kind
        group = _group(key)
        if group is not None:
            canonical.setdefault(group, key)
    return {key: canonical.get(_group(key), key) for key in keys}  # no group (None): the cell itself


def canonical_run_id(config: RunConfig, canonical_key: Any) -> str:
    """The ``run_id`` the canonical cell's job gives it."""
    return canonical_key.run_id(cell_settings_hash(config, canonical_key.method))


# ------------------------------------------------------------------ records --

def _alias_columns() -> list[tuple[str, str, bool]]:
    return [column for column in schema_columns()["runs"] if column[0] not in MEASURED_COLUMNS]


def write_alias(folder: Path, row: Mapping[str, Any], gallery: bool) -> None:
    """Write an alias cell: ``run.json`` only (its ``runs`` row without the measured columns).

    ``gallery``: the alias is a gallery cell, so ingest copies the canonical cell's gallery to it.
    """
    if not row.get("alias_of"):
        raise NaglError(f"{folder}: an alias cell needs alias_of (the run_id of the cell that computes it)")
    missing = [name for name, _, _ in _alias_columns() if name not in row]
    if missing:
        raise NaglError(f"{folder}: the alias row lacks {', '.join(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "scores.parquet", "split.json", "gallery.parquet"):
        (folder / name).unlink(missing_ok=True)  # a cell computed by an earlier run
    record = {name: plain(row[name]) for name, _, _ in _alias_columns()}
    atomic_write_json(folder / "run.json", {**record, "gallery": bool(gallery)})


def resolve_alias(alias: Mapping[str, Any], canonical: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The alias's full ``runs`` row: its own columns, the canonical cell's measured ones.

    Raises NaglError when the two cells did not see the same queries, split and features.
    """
    missing = [name for name, _, _ in _alias_columns() if name not in alias]
    if missing:
        raise NaglError(f"{source}: missing {', '.join(missing)} (columns of `runs`); rerun the evaluation")
    if canonical.get("alias_of"):
        raise NaglError(f"{source}: alias_of {alias['alias_of']} is itself an alias; rerun the evaluation")
    differ = [name for name in SHARED_COLUMNS if alias[name] != canonical[name]]
    if differ:
        raise NaglError(f"{source}: the alias and its canonical cell {alias['alias_of']} differ in "
                        f"{', '.join(differ)}; they come from different runs: rerun the evaluation")
    return {**{name: alias[name] for name, _, _ in _alias_columns()},
            **{name: canonical[name] for name in MEASURED_COLUMNS}}
