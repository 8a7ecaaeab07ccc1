"""AITEX fabric (pixel masks): three .7z archives, 4096x256 images cut into 256-wide tiles.

As InCTRL: tiles of 256 columns are cut from the left. A normal image
(``NODefect_images/<fabric>/*.png``) gives ``W // 256`` tiles named
``<fabric>_<stem>_<i>``, split 75/25 into train/test good
(:func:`~nagl.data.builders.common.split_normals`). A defect image
(``Defect_images/nnnn_ddd_ff.png``, ``ddd`` the defect code) gives ``ceil(W / 256)``
tiles (the last one narrower when W is not a multiple of 256); a tile whose mask
tile is non-zero goes to ``test/<defect name>`` with its mask, the others are
dropped. Masks are ``Mask_images/<stem>_mask.png``; where a release has
``_mask1`` and ``_mask2`` instead, their union is used. A defect image without
any mask is skipped (with a warning).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from nagl.data import layout
from nagl.data.builders.common import extracted_files, read_grey, save_png, seed_option, split_normals
from nagl.data.converters import _find_dirs, _image_files, _where, check_counts
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError

log = logging.getLogger(__name__)

CATEGORY = "aitex"
TILE = 256
NORMAL_DIR, DEFECT_DIR, MASK_DIR = "NODefect_images", "Defect_images", "Mask_images"
DEFECTS = {2: "broken_end", 6: "broken_yarn", 10: "broken_pick", 16: "weft_curling", 19: "fuzzyball",
           22: "cut_selvage", 23: "crease", 25: "warp_ball", 27: "knots", 29: "contamination", 30: "nep",
           36: "weft_crack"}


@register_builder("aitex")
def build_aitex(spec: DatasetSpec, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    dst = out_dir / CATEGORY
    with extracted_files(spec, out_dir) as folders:
        normal_dir, defect_dir, mask_dir = (_release_dir(spec, folders, name) for name in (NORMAL_DIR, DEFECT_DIR, MASK_DIR))
        fabrics = sorted(d for d in normal_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        for fabric in fabrics:
            for path in _image_files(fabric):
                image = read_grey(path)
                for i in range(image.shape[1] // TILE):
                    save_png(image[:, i * TILE:(i + 1) * TILE],
                             dst / layout.TRAIN / layout.GOOD / f"{fabric.name}_{path.stem}_{i}.png")
        for path in _image_files(defect_dir):
            defect_type = DEFECTS.get(_defect_code(path))
            if defect_type is None:
                raise NaglError(f"{path}: defect code {path.stem.split('_')[1]!r} is not one of AITEX's "
                                f"{sorted(DEFECTS)}; is it the AITEX release?")
            mask = _mask(mask_dir, path.stem)
            if mask is None:
                log.warning("AITEX: %s has no mask in %s; skipped", path.name, mask_dir)
                continue
            image = read_grey(path)
            if mask.shape != image.shape:
                raise NaglError(f"{path}: the mask is {mask.shape[1]}x{mask.shape[0]}, the image "
                                f"{image.shape[1]}x{image.shape[0]}")
            for i in range(math.ceil(image.shape[1] / TILE)):
                columns = slice(i * TILE, (i + 1) * TILE)
                if mask[:, columns].any():
                    name = f"{path.stem}_{i}"
                    save_png(image[:, columns], dst / layout.TEST / defect_type / f"{name}.png")
                    save_png(np.where(mask[:, columns], 255, 0).astype(np.uint8),
                             dst / layout.GROUND_TRUTH / defect_type / layout.mask_name(name))
    split_normals(dst, seed_option(spec))
    check_counts(spec, out_dir)


def _release_dir(spec: DatasetSpec, folders: dict[str, Path], name: str) -> Path:
    found = [d for root in folders.values() for d in _find_dirs(root, lambda d: d.name == name)]
    if len(found) != 1:
        raise NaglError(f"{_where(spec)}: expected one folder {name}/ in {sorted(folders)}, found {len(found)}; "
                        f"place the three AITEX archives (see docs/datasets.md)")
    return found[0]


def _defect_code(path: Path) -> int | None:
    parts = path.stem.split("_")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _mask(mask_dir: Path, stem: str) -> np.ndarray | None:
    """The image's mask as booleans: ``<stem>_mask.png``, or the union of ``_mask1``, ``_mask2``, ..."""
    single = mask_dir / f"{stem}_mask.png"
    parts = [single] if single.is_file() else sorted(mask_dir.glob(f"{stem}_mask[0-9].png"))
    if not parts:
        return None
    return np.logical_or.reduce([read_grey(p) > 0 for p in parts])
