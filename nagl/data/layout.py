"""The canonical dataset layout, image normalisation and the manifest.

Every prepared dataset looks like this (the MVTec AD layout)::

    <dataset>/manifest.parquet
    <dataset>/<category>/train/good/<stem>.png
    <dataset>/<category>/test/good/<stem>.png
    <dataset>/<category>/test/<defect_type>/<stem>.png
    <dataset>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (where masks exist)

Images are 8-bit RGB PNG; masks are 8-bit single-channel PNG holding only 0
(normal) and 255 (anomalous), the size of their image. :func:`normalise_images`
brings a builder's output to that form, one documented way:

- grayscale (and 1-bit) -> the gray value replicated into R, G and B;
- 16-bit samples -> 8 bit by dropping the low byte (``v >> 8``);
- palette -> RGB through the palette;
- an alpha channel (RGBA, LA, palette with transparency) -> composited on
  black, i.e. ``rgb * alpha / 255`` rounded, then dropped;
- CMYK / YCbCr / LAB / HSV -> RGB by Pillow's conversion;
- JPEG, BMP, TIFF (and PNG not in the form above) -> PNG with the same stem;
  the original file is removed, so mask names (``<stem>_mask.png``) still match;
- masks: a pixel is anomalous where any colour channel is non-zero (alpha is
  ignored, 16-bit values are compared before any scaling) -> 255, else 0.

EXIF orientation tags are ignored: masks are drawn on the stored pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from nagl.data import origins
from nagl.errors import NaglError
from nagl.io import atomic_path, sha256_file

MANIFEST_NAME = "manifest.parquet"
TRAIN, TEST = "train", "test"
SPLITS = (TRAIN, TEST)
GOOD = "good"
GROUND_TRUTH = "ground_truth"
MASK_SUFFIX = "_mask"
CANONICAL_SUFFIX = ".png"
# Image files a builder may leave behind; normalisation turns them into PNG.
SOURCE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

MANIFEST_COLUMNS = ("dataset", "category", "split", "label", "defect_type", "image_path",
                    "mask_path", "image_sha256", "width", "height")
MANIFEST_SCHEMA = pa.schema([
    ("dataset", pa.string()),
    ("category", pa.string()),
    ("split", pa.string()),
    ("label", pa.int64()),
    ("defect_type", pa.string()),
    ("image_path", pa.string()),
    ("mask_path", pa.string()),
    ("image_sha256", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
])

# What reading a bad image file raises: corrupt or unsupported (OSError, ValueError), or over
# Pillow's decompression-bomb limit (DecompressionBombError, not an OSError).
UNREADABLE_IMAGE = (OSError, ValueError, Image.DecompressionBombError)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GRAY, _PNG_RGB = 0, 2  # IHDR colour types


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SOURCE_IMAGE_SUFFIXES


def mask_name(stem: str) -> str:
    """File name of the mask of the image ``<stem>.png``."""
    return f"{stem}{MASK_SUFFIX}{CANONICAL_SUFFIX}"


def png_header(path: Path) -> tuple[int, int] | None:
    """``(bit_depth, colour_type)`` from a PNG's IHDR chunk, or None if not a PNG.

    Pillow reads 16-bit RGB PNGs as 8-bit ``RGB``, so the mode alone cannot tell
    whether a file is canonical; the header can.
    """
    with open(path, "rb") as handle:
        head = handle.read(26)
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def is_canonical_image(path: Path) -> bool:
    return path.suffix == CANONICAL_SUFFIX and png_header(path) == (8, _PNG_RGB)


def categories(dataset_dir: str | Path) -> list[str]:
    """Category folders of a dataset, sorted (hidden folders excluded)."""
    root = Path(dataset_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folders(dataset_dir: str | Path) -> Iterator[tuple[str, str, str, Path]]:
    """``(category, split, defect_type, folder)`` for every image folder, sorted."""
    root = Path(dataset_dir)
    for category in categories(root):
        for split in SPLITS:
            split_dir = root / category / split
            if not split_dir.is_dir():
                continue
            for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                yield category, split, folder.name, folder


def to_rgb8(image: Image.Image) -> tuple[Image.Image, str | None]:
    """The image as 8-bit RGB, and what was converted (None if it already was RGB).

    Raises ValueError for modes without a documented conversion (e.g. float).
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("L", "1"):
        return image.convert("L").convert("RGB"), "grayscale"
    if mode == "I" or mode.startswith("I;16"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB"), "16-bit"
    if mode == "P" and "transparency" not in image.info:
        return image.convert("RGB"), "palette"
    if mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        rgba = np.asarray(image.convert("RGBA")).astype(np.uint32)
        rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB"), f"{mode} (alpha on black)"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB"), mode
    raise ValueError(f"image mode {mode!r} has no documented conversion to 8-bit RGB")


def mask_to_binary(mask: Image.Image) -> np.ndarray:
    """A mask as uint8 0/255: 255 where any colour channel is non-zero (alpha ignored)."""
    if mask.mode == "P":
        mask = mask.convert("RGB")
    values = np.asarray(mask)
    if values.ndim == 3:
        channels = values.shape[2]
        if mask.mode in ("RGBA", "LA", "RGBa", "La"):
            channels -= 1
        values = values[..., :channels].max(axis=2)
    return np.where(values > 0, 255, 0).astype(np.uint8)


def convert_mask(src: str | Path, dst: str | Path) -> None:
    """Write the mask ``src`` (any readable format) to ``dst`` as a 0/255 PNG, atomically."""
    src = Path(src)
    try:
        with Image.open(src) as mask:
            binary = mask_to_binary(mask)
    except UNREADABLE_IMAGE as error:
        raise NaglError(f"cannot read mask {origins.describe(src)}: {error}; replace the file or remove it "
                        f"and its image") from error
    origins.record(Path(dst), src)
    _save_png(Image.fromarray(binary, "L"), Path(dst))


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _replace_with_png(path: Path, image: Image.Image, root: Path) -> Path:
    """Write ``image`` as ``<stem>.png`` beside ``path``; remove ``path`` if it was another file."""
    target = path.with_suffix(CANONICAL_SUFFIX)
    if target != path and target.exists() and not os.path.samefile(target, path):
        raise NaglError(f"{path.relative_to(root)} and {target.relative_to(root)} would both become "
                        f"{target.name}; remove one of them")
    _save_png(image, target)
    if target != path and path.exists() and not os.path.samefile(target, path):
        path.unlink()
    return target


def _normalise_image(path: Path, root: Path) -> str | None:
    if is_canonical_image(path):
        return None
    try:
        with Image.open(path) as image:
            image.load()
            source_format = image.format
            rgb, converted = to_rgb8(image)
    except UNREADABLE_IMAGE:
        return None  # unreadable or unsupported: left for the validator to report
    target = _replace_with_png(path, rgb, root)
    what = f"{converted} " if converted else ""
    return (f"{path.relative_to(root).as_posix()}: {what}{source_format} -> 8-bit RGB PNG "
            f"{target.relative_to(root).as_posix()}")


def _normalise_mask(path: Path, root: Path) -> str | None:
    try:
        with Image.open(path) as mask:
            mask.load()
            source = f"{mask.mode} {mask.format}"
            binary = mask_to_binary(mask)
    except UNREADABLE_IMAGE:
        return None
    canonical = path.suffix == CANONICAL_SUFFIX and png_header(path) == (8, _PNG_GRAY)
    if canonical and np.array_equal(binary, _raw_values(path)):
        return None
    target = _replace_with_png(path, Image.fromarray(binary, "L"), root)
    return (f"{path.relative_to(root).as_posix()}: mask {source} -> 0/255 PNG "
            f"{target.relative_to(root).as_posix()}")


def _raw_values(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def normalise_images(dataset_dir: str | Path) -> list[str]:
    """Convert every image to 8-bit RGB PNG and every mask to 0/255 PNG, in place.

    Returns one note per converted file. Files that cannot be read are left as
    they are; :func:`nagl.data.validate.validate_dataset` reports them.
    """
    root = Path(dataset_dir)
    notes = []
    for _category, _split, _defect, folder in image_folders(root):
        for path in sorted(folder.iterdir()):
            if is_image_file(path):
                note = _normalise_image(path, root)
                if note:
                    notes.append(note)
    for category in categories(root):
        truth = root / category / GROUND_TRUTH
        if not truth.is_dir():
            continue
        for folder in sorted(p for p in truth.iterdir() if p.is_dir()):
            for path in sorted(folder.iterdir()):
                if is_image_file(path):
                    note = _normalise_mask(path, root)
                    if note:
                        notes.append(note)
    return notes


def _manifest_rows(root: Path, dataset_name: str) -> list[dict]:
    rows = []
    for category, split, defect_type, folder in image_folders(root):
        for path in sorted(folder.iterdir()):
            if not (path.is_file() and path.suffix == CANONICAL_SUFFIX):
                continue
            mask = root / category / GROUND_TRUTH / defect_type / mask_name(path.stem)
            with Image.open(path) as image:
                width, height = image.size
            rows.append({
                "dataset": dataset_name,
                "category": category,
                "split": split,
                "label": 0 if defect_type == GOOD else 1,
                "defect_type": defect_type,
                "image_path": path.relative_to(root).as_posix(),
                "mask_path": mask.relative_to(root).as_posix() if mask.is_file() else None,
                "image_sha256": sha256_file(path),
                "width": width,
                "height": height,
            })
    rows.sort(key=lambda r: (r["category"], r["split"], r["defect_type"], r["image_path"]))
    return rows


def write_manifest(dataset_dir: str | Path, dataset_name: str) -> pd.DataFrame:
    """Write ``manifest.parquet`` (one row per image) atomically and return it.

    The file is byte-identical for identical content: rows are sorted, the
    schema is fixed, and no pandas metadata or timestamps are stored.
    """
    root = Path(dataset_dir)
    rows = _manifest_rows(root, dataset_name)
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_path(root / MANIFEST_NAME) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return table.to_pandas()


def read_manifest(dataset_dir: str | Path) -> pd.DataFrame:
    """The manifest of a prepared dataset; a NaglError says how to create it if missing."""
    root = Path(dataset_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise NaglError(f"no manifest at {path}: the dataset is not prepared; run "
                        f"`nagl datasets prepare {root.name}` (or `dvc pull datasets/{root.name}`)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise NaglError(f"cannot read {path}: {error}; delete it and run "
                        f"`nagl datasets prepare {root.name}` again") from error
    if tuple(table.column_names) != MANIFEST_COLUMNS:
        raise NaglError(f"{path} has columns {table.column_names}, expected {list(MANIFEST_COLUMNS)}; "
                        f"run `nagl datasets prepare {root.name}` again")
    return table.to_pandas()


def summarise(manifest: pd.DataFrame) -> dict:
    """Counts for `nagl datasets list/show`: per dataset and per category."""
    per_category = {}
    for category, rows in manifest.groupby("category", sort=True):
        test = rows[rows["split"] == TEST]
        anomalous = test[test["label"] == 1]
        per_category[str(category)] = {
            "train_good": int((rows["split"] == TRAIN).sum()),
            "test_good": int((test["label"] == 0).sum()),
            "test_anomalous": int(len(anomalous)),
            "defect_types": sorted(str(d) for d in anomalous["defect_type"].unique()),
            "masks": int(rows["mask_path"].notna().sum()),
        }
    datasets = sorted(str(d) for d in manifest["dataset"].unique())
    return {
        "dataset": datasets[0] if len(datasets) == 1 else datasets,
        "categories": sorted(per_category),
        "n_images": int(len(manifest)),
        "n_train": int((manifest["split"] == TRAIN).sum()),
        "n_test": int((manifest["split"] == TEST).sum()),
        "n_anomalous": int((manifest["label"] == 1).sum()),
        "has_masks": bool(manifest["mask_path"].notna().any()),
        "per_category": per_category,
    }
