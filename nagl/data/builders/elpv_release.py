"""ELPV from its release (github.com/zae-bayern/elpv-dataset): ``images/cellNNNN.png`` + ``labels.csv``.

``labels.csv`` is whitespace separated: image path, defect probability (0,
1/3, 2/3 or 1) and cell type (``mono`` or ``poly``). As InCTRL: probability 0
-> normal, split 75/25 (:func:`~nagl.data.builders.common.split_normals`);
probability 1 -> ``test/mono`` or ``test/poly`` by cell type; the intermediate
probabilities are left out. One category, ``elpv``; image level.
"""

from __future__ import annotations

from pathlib import Path

from nagl.data import layout
from nagl.data.builders.common import seed_option, split_normals
from nagl.data.converters import _extracted, _transfer, _where, check_counts
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError

CATEGORY = "elpv"
LABELS = "labels.csv"
CELL_TYPES = ("mono", "poly")


@register_builder("elpv-release")
def build_elpv_release(spec: DatasetSpec, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    dst = out_dir / CATEGORY
    with _extracted(spec, out_dir) as root:
        # At the top of older versions of the repository, in src/elpv_dataset/data/ of newer ones.
        found = sorted(p.parent for p in root.rglob(LABELS) if (p.parent / "images").is_dir())
        if len(found) != 1:
            raise NaglError(f"{_where(spec)}: expected one folder with {LABELS} and images/ in "
                            f"{spec.options['filename']}, found {len(found)}; is it the elpv-dataset release?")
        data = found[0]
        for line, image, probability, cell_type in read_labels(data / LABELS):
            if probability == 0:
                target = dst / layout.TRAIN / layout.GOOD
            elif probability == 1:
                target = dst / layout.TEST / cell_type
            else:
                continue
            source = data / image
            if not source.is_file():
                raise NaglError(f"{data / LABELS}, line {line}: {image} is not in the archive")
            _transfer(source, target / source.name, move=True)
    split_normals(dst, seed_option(spec))
    check_counts(spec, out_dir)


def read_labels(path: Path) -> list[tuple[int, str, float, str]]:
    """``(line, image path, probability, cell type)`` per line of ELPV's ``labels.csv``."""
    rows = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = text.split()
        if not fields:
            continue
        try:
            image, probability, cell_type = fields
            probability = float(probability)
        except ValueError as error:
            raise NaglError(f"{path}, line {line}: expected 'path probability type', got {text!r}") from error
        if Path(image).is_absolute() or ".." in Path(image).parts:
            raise NaglError(f"{path}, line {line}: {image!r} is not a path inside the release")
        if cell_type not in CELL_TYPES or not 0 <= probability <= 1:
            raise NaglError(f"{path}, line {line}: type must be one of {CELL_TYPES} and the probability "
                            f"between 0 and 1, got {text!r}")
        rows.append((line, image, probability, cell_type))
    return rows
