"""The one validator every dataset goes through, after normalisation.

:func:`validate_dataset` walks a dataset folder and lists every problem it
finds, each with what to do about it; :func:`raise_if_invalid` turns a non-empty
list into a :class:`~nagl.errors.NaglError`. A dataset with problems is not
versioned (``nagl.data.prepare`` stops before DVC).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nagl.data import layout
from nagl.errors import NaglError
from nagl.io import sha256_file

MAX_LISTED = 50

_RERUN = "run `nagl datasets prepare` again (it normalises images) or convert the file by hand"


@dataclass(frozen=True)
class Problem:
    path: str  # relative to the dataset folder, POSIX; "." for the folder itself
    message: str
    hint: str  # what to do

    def __str__(self) -> str:
        return f"{self.path}: {self.message} -> {self.hint}"


class _Checker:
    def __init__(self, root: Path):
        self.root = root
        self.problems: list[Problem] = []
        self.readable: list[Path] = []  # every readable image of train/ and test/, for the leak check

    def add(self, path: Path, message: str, hint: str) -> None:
        rel = path.relative_to(self.root).as_posix() if path != self.root else "."
        self.problems.append(Problem(rel or ".", message, hint))

    def outside(self, path: Path, where: str) -> None:
        kind = "folder" if path.is_dir() else "file"
        self.add(path, f"{kind} outside the canonical layout ({where})",
                 "move it to <category>/train/good, <category>/test/<defect_type> or "
                 "<category>/ground_truth/<defect_type>, or delete it")


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def _image_files(checker: _Checker, folder: Path) -> dict[str, tuple[int, int]]:
    """Check the images of one folder; return ``stem -> (width, height)`` of the readable ones."""
    sizes, seen = {}, {}
    for path in _entries(folder):
        if path.is_dir():
            checker.outside(path, "image folders hold files only")
            continue
        if path.name.startswith("."):
            checker.outside(path, "hidden file")
            continue
        suffix = path.suffix.lower()
        if suffix not in layout.SOURCE_IMAGE_SUFFIXES:
            checker.add(path, f"unknown file extension {path.suffix!r}",
                        f"images must be {', '.join(layout.SOURCE_IMAGE_SUFFIXES)}; "
                        f"convert or delete the file")
            continue
        if path.stem in seen:
            checker.add(path, f"{seen[path.stem].name} and {path.name} share the stem {path.stem!r}",
                        "rename or delete one of them (names must be unique without the extension)")
            continue
        seen[path.stem] = path
        size = _check_image(checker, path)
        if size is not None:
            sizes[path.stem] = size
            checker.readable.append(path)
    return sizes


def _check_image(checker: _Checker, path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            image.load()
            mode, size, image_format = image.mode, image.size, image.format
    except Image.DecompressionBombError as error:
        checker.add(path, f"image too large to open safely ({error})",
                    f"downscale it to at most {Image.MAX_IMAGE_PIXELS} pixels or delete it")
        return None
    except layout.UNREADABLE_IMAGE as error:
        checker.add(path, f"unreadable or corrupt image ({error})",
                    "replace it with a good copy of the original or delete it")
        return None
    if image_format != "PNG":
        checker.add(path, f"{image_format} image not converted to PNG", _RERUN)
    elif path.suffix != layout.CANONICAL_SUFFIX:
        checker.add(path, f"PNG image with the extension {path.suffix!r}", "rename it to <stem>.png")
    elif not layout.is_canonical_image(path):
        bit_depth, _ = layout.png_header(path)
        if bit_depth == 16:
            what = "16-bit image"
        elif mode in ("L", "1", "I", "I;16"):
            what = "grayscale image"
        elif "A" in mode or "transparency" in image.info:
            what = f"image with an alpha channel ({mode})"
        else:
            what = f"image in mode {mode} (bit depth {bit_depth})"
        checker.add(path, f"{what}; images must be 8-bit RGB", _RERUN)
    return size


def _check_mask(checker: _Checker, path: Path, image_size: tuple[int, int]) -> None:
    try:
        with Image.open(path) as mask:
            mask.load()
            size = mask.size
            values = np.asarray(mask)
    except layout.UNREADABLE_IMAGE as error:
        checker.add(path, f"unreadable or corrupt mask ({error})",
                    "replace the mask with a good copy or delete it together with its image")
        return
    if size != image_size:
        checker.add(path, f"mask is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]}",
                    "use the mask that belongs to this image, or resize it (nearest neighbour)")
    if path.suffix != layout.CANONICAL_SUFFIX or layout.png_header(path) != (8, 0):
        checker.add(path, "mask is not an 8-bit single-channel PNG", _RERUN)
    elif not np.isin(values, (0, 255)).all():
        checker.add(path, "mask holds values other than 0 and 255", _RERUN)
    elif size == image_size and not values.any():
        checker.add(path, "mask of an anomalous image is all zero (no anomalous pixel)",
                    "use the image's real mask, or move the image to test/good if it is normal")


def _check_category(checker: _Checker, category: Path) -> dict:
    """Check one category; return what the dataset-level checks need."""
    found = {"anomalous": {}, "masks": 0}
    for entry in _entries(category):
        if entry.name not in (*layout.SPLITS, layout.GROUND_TRUTH) or not entry.is_dir():
            checker.outside(entry, "a category holds only train/, test/ and ground_truth/")
    train_good = category / layout.TRAIN / layout.GOOD
    test_dir = category / layout.TEST
    image_sizes: dict[str, dict[str, tuple[int, int]]] = {}
    n_images = 0
    for split in layout.SPLITS:
        split_dir = category / split
        if not split_dir.is_dir():
            continue
        for folder in _entries(split_dir):
            if not folder.is_dir():
                checker.outside(folder, f"{split}/ holds folders only")
                continue
            if split == layout.TRAIN and folder.name != layout.GOOD:
                checker.outside(folder, "train/ holds only good/ (normal images)")
                continue
            sizes = _image_files(checker, folder)
            n_images += len(sizes)
            if not any(folder.iterdir()):
                checker.add(folder, "empty folder", "add images or delete the folder")
            if split == layout.TEST:
                image_sizes[folder.name] = sizes
                if folder.name != layout.GOOD:
                    found["anomalous"].update({(folder.name, stem): size for stem, size in sizes.items()})
    if n_images == 0 and not any(p for p in category.rglob("*") if p.is_file()):
        checker.add(category, "empty category", "add its images or delete the folder")
        return found
    if not any(train_good.glob("*")):
        checker.add(category, "category has no train/good images (the normal references)",
                    f"put normal images in {category.name}/train/good/")
    if not any((test_dir / layout.GOOD).glob("*")):
        checker.add(category, "category has no test/good images (normal queries)",
                    f"put normal test images in {category.name}/test/good/")
    if not found["anomalous"]:
        checker.add(category, "category has no anomalous test images",
                    f"put anomalous images in {category.name}/test/<defect_type>/, or drop the category")
    found["masks"] = _check_masks(checker, category, image_sizes, found)
    return found


def _check_masks(checker: _Checker, category: Path, image_sizes: dict, found: dict) -> int:
    truth = category / layout.GROUND_TRUTH
    found["masked"] = set()
    if not truth.is_dir():
        return 0
    n_masks = 0
    for folder in _entries(truth):
        if not folder.is_dir():
            checker.outside(folder, "ground_truth/ holds one folder per defect type")
            continue
        for path in _entries(folder):
            if path.is_dir():
                checker.outside(path, "mask folders hold files only")
                continue
            if path.suffix.lower() not in layout.SOURCE_IMAGE_SUFFIXES:
                checker.add(path, f"unknown file extension {path.suffix!r} in ground_truth/",
                            "masks are <stem>_mask.png; convert or delete the file")
                continue
            stem = path.stem
            if not stem.endswith(layout.MASK_SUFFIX):
                checker.add(path, "mask name does not end in _mask",
                            f"rename it to <image stem>{layout.MASK_SUFFIX}.png")
                continue
            image_stem = stem[: -len(layout.MASK_SUFFIX)]
            sizes = image_sizes.get(folder.name, {})
            if image_stem not in sizes:
                image = f"{category.name}/test/{folder.name}/{image_stem}.png"
                if (category / layout.TEST / folder.name).is_dir() and any(
                        p.stem == image_stem for p in (category / layout.TEST / folder.name).iterdir()):
                    continue  # the image exists but is unreadable: reported there
                checker.add(path, f"mask without an image (expected {image})",
                            "add the image or delete the mask")
                continue
            n_masks += 1
            found["masked"].add((folder.name, image_stem))
            _check_mask(checker, path, sizes[image_stem])
    return n_masks


def validate_dataset(dataset_dir: str | Path) -> list[Problem]:
    """Every problem of a dataset folder in the canonical layout (empty list: valid)."""
    root = Path(dataset_dir)
    checker = _Checker(root)
    if not root.is_dir():
        checker.problems.append(Problem(".", f"dataset folder {root} does not exist",
                                        "build the dataset first (`nagl datasets prepare`)"))
        return checker.problems
    found = {}
    for entry in _entries(root):
        if entry.name == layout.MANIFEST_NAME and entry.is_file():
            continue
        if entry.is_dir() and not entry.name.startswith("."):
            found[entry.name] = _check_category(checker, entry)
        else:
            checker.outside(entry, "the dataset folder holds only category folders and the manifest")
    if not found:
        checker.add(root, "no categories", "a dataset needs at least one <category>/ folder")
    if any(info["masks"] for info in found.values()):
        # The dataset has pixel masks, so every anomalous image needs one.
        for category, info in sorted(found.items()):
            for (defect_type, stem) in sorted(info["anomalous"]):
                if (defect_type, stem) not in info.get("masked", set()):
                    missing = root / category / layout.GROUND_TRUTH / defect_type / layout.mask_name(stem)
                    checker.add(missing, "anomalous image without a mask (the dataset has masks)",
                                f"add the mask for {category}/test/{defect_type}/{stem}.png "
                                f"or remove that image")
    _check_leaks(checker)
    return checker.problems


def _check_leaks(checker: _Checker) -> None:
    """The same image bytes in train and test, or as a normal and an anomalous image, of one category
    is a leak. Across categories it is not: in a one-vs-all dataset (MNIST, CIFAR-10, digits) an image is
    normal in its own class's category and anomalous in the others, and categories are separate tasks."""
    by_content: dict[tuple[str, str], list[Path]] = {}
    for path in checker.readable:
        category = path.relative_to(checker.root).parts[0]
        by_content.setdefault((category, sha256_file(path)), []).append(path)
    for paths in by_content.values():
        if len(paths) < 2:
            continue
        roles = [path.relative_to(checker.root).parts for path in paths]  # category, split, folder, file
        splits = {parts[1] for parts in roles}
        labels = {parts[2] == layout.GOOD for parts in roles}
        if len(splits) < 2 and len(labels) < 2:
            continue
        what = "in train and in test" if len(splits) > 1 else "as a normal and as an anomalous image"
        others = ", ".join(path.relative_to(checker.root).as_posix() for path in paths[1:])
        checker.add(paths[0], f"the same image bytes appear {what} (also {others})",
                    "keep each image in one place only: a copy in both leaks the answer into the benchmark")


def raise_if_invalid(problems: list[Problem], dataset_dir: str | Path,
                     source_of: Callable[[str], str | None] | None = None) -> None:
    """Raise a NaglError that lists each problem (file and what to do), if there are any.

    ``source_of`` maps a problem's path to the file it was made from (see
    :mod:`nagl.data.origins`), which is what the user can fix.
    """
    if not problems:
        return
    lines = [f"dataset {dataset_dir} failed validation with {len(problems)} problem(s); "
             f"it was not versioned. Fix these and prepare it again:"]
    for problem in problems[:MAX_LISTED]:
        source = source_of(problem.path) if source_of is not None else None
        lines.append(f"  - {problem.path} (from {source}): {problem.message} -> {problem.hint}" if source
                     else f"  - {problem}")
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    raise NaglError("\n".join(lines))
