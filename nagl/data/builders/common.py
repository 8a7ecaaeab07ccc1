"""Helpers shared by the wave-2 builders: multi-file releases, our normal split, writing arrays.

The single-archive helpers (fetch, extract, find folders, move files) are those
of :mod:`nagl.data.converters`; this module adds what several releases of
docs/datasets.md ("Reference benchmark datasets") need on top. The count check of every builder is
:func:`nagl.data.converters.check_counts`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from nagl.data import layout
from nagl.data.archives import fetch_files, safe_extract
from nagl.data.converters import _image_files, _manual, _where
from nagl.data.registry import DatasetSpec
from nagl.errors import NaglError

TEST_FRACTION = 0.25  # of the normal images, for the releases without a normal test split


@contextlib.contextmanager
def extracted_files(spec: DatasetSpec, out_dir: Path) -> Iterator[dict[str, Path]]:
    """Every file of the ``files:`` option, verified and extracted: ``{filename: folder}``.

    Each file is extracted into its own scratch folder beside ``out_dir``; a bare
    ``.gz`` gives a folder holding the one decompressed file.
    """
    files = spec.options.get("files")
    archives = fetch_files(spec.name, files, manual=_manual(spec))
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-extract-", dir=Path(out_dir).parent))
    try:
        yield {archive.name: safe_extract(archive, scratch / f"{number}") for number, archive in enumerate(archives)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def seed_option(spec: DatasetSpec) -> int:
    seed = spec.options.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise NaglError(f"{_where(spec)}: option 'seed' must be an integer, got {seed!r}")
    return seed


def split_quarter(names: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Our normal split for releases without one: ``(train, test)``.

    The names are sorted and permuted with ``numpy.random.default_rng(seed)``;
    the test part has ``ceil(0.25 n)`` names (the last ones of the permutation),
    train the rest. Counts match InCTRL's ``train_test_split(test_size=0.25)``;
    membership cannot (it split ``os.listdir`` order).
    """
    names = sorted(names)
    n_test = math.ceil(TEST_FRACTION * len(names))
    if len(names) < 2:
        raise NaglError(f"cannot split {len(names)} normal image(s) into train and test; at least 2 are needed")
    order = np.random.default_rng(seed).permutation(len(names))
    n_train = len(names) - n_test
    return sorted(names[i] for i in order[:n_train]), sorted(names[i] for i in order[n_train:])


def split_normals(category_dir: Path, seed: int) -> None:
    """Split the normal images a builder wrote to ``train/good``: the test part of
    :func:`split_quarter` (by file name) moves to ``test/good``."""
    train_dir = Path(category_dir) / layout.TRAIN / layout.GOOD
    test_dir = Path(category_dir) / layout.TEST / layout.GOOD
    _train, test = split_quarter([p.name for p in _image_files(train_dir)], seed)
    test_dir.mkdir(parents=True, exist_ok=True)
    for name in test:
        (train_dir / name).rename(test_dir / name)


def read_grey(path: Path) -> np.ndarray:
    """An image of the release as an 8-bit grey array."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))
    except OSError as error:
        raise NaglError(f"cannot read {path}: {error}; the archive is probably corrupt") from error


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Write a uint8 array (HxW grey or HxWx3 RGB) as a new PNG; two sources for one name is an error."""
    if path.exists():
        raise NaglError(f"two images map to {path.name} in {path.parent}; the release has duplicate names")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG")
