"""MVTec 3D-AD, RGB only (pixel masks).

``<cat>/train/good/rgb/*.png`` -> ``train/good``; ``<cat>/validation`` is dropped;
``<cat>/test/<type>/rgb/NNN.png`` -> ``test/<type>`` and ``<cat>/test/<type>/gt/NNN.png``
-> ``ground_truth/<type>/NNN_mask.png`` (none for ``good``). The point clouds
(``xyz/*.tiff``) are never copied: a TIFF would count as an image.
"""

from __future__ import annotations

from pathlib import Path

from nagl.data import layout
from nagl.data.converters import _extracted, _find_dirs, _image_files, _select, _transfer, check_counts
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError

RGB, GT = "rgb", "gt"


@register_builder("mvtec3d")
def build_mvtec3d(spec: DatasetSpec, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    with _extracted(spec, out_dir) as root:
        found = _find_dirs(root, lambda d: (d / layout.TRAIN / layout.GOOD / RGB).is_dir())
        for category, src in _select(spec, {d.name: d for d in found}, spec.options["filename"]).items():
            dst = out_dir / category
            for image in _image_files(src / layout.TRAIN / layout.GOOD / RGB):
                _transfer(image, dst / layout.TRAIN / layout.GOOD / image.name, move=True)
            for folder in sorted(p for p in (src / layout.TEST).iterdir() if p.is_dir()):
                for image in _image_files(folder / RGB):
                    _transfer(image, dst / layout.TEST / folder.name / image.name, move=True)
                    if folder.name == layout.GOOD:
                        continue
                    mask = folder / GT / image.name
                    if not mask.is_file():
                        raise NaglError(f"{folder / RGB / image.name} has no mask {mask}; the archive is incomplete")
                    layout.convert_mask(mask, dst / layout.GROUND_TRUTH / folder.name / layout.mask_name(image.stem))
    check_counts(spec, out_dir)
