"""ISIC 2018 Task 3 (dermatoscopy, image level): four zips, one-hot ground-truth CSVs.

Training images whose ground truth is NV (melanocytic nevus) -> ``train/good``
(the other training images are not used); test NV -> ``test/good``; every other
test image -> ``test/<its class in lower case>``. One category, ``isic2018``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from nagl.data import layout
from nagl.data.builders.common import extracted_files
from nagl.data.converters import _transfer, _where, check_counts
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError

CATEGORY = "isic2018"
CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
NORMAL_CLASS = "NV"
TRAIN_CSV = "ISIC2018_Task3_Training_GroundTruth.csv"
TEST_CSV = "ISIC2018_Task3_Test_GroundTruth.csv"


@register_builder("isic2018")
def build_isic2018(spec: DatasetSpec, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    with extracted_files(spec, out_dir) as folders:
        found = [p for root in folders.values() for p in root.rglob("*") if p.is_file()]
        images = {p.stem: p for p in found if layout.is_image_file(p) and p.stem.startswith("ISIC_")}
        tables = {p.name: p for p in found if p.name in (TRAIN_CSV, TEST_CSV)}
        for name in (TRAIN_CSV, TEST_CSV):
            if name not in tables:
                raise NaglError(f"{_where(spec)}: none of {sorted(folders)} holds {name}; the ground-truth "
                                f"zips of ISIC 2018 Task 3 are needed (see docs/datasets.md)")
        dst = out_dir / CATEGORY
        for line, image_id, label in _read_ground_truth(tables[TRAIN_CSV]):
            if label == NORMAL_CLASS:
                _transfer(_image(images, image_id, tables[TRAIN_CSV], line), dst / layout.TRAIN / layout.GOOD
                          / f"{image_id}.jpg", move=True)
        for line, image_id, label in _read_ground_truth(tables[TEST_CSV]):
            defect_type = layout.GOOD if label == NORMAL_CLASS else label.lower()
            _transfer(_image(images, image_id, tables[TEST_CSV], line), dst / layout.TEST / defect_type
                      / f"{image_id}.jpg", move=True)
    check_counts(spec, out_dir)


def _image(images: dict[str, Path], image_id: str, table: Path, line: int) -> Path:
    if image_id not in images:
        raise NaglError(f"{table}, line {line}: image {image_id} is in none of the input zips; "
                        f"place the complete Training_Input and Test_Input zips")
    return images[image_id]


def _read_ground_truth(path: Path) -> list[tuple[int, str, str]]:
    """``(line, image id, class)`` per row; each row must name exactly one class."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", *CLASSES} - set(reader.fieldnames or [])
        if missing:
            raise NaglError(f"{path}: columns {sorted(missing)} are missing; is it ISIC 2018 Task 3 ground truth?")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                positive = [name for name in CLASSES if float(row[name]) == 1.0]
            except (TypeError, ValueError) as error:
                raise NaglError(f"{path}, line {line}: class values must be 0.0 or 1.0: {error}") from error
            if len(positive) != 1:
                raise NaglError(f"{path}, line {line}: expected exactly one class set to 1.0, found {positive}")
            rows.append((line, row["image"].strip(), positive[0]))
        return rows
