"""Sources that are unions of datasets (leave-one-domain-out training).

A *union source* is one source name standing for several datasets; a trainable
method trained on it sees every member's images. Unions come from the run config
(docs/protocol.md, "Union sources"):

- written in ``sources`` as ``{name: ..., datasets: [...]}``;
- or added by ``union_sources: leave-one-out``: for each target that is one of the
  plain sources, ``all-but-<target>`` (every other plain source); for the targets
  that are not sources, one ``all-sources`` (every plain source).

A union is evaluated only on the targets none of its members is, so its cells are
never in-domain. Training reads the members' manifests as one pool whose
categories are ``<dataset>/<category>`` (kept distinct per dataset); each row keeps
its ``dataset``, and files are read relative to that dataset's folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nagl.io import stable_hash

if TYPE_CHECKING:
    import pandas as pd

LEAVE_ONE_OUT_PREFIX = "all-but-"
ALL_SOURCES = "all-sources"


@dataclass(frozen=True)
class UnionSource:
    """One source made of ``datasets``, evaluated on ``targets`` (none of them a member)."""

    name: str
    datasets: tuple[str, ...]
    targets: tuple[str, ...]

    def as_dict(self) -> dict:
        """The form written in a config's ``sources``."""
        return {"name": self.name, "datasets": list(self.datasets)}


def leave_one_out(sources: Sequence[str], targets: Sequence[str]) -> list[UnionSource]:
    """``all-but-<t>`` for each target ``t`` among ``sources``, and ``all-sources`` for the other
    targets; a union of fewer than two datasets is not added (that plain source is already there)."""
    unions = []
    for target in targets:
        if target in sources:
            others = tuple(s for s in sources if s != target)
            if len(others) >= 2:
                unions.append(UnionSource(LEAVE_ONE_OUT_PREFIX + target, others, (target,)))
    outside = tuple(t for t in targets if t not in sources)
    if outside and len(sources) >= 2:
        unions.append(UnionSource(ALL_SOURCES, tuple(sources), outside))
    return unions


def union_manifest(folders: Mapping[str, str | Path]) -> pd.DataFrame:
    """The manifests of the member datasets (name -> prepared folder) as one training pool.

    ``dataset`` is the member's name and ``category`` becomes ``<dataset>/<category>``,
    so categories of different members never merge; paths stay relative to the
    member's folder (``FeatureStore`` resolves them through ``dataset``).
    """
    import pandas as pd

    from nagl.data.layout import read_manifest

    parts = []
    for name, folder in folders.items():
        manifest = read_manifest(folder)
        manifest["dataset"] = name
        manifest["category"] = name + "/" + manifest["category"].astype(str)
        parts.append(manifest)
    return pd.concat(parts, ignore_index=True)


def union_content_hash(member_hashes: Mapping[str, str]) -> str:
    """The content hash of a union source: a hash over its members' (name, content hash);
    it changes when any member's content changes."""
    return "union:" + stable_hash(sorted(member_hashes.items()), length=32)


def source_content_hash(datasets: Sequence[str]) -> tuple[str, dict[str, str]]:
    """``(source_dataset_hash, {member: content hash})`` of a source made of ``datasets``; a
    single dataset keeps its own DVC content hash."""
    from nagl.data.prepare import dataset_content_hash

    members = {name: dataset_content_hash(name) for name in datasets}
    if len(datasets) == 1:
        return members[datasets[0]], members
    return union_content_hash(members), members
