"""Two Kaggle releases (manual download, image level): BrainMRI and HeadCT.

- ``brainmri`` (navoneel/brain-mri-images-for-brain-tumor-detection): ``no/`` and
  ``yes/``, duplicated under ``brain_tumor_dataset/``; the top-most pair is used.
  ``no`` -> normal, ``yes`` -> ``test/tumor``. Mixed extensions, names with spaces.
- ``headct`` (felipekitamura/head-ct-hemorrhage): ``labels.csv`` (``id, hemorrhage``)
  and ``head_ct/head_ct/NNN.png`` (the id zero-padded to 3 digits). hemorrhage 0
  -> normal, 1 -> ``test/hemorrhage``.

Normal images are split 75/25 (:func:`~nagl.data.builders.common.split_normals`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from nagl.data import layout
from nagl.data.builders.common import seed_option, split_normals
from nagl.data.converters import _extracted, _find_dirs, _image_files, _transfer, _where, check_counts
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError

HEADCT_LABELS = "labels.csv"


@register_builder("brainmri")
def build_brainmri(spec: DatasetSpec, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    dst = out_dir / "brainmri"
    with _extracted(spec, out_dir) as root:
        found = _find_dirs(root, lambda d: (d / "no").is_dir() and (d / "yes").is_dir())
        if not found:
            raise NaglError(f"{_where(spec)}: {spec.options['filename']} holds no folders no/ and yes/; "
                            f"is it the BrainMRI release?")
        top = min(found, key=lambda d: (len(d.relative_to(root).parts), str(d)))
        for folder, target in ((top / "no", dst / layout.TRAIN / layout.GOOD), (top / "yes", dst / layout.TEST / "tumor")):
            for image in _image_files(folder):
                _transfer(image, target / image.name, move=True)
    split_normals(dst, seed_option(spec))
    check_counts(spec, out_dir)


@register_builder("headct")
def build_headct(spec: DatasetSpec, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    dst = out_dir / "headct"
    with _extracted(spec, out_dir) as root:
        tables = _find_dirs(root, lambda d: (d / HEADCT_LABELS).is_file())
        if len(tables) != 1:
            raise NaglError(f"{_where(spec)}: expected one {HEADCT_LABELS} in {spec.options['filename']}, "
                            f"found {len(tables)}; is it the HeadCT release?")
        table = tables[0] / HEADCT_LABELS
        # By name; should a name occur twice, the copy nearest the archive root is used.
        images = {}
        for path in sorted(root.rglob("*.png"), key=lambda p: (len(p.parts), str(p))):
            images.setdefault(path.name, path)
        for line, image_id, hemorrhage in _read_headct_labels(table):
            name = f"{image_id:03d}.png"
            if name not in images:
                raise NaglError(f"{table}, line {line}: image {name} is not in the archive")
            target = dst / layout.TEST / "hemorrhage" if hemorrhage else dst / layout.TRAIN / layout.GOOD
            _transfer(images[name], target / name, move=True)
    split_normals(dst, seed_option(spec))
    check_counts(spec, out_dir)


def _read_headct_labels(path: Path) -> list[tuple[int, int, bool]]:
    """``(line, id, hemorrhage)``; the header is ``id, hemorrhage`` (with a space)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        if not {"id", "hemorrhage"} <= set(reader.fieldnames or []):
            raise NaglError(f"{path}: expected the columns 'id, hemorrhage', got {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                image_id, hemorrhage = int(row["id"]), int(row["hemorrhage"])
            except (TypeError, ValueError) as error:
                raise NaglError(f"{path}, line {line}: id and hemorrhage must be integers: {error}") from error
            if hemorrhage not in (0, 1):
                raise NaglError(f"{path}, line {line}: hemorrhage must be 0 or 1, got {hemorrhage}")
            rows.append((line, image_id, bool(hemorrhage)))
        return rows
