"""ELPV solar cells from the ``elpv-dataset`` package (builder kind ``elpv-package``), offline.

The package ships the real ELPV release: ``data/images/cellNNNN.png`` (2,624
300x300 8-bit grey electroluminescence images) and ``data/labels.csv``
(whitespace separated: image path, defect probability 0, 1/3, 2/3 or 1, cell type
``mono`` or ``poly``). Conversion (InCTRL's protocol for ELPV), one category
``solar-cell``:

- probability 0 -> normal, split by :func:`~nagl.data.builders.subsets.split_normals`
  (test = ceil(25 %), seeded) into train/good and test/good;
- probability 1 -> test/mono or test/poly (its cell type);
- probabilities 1/3 and 2/3 are left out (uncertain labels).

Image-level labels only (no masks). The full conversion is checked against the
published counts (1131 / 377 / 715, of which 313 mono and 402 poly) before the
optional ``max_images`` caps take a seeded subset of each part. Options: ``seed``
(default 0), ``max_images`` (see ``subsets.read_caps``), ``path`` (a folder with
``labels.csv`` and ``images/`` in the release's layout; default: the package's data).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from nagl.data import layout
from nagl.data.builders.subsets import capped, read_caps, read_seed, split_normals
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError
from nagl.settings import project_dir

CATEGORY = "solar-cell"
CELL_TYPES = ("mono", "poly")
EXPECTED = {"train_good": 1131, "test_good": 377, "mono": 313, "poly": 402}


def package_data_dir() -> Path:
    """The folder with ``labels.csv`` and ``images/`` inside the installed ``elpv-dataset`` package."""
    try:
        import elpv_dataset
    except ImportError as error:
        raise NaglError("the package elpv-dataset is not installed; `pip install -e .` installs it "
                        "(it is a dependency of nagl)") from error
    return Path(elpv_dataset.__file__).parent / "data"


def read_labels(labels_csv: Path) -> dict[str, tuple[float, str]]:
    """``{image path relative to labels.csv: (probability, type)}``; errors name the file and line."""
    if not labels_csv.is_file():
        raise NaglError(f"{labels_csv} not found; the ELPV release has labels.csv beside images/")
    labels = {}
    for number, line in enumerate(labels_csv.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            path, probability, cell_type = fields[0], float(fields[1]), fields[2]
        except (IndexError, ValueError) as error:
            raise NaglError(f"{labels_csv}, line {number}: expected 'path probability type', "
                            f"got {line!r}") from error
        if cell_type not in CELL_TYPES or not 0 <= probability <= 1:
            raise NaglError(f"{labels_csv}, line {number}: type must be mono or poly and the "
                            f"probability in [0, 1], got {line!r}")
        labels[path] = (probability, cell_type)
    return labels


def convert_elpv(data_dir: Path, out_dir: Path, seed: int, caps: dict[str, int | None]) -> None:
    """Write the ``solar-cell`` category from an ELPV release folder (``labels.csv`` + ``images/``)."""
    labels = read_labels(data_dir / "labels.csv")
    normal = [path for path, (p, _) in labels.items() if p == 0]
    anomalous = sorted((cell_type, path) for path, (p, cell_type) in labels.items() if p == 1)
    train, test = split_normals(normal, seed)
    found = {"train_good": len(train), "test_good": len(test),
             **{t: sum(1 for cell_type, _ in anomalous if cell_type == t) for t in CELL_TYPES}}
    if found != EXPECTED:
        raise NaglError(f"{data_dir / 'labels.csv'}: the ELPV conversion gives {found}, the release has "
                        f"{EXPECTED}; the data is not the ELPV release (elpv-dataset 1.0.0.post1)")
    category = Path(out_dir) / CATEGORY
    for names, cap, stream, split in ((train, caps["train_good"], 0, layout.TRAIN),
                                      (test, caps["test_good"], 1, layout.TEST)):
        for path in capped(names, cap, seed, stream):
            _copy(data_dir / path, category / split / layout.GOOD / Path(path).name)
    for cell_type, path in capped(anomalous, caps["test_anomalous"], seed, 2):
        _copy(data_dir / path, category / layout.TEST / cell_type / Path(path).name)


def _copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise NaglError(f"{src} is listed in labels.csv but missing; reinstall elpv-dataset "
                        f"(or restore the release folder)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


@register_builder("elpv-package")
def build_elpv_package(spec: DatasetSpec, out_dir: Path) -> None:
    where = f"dataset {spec.name!r} (config/datasets.yaml)"
    data_dir = spec.options.get("path")
    if data_dir:
        data_dir = Path(str(data_dir)).expanduser()
        data_dir = data_dir if data_dir.is_absolute() else project_dir() / data_dir
    else:
        data_dir = package_data_dir()
    convert_elpv(data_dir, Path(out_dir), read_seed(spec.options, where), read_caps(spec.options, where))
