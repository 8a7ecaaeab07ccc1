"""KolektorSDD (commutator surfaces, pixel masks), cut into thirds as InCTRL did.

``kos01..kos50/PartN.jpg`` with ``PartN_label.bmp``: each image and its label are
cut into top, middle and bottom thirds (rows ``[0, H//3)``, ``[H//3, 2H//3)``,
``[2H//3, H)``). A third whose label has any non-zero pixel is a test defect
(``test/defect`` with its mask), the others are normal and split 75/25
(:func:`~nagl.data.builders.common.split_normals`). Names ``kosNN_PartN_<i>``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from nagl.data import layout
from nagl.data.builders.common import read_grey, save_png, seed_option, split_normals
from nagl.data.converters import _extracted, _find_dirs, _where, check_counts
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError

CATEGORY = "sdd"
DEFECT = "defect"
LABEL_SUFFIX = "_label"
_KOS = re.compile(r"^kos\d+$")


@register_builder("kolektorsdd")
def build_kolektorsdd(spec: DatasetSpec, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    dst = out_dir / CATEGORY
    with _extracted(spec, out_dir) as root:
        parts = _find_dirs(root, lambda d: bool(_KOS.match(d.name)))
        if not parts:
            raise NaglError(f"{_where(spec)}: {spec.options['filename']} holds no kosNN folders; "
                            f"is it KolektorSDD.zip?")
        for folder in parts:
            for image_path in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg"):
                label_path = folder / f"{image_path.stem}{LABEL_SUFFIX}.bmp"
                if not label_path.is_file():
                    raise NaglError(f"{image_path} has no label {label_path.name}; the archive is incomplete")
                image, label = read_grey(image_path), read_grey(label_path)
                if image.shape != label.shape:
                    raise NaglError(f"{label_path} is {label.shape[1]}x{label.shape[0]}, its image "
                                    f"{image.shape[1]}x{image.shape[0]}")
                height = image.shape[0]
                bounds = (0, height // 3, 2 * height // 3, height)
                for i in range(3):
                    rows = slice(bounds[i], bounds[i + 1])
                    name = f"{folder.name}_{image_path.stem}_{i}"
                    if label[rows].any():
                        save_png(image[rows], dst / layout.TEST / DEFECT / f"{name}.png")
                        save_png(np.where(label[rows] > 0, 255, 0).astype(np.uint8),
                                 dst / layout.GROUND_TRUTH / DEFECT / layout.mask_name(name))
                    else:
                        save_png(image[rows], dst / layout.TRAIN / layout.GOOD / f"{name}.png")
    split_normals(dst, seed_option(spec))
    check_counts(spec, out_dir)
