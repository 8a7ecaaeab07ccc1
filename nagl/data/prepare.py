"""Preparing a dataset: the same path for every dataset in the registry.

build (the kind's builder, into a staging folder) -> normalise images -> validate
-> manifest -> rename into ``datasets/<name>`` -> record with DVC. A dataset that
fails validation is never renamed into place nor versioned. When dvc.lock already
records a version of the dataset and the DVC cache or remote has it, that version
is restored instead of rebuilding (this is how datasets reach cluster nodes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from nagl.data import dvc, origins
from nagl.data.builders import builder_for
from nagl.data.layout import MANIFEST_NAME, normalise_images, read_manifest, write_manifest
from nagl.data.registry import DatasetSpec, get_spec
from nagl.data.validate import raise_if_invalid, validate_dataset
from nagl.io import atomic_directory, sha256_file
from nagl.settings import datasets_dir


@dataclass
class PreparedDataset:
    name: str
    path: Path
    content_hash: str
    action: str  # 'built', 'restored' or 'present'
    seconds: float


def dataset_path(name: str) -> Path:
    return datasets_dir() / name


def is_prepared(name: str) -> bool:
    return (dataset_path(name) / MANIFEST_NAME).is_file()


def dataset_content_hash(name: str) -> str:
    """The dataset's DVC content hash; ``manifest:<sha256>`` when it is not versioned."""
    recorded = dvc.content_hash(name) if dvc.is_dvc_repo() else None
    if recorded:
        return recorded
    return "manifest:" + sha256_file(dataset_path(name) / MANIFEST_NAME)[:32]


def build_dataset(spec: DatasetSpec, destination: Path) -> list[str]:
    """Build, normalise, validate and write the manifest; atomically replace ``destination``.

    Returns the normalisation notes. Raises NaglError (and leaves ``destination``
    untouched) when the builder or the validator fails.
    """
    with atomic_directory(destination) as staging, origins.recording(staging) as known:
        builder_for(spec.kind)(spec, staging)
        notes = normalise_images(staging)
        raise_if_invalid(validate_dataset(staging),
                         f"{spec.name} (kind {spec.kind}; paths are those of your files where known, "
                         f"else relative to the dataset)", source_of=known.of)
        write_manifest(staging, spec.name)
    return notes


def prepare_dataset(name: str, *, force: bool = False, version: bool = True) -> PreparedDataset:
    """Make ``datasets/<name>`` exist, valid and (with ``version``) recorded by DVC."""
    start = time.perf_counter()
    spec = get_spec(name)
    path = dataset_path(name)
    version = version and dvc.is_dvc_repo()
    action = "present"
    if force or not is_prepared(name):
        restored = (not force and version and dvc.content_hash(name) is not None
                    and dvc.pull([name], check=False) and is_prepared(name))
        if restored:
            action = "restored"
        else:
            build_dataset(spec, path)
            action = "built"
    if version and (action == "built" or dvc.content_hash(name) is None):
        dvc.commit(name)
    read_manifest(path)  # fails clearly if what is there is not a prepared dataset
    return PreparedDataset(name=name, path=path, content_hash=dataset_content_hash(name),
                           action=action, seconds=time.perf_counter() - start)

