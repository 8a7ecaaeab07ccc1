"""Builders for real datasets: each writes the canonical layout into an empty folder.

Archive-based builders (``mvtec``, ``mpdd``, ``visa``, ``btad``, ``medianomaly``)
take the archive from :func:`nagl.data.archives.fetch_archive` (options ``url``,
``sha256`` or ``md5``, ``filename``, optional ``download: manual``), extract it with
:func:`~nagl.data.archives.safe_extract` into a scratch folder beside the output
and move the images into place. ``folder`` copies a user's own folder. Every
builder accepts ``categories: [..]`` to keep a subset.

Images are moved as they are (``prepare`` normalises them); masks are written
as 0/255 PNG ``ground_truth/<defect_type>/<stem>_mask.png`` right away. The
rules per release are in docs/datasets.md.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from nagl.data import layout, origins
from nagl.data.archives import fetch_archive, safe_extract
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError
from nagl.settings import project_dir

_SEARCH_DEPTH = 3  # how deep below the archive root a release's folders may sit


def _where(spec: DatasetSpec) -> str:
    return f"dataset {spec.name!r} (config/datasets.yaml)"


def _manual(spec: DatasetSpec) -> bool:
    """The option ``download``: 'manual' (a web page, e.g. Kaggle) or 'auto' (the default)."""
    mode = spec.options.get("download", "auto")
    if mode not in ("auto", "manual"):
        raise NaglError(f"{_where(spec)}: option 'download' must be 'auto' or 'manual', got {mode!r}")
    return mode == "manual"


def _fetch(spec: DatasetSpec) -> Path:
    options = spec.options
    if not options.get("filename"):
        raise NaglError(f"{_where(spec)}: option 'filename' (the archive's file name) is missing")
    return fetch_archive(spec.name, options.get("url"), options.get("sha256"), options["filename"],
                         manual=_manual(spec), md5=options.get("md5"))


@contextlib.contextmanager
def _extracted(spec: DatasetSpec, out_dir: Path) -> Iterator[Path]:
    """The archive extracted into a scratch folder beside ``out_dir`` (same file system)."""
    archive = _fetch(spec)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-extract.", suffix=".staging", dir=out_dir.parent))
    try:
        root = safe_extract(archive, scratch / "archive")
        origins.extracted_from(root, archive)
        yield root
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _find_dirs(root: Path, predicate: Callable[[Path], bool]) -> list[Path]:
    """Folders up to ``_SEARCH_DEPTH`` levels below ``root`` (root included) matching ``predicate``.

    A match is not searched further, so a category's own sub-folders are never matched.
    """
    found, level = [], [root]
    for _depth in range(_SEARCH_DEPTH + 1):
        next_level = []
        for folder in level:
            if predicate(folder):
                found.append(folder)
            else:
                next_level += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        level = next_level
    return sorted(found)


def _select(spec: DatasetSpec, available: dict[str, Path], source: str) -> dict[str, Path]:
    """Apply the ``categories`` option to ``{category: source folder}``."""
    if not available:
        raise NaglError(f"{_where(spec)}: found no categories in {source}; is it the right file "
                        f"(see docs/datasets.md for the expected layout)?")
    wanted = spec.options.get("categories")
    if wanted is None:
        return dict(sorted(available.items()))
    if isinstance(wanted, str) or not isinstance(wanted, list):
        raise NaglError(f"{_where(spec)}: option 'categories' must be a list of names")
    unknown = sorted(set(map(str, wanted)) - set(available))
    if unknown:
        raise NaglError(f"{_where(spec)}: categories {unknown} are not in {source}; "
                        f"available: {sorted(available)}")
    return {str(name): available[str(name)] for name in sorted(set(map(str, wanted)))}


def _transfer(src: Path, dst: Path, move: bool) -> None:
    if dst.exists():
        raise NaglError(f"{origins.describe(src)} and another file both become {dst.name} in the "
                        f"dataset; rename one of them")
    dst.parent.mkdir(parents=True, exist_ok=True)
    origins.record(dst, src)
    if move:
        shutil.move(src, dst)
    else:
        shutil.copyfile(src, dst)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if layout.is_image_file(p) and not p.name.startswith("."))


def _find_mask(folder: Path, stems: list[str]) -> Path | None:
    """The first mask file in ``folder`` whose stem is one of ``stems`` (any image extension)."""
    if not folder.is_dir():
        return None
    by_stem = {p.stem: p for p in _image_files(folder)}
    return next((by_stem[s] for s in stems if s in by_stem), None)


def _convert_mvtec_category(src: Path, dst: Path, move: bool, rename: dict[str, str] | None = None) -> None:
    """Copy or move one category already in the MVTec layout (folder names mapped by ``rename``).

    Masks ``ground_truth/<defect>/<stem>_mask.*`` or ``<stem>.*`` become ``<stem>_mask.png``.
    """
    rename = rename or {}
    for split in layout.SPLITS:
        split_dir = src / split
        if not split_dir.is_dir():
            continue
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            defect_type = rename.get(folder.name, folder.name)
            for image in _image_files(folder):
                _transfer(image, dst / split / defect_type / image.name, move)
    truth = src / layout.GROUND_TRUTH
    if truth.is_dir():
        for folder in sorted(p for p in truth.iterdir() if p.is_dir()):
            defect_type = rename.get(folder.name, folder.name)
            for mask in _image_files(folder):
                stem = mask.stem.removesuffix(layout.MASK_SUFFIX)
                target = dst / layout.GROUND_TRUTH / defect_type / layout.mask_name(stem)
                if target.exists():
                    raise NaglError(f"two masks for {defect_type}/{stem} in {origins.describe(folder)}; keep one")
                layout.convert_mask(mask, target)
    if not dst.is_dir():
        raise NaglError(f"category {src.name!r} ({origins.describe(src)}) holds no images; an empty category "
                        f"is not left out silently: add its images, delete the folder, or leave it out "
                        f"with the option 'categories' in config/datasets.yaml")


def _mvtec_like(spec: DatasetSpec, out_dir: Path) -> None:
    with _extracted(spec, out_dir) as root:
        found = _find_dirs(root, lambda d: (d / layout.TRAIN / layout.GOOD).is_dir())
        for category, src in _select(spec, {d.name: d for d in found}, spec.options["filename"]).items():
            _convert_mvtec_category(src, out_dir / category, move=True)


@register_builder("mvtec")
def build_mvtec(spec: DatasetSpec, out_dir: Path) -> None:
    """MVTec AD: the archive already holds ``<category>/{train,test,ground_truth}``."""
    _mvtec_like(spec, Path(out_dir))


@register_builder("mpdd")
def build_mpdd(spec: DatasetSpec, out_dir: Path) -> None:
    """MPDD: the MVTec layout, possibly below a top folder of the archive."""
    _mvtec_like(spec, Path(out_dir))


@register_builder("btad")
def build_btad(spec: DatasetSpec, out_dir: Path) -> None:
    """BTAD: ``<cat>/train/ok``, ``test/ok``, ``test/ko``, ``ground_truth/ko/<stem>.{png,bmp}``.

    ``ok`` becomes ``good`` and ``ko`` the defect type ``bad``.
    """
    out_dir = Path(out_dir)
    with _extracted(spec, out_dir) as root:
        found = _find_dirs(root, lambda d: (d / layout.TRAIN / "ok").is_dir())
        for category, src in _select(spec, {d.name: d for d in found}, spec.options["filename"]).items():
            _convert_mvtec_category(src, out_dir / category, move=True,
                                    rename={"ok": layout.GOOD, "ko": "bad"})


VISA_SPLIT_CSV = ("split_csv", "1cls.csv")
VISA_LABELS = {"normal": layout.GOOD, "anomaly": "bad"}


@register_builder("visa")
def build_visa(spec: DatasetSpec, out_dir: Path) -> None:
    """VisA: the official one-class split ``split_csv/1cls.csv`` (object, split, label, image, mask).

    normal -> ``<split>/good``, anomaly -> ``test/bad``; masks (0/1-valued) are binarised.
    """
    out_dir = Path(out_dir)
    with _extracted(spec, out_dir) as extracted:
        roots = _find_dirs(extracted, lambda d: d.joinpath(*VISA_SPLIT_CSV).is_file())
        if not roots:
            raise NaglError(f"{_where(spec)}: {spec.options['filename']} holds no "
                            f"{'/'.join(VISA_SPLIT_CSV)}; is it the VisA release?")
        root = roots[0]
        split_csv = root.joinpath(*VISA_SPLIT_CSV)
        rows = _read_visa_csv(split_csv)
        objects = {row["object"]: root / row["object"] for _line, row in rows}
        selected = _select(spec, objects, spec.options["filename"])
        for line, row in rows:
            if row["object"] not in selected:
                continue
            where = f"{origins.describe(split_csv)}, line {line}"
            defect_type = VISA_LABELS.get(row["label"].strip().lower())
            split = row["split"].strip().lower()
            if defect_type is None or split not in layout.SPLITS:
                raise NaglError(f"{where}: unexpected split/label {row['split']!r}/{row['label']!r}")
            if split == layout.TRAIN and defect_type != layout.GOOD:
                raise NaglError(f"{where}: an anomalous image in the train split")
            image = root / row["image"]
            if not image.is_file():
                raise NaglError(f"{where}: image {row['image']} is not in the archive")
            category_dir = out_dir / row["object"]
            _transfer(image, category_dir / split / defect_type / image.name, move=True)
            mask = (row.get("mask") or "").strip()
            if mask and defect_type != layout.GOOD:
                if not (root / mask).is_file():
                    raise NaglError(f"{where}: mask {mask} is not in the archive")
                layout.convert_mask(root / mask, category_dir / layout.GROUND_TRUTH / defect_type
                                    / layout.mask_name(image.stem))


def _read_visa_csv(path: Path) -> list[tuple[int, dict]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or [])
        if missing:
            raise NaglError(f"{path}: columns {sorted(missing)} are missing; is it VisA's 1cls.csv?")
        return [(line, row) for line, row in enumerate(reader, start=2)]


MEDIANOMALY_NORMAL = ("normal", "good")
MEDIANOMALY_MASKS = "annotation"


@register_builder("medianomaly")
def build_medianomaly(spec: DatasetSpec, out_dir: Path) -> None:
    """One set of MedIAnomaly-Data (zenodo.org/records/12677223), one category.

    Options: ``subset`` (the set's folder in the archive, e.g. ``BraTS2021``),
    ``category`` (default: the subset in lower case), ``abnormal_name`` (defect
    type for image-level sets, default ``abnormal``). Two release layouts:

    - folders: ``train/`` (normal), ``test/normal`` (or ``good``), ``test/<anomaly>``
      and optionally ``test/annotation/`` masks named like the image or with
      ``flair`` replaced by ``seg`` (BraTS2021; Camelyon16 without masks);
    - ``images/`` + ``data.json`` with ``train["0"]``, ``test["0"]``, ``test["1"]``
      (RSNA, VinCXR, BrainTumor, LAG): image level, no masks.
    """
    out_dir = Path(out_dir)
    subset = spec.options.get("subset")
    with _extracted(spec, out_dir) as root:
        def is_set(d: Path) -> bool:
            if subset and d.name.lower() != str(subset).lower():
                return False
            return (d / "data.json").is_file() or (d / layout.TEST).is_dir()

        sets = _find_dirs(root, is_set)
        if len(sets) != 1:
            what = f"the set {subset!r}" if subset else "exactly one MedIAnomaly set"
            raise NaglError(f"{_where(spec)}: expected {what} in {spec.options['filename']}, found "
                            f"{[s.name for s in sets] or 'none'}; set the option 'subset'")
        set_dir = sets[0]
        category = str(spec.options.get("category") or set_dir.name.lower())
        _select(spec, {category: set_dir}, spec.options["filename"])
        if (set_dir / "data.json").is_file():
            _medianomaly_from_json(spec, set_dir, out_dir / category)
        else:
            _medianomaly_from_folders(set_dir, out_dir / category)
    check_counts(spec, out_dir)


def _medianomaly_from_folders(set_dir: Path, dst: Path) -> None:
    for image in sorted(p for p in (set_dir / layout.TRAIN).rglob("*") if layout.is_image_file(p)):
        _transfer(image, dst / layout.TRAIN / layout.GOOD / image.name, move=True)
    test = set_dir / layout.TEST
    masks = test / MEDIANOMALY_MASKS
    for folder in sorted(p for p in test.iterdir() if p.is_dir() and p.name != MEDIANOMALY_MASKS):
        normal = folder.name.lower() in MEDIANOMALY_NORMAL
        defect_type = layout.GOOD if normal else folder.name.lower()
        for image in _image_files(folder):
            _transfer(image, dst / layout.TEST / defect_type / image.name, move=True)
            mask = None if normal else _find_mask(masks, [image.stem, image.stem.replace("flair", "seg"),
                                                          image.stem + layout.MASK_SUFFIX])
            if mask is not None:
                layout.convert_mask(mask, dst / layout.GROUND_TRUTH / defect_type / layout.mask_name(image.stem))


def _medianomaly_from_json(spec: DatasetSpec, set_dir: Path, dst: Path) -> None:
    index = set_dir / "data.json"
    try:
        data = json.loads(index.read_text())
        groups = {
            (layout.TRAIN, layout.GOOD): data["train"]["0"],
            (layout.TEST, layout.GOOD): data["test"]["0"],
            (layout.TEST, str(spec.options.get("abnormal_name", "abnormal"))): data["test"]["1"],
        }
    except (ValueError, KeyError, TypeError) as error:
        raise NaglError(f"{index}: expected JSON with train['0'], test['0'] and test['1'] "
                        f"(lists of file names in images/): {error}") from error
    for (split, defect_type), names in groups.items():
        for name in names:
            image = set_dir / "images" / name
            if not image.is_file():
                raise NaglError(f"{index}: lists {name}, which is not in {set_dir / 'images'}")
            _transfer(image, dst / split / defect_type / Path(name).name, move=True)


FOLDER_LAYOUTS = ("mvtec", "normal-abnormal")


@register_builder("folder")
def build_folder(spec: DatasetSpec, out_dir: Path) -> None:
    """A user's own folder (copied, never modified). Options:

    - ``path``: the folder (relative paths are relative to the project folder);
    - ``layout: mvtec``: ``<category>/{train/good,test/<type>,ground_truth/<type>}``,
      or ``path`` itself is one category (then ``category`` names it);
    - ``layout: normal-abnormal``: ``normal/``, ``abnormal/`` (files, or one
      sub-folder per defect type) and optional ``masks/`` mirroring ``abnormal/``
      (``<stem>.*`` or ``<stem>_mask.*``); either in ``path`` (one category) or in
      each sub-folder of ``path`` (one category each). Normal images are split
      into train/good and test/good with ``seed`` (default 0) and
      ``train_fraction`` (default 0.5), see :func:`split_normal`.
    """
    out_dir = Path(out_dir)
    options = spec.options
    if not options.get("path"):
        raise NaglError(f"{_where(spec)}: option 'path' (the folder with your images) is missing")
    source = Path(str(options["path"])).expanduser()
    if not source.is_absolute():
        source = project_dir() / source
    if not source.is_dir():
        raise NaglError(f"{_where(spec)}: folder {source} does not exist; fix the option 'path'")
    kind = options.get("layout", "mvtec")
    if kind not in FOLDER_LAYOUTS:
        raise NaglError(f"{_where(spec)}: option 'layout' must be one of {FOLDER_LAYOUTS}, got {kind!r}")
    marker = (lambda d: (d / layout.TRAIN / layout.GOOD).is_dir()) if kind == "mvtec" \
        else (lambda d: (d / "normal").is_dir())
    if marker(source):
        found = {str(options.get("category") or source.name): source}
    else:
        found = {d.name: d for d in sorted(source.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    for category, src in _select(spec, found, str(source)).items():
        if not marker(src):
            what = "train/good/" if kind == "mvtec" else "normal/"
            raise NaglError(f"{_where(spec)}: {src} has no {what} folder, so it is not a category of the "
                            f"{kind} layout (an empty category is not left out silently): add its images, "
                            f"delete the folder, or leave it out with the option 'categories'")
        if kind == "mvtec":
            _convert_mvtec_category(src, out_dir / category, move=False)
        else:
            _convert_normal_abnormal(spec, src, out_dir / category)


def split_normal(names: list[str], seed: int, train_fraction: float) -> tuple[list[str], list[str]]:
    """Split normal images into (train, test), reproducibly.

    The names are sorted, permuted with ``numpy.random.default_rng(seed)``, and
    the first ``round_half_up(n * train_fraction)`` (kept between 1 and n - 1)
    go to train. The result depends only on the names, the seed and the fraction.
    """
    names = sorted(names)
    n = len(names)
    n_train = min(n - 1, max(1, math.floor(n * train_fraction + 0.5)))
    order = np.random.default_rng(seed).permutation(n)
    train = sorted(names[i] for i in order[:n_train])
    test = sorted(names[i] for i in order[n_train:])
    return train, test


COUNT_KEYS = ("train_good", "test_good", "test_anomalous", "masks", "images")
ALL_CATEGORIES = "all"  # a `counts` key: the sums over every category


def category_counts(category_dir: Path) -> dict[str, int]:
    """The numbers :func:`check_counts` compares, counted from the files a builder wrote."""
    test = category_dir / layout.TEST
    anomalous = [d for d in test.iterdir() if d.is_dir() and d.name != layout.GOOD] if test.is_dir() else []
    truth = category_dir / layout.GROUND_TRUTH
    counts = {
        "train_good": len(_image_files(category_dir / layout.TRAIN / layout.GOOD)),
        "test_good": len(_image_files(test / layout.GOOD)),
        "test_anomalous": sum(len(_image_files(d)) for d in anomalous),
        "masks": sum(len(_image_files(d)) for d in truth.iterdir() if d.is_dir()) if truth.is_dir() else 0,
    }
    counts["images"] = counts["train_good"] + counts["test_good"] + counts["test_anomalous"]
    return counts


def check_counts(spec: DatasetSpec, out_dir: Path) -> None:
    """Compare what was built with the option ``counts`` (the numbers of the spec).

    ``counts: {<category> | all: {train_good, test_good, test_anomalous, masks, images}}``,
    any subset of the keys; ``all`` sums over the categories and is checked only
    when every category was built (no ``categories`` option). Without the option
    nothing is checked (the fixtures of the tests are small).
    """
    expected = spec.options.get("counts")
    if expected is None:
        return
    if not isinstance(expected, dict):
        raise NaglError(f"{_where(spec)}: option 'counts' must map a category (or 'all') to its counts")
    out_dir = Path(out_dir)
    built = {category: category_counts(out_dir / category) for category in layout.categories(out_dir)}
    for category, numbers in sorted(expected.items()):
        if category == ALL_CATEGORIES:
            if spec.options.get("categories") is not None:
                continue
            actual = {key: sum(c[key] for c in built.values()) for key in COUNT_KEYS}
            folder = out_dir
        elif category in built:
            actual, folder = built[category], out_dir / category
        elif spec.options.get("categories") is not None:
            continue  # not selected
        else:
            raise NaglError(f"{_where(spec)}: the build has no category {category!r} (option 'counts'); "
                            f"built: {sorted(built)}")
        unknown = sorted(set(numbers) - set(COUNT_KEYS))
        if unknown:
            raise NaglError(f"{_where(spec)}: option 'counts' of {category!r} has unknown keys {unknown}; "
                            f"known: {list(COUNT_KEYS)}")
        wrong = [f"{key}: built {actual[key]}, expected {numbers[key]}" for key in COUNT_KEYS
                 if key in numbers and actual[key] != numbers[key]]
        if wrong:
            raise NaglError(f"{_where(spec)}: {folder} does not have the counts of the release "
                            f"({'; '.join(wrong)}); the archive is probably another version or "
                            f"incomplete: check it, or fix the option 'counts' if the release changed")


def _convert_normal_abnormal(spec: DatasetSpec, src: Path, dst: Path) -> None:
    seed = spec.options.get("seed", 0)
    fraction = spec.options.get("train_fraction", 0.5)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise NaglError(f"{_where(spec)}: option 'seed' must be an integer, got {seed!r}")
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise NaglError(f"{_where(spec)}: option 'train_fraction' must be between 0 and 1, got {fraction!r}")
    normals = {p.name: p for p in _image_files(src / "normal")}
    if len(normals) < 2:
        raise NaglError(f"{src / 'normal'} holds {len(normals)} image(s); at least 2 are needed "
                        f"(one for train/good, one for test/good)")
    train, test = split_normal(list(normals), seed, float(fraction))
    for split, names in ((layout.TRAIN, train), (layout.TEST, test)):
        for name in names:
            _transfer(normals[name], dst / split / layout.GOOD / name, move=False)
    abnormal = src / "abnormal"
    if not abnormal.is_dir():
        raise NaglError(f"{src} has no abnormal/ folder; put the anomalous images there")
    groups = [("bad", abnormal, src / "masks")]
    groups += [(d.name, d, src / "masks" / d.name) for d in sorted(abnormal.iterdir())
               if d.is_dir() and not d.name.startswith(".")]
    for defect_type, folder, mask_dir in groups:
        for image in _image_files(folder):
            _transfer(image, dst / layout.TEST / defect_type / image.name, move=False)
            mask = _find_mask(mask_dir, [image.stem, image.stem + layout.MASK_SUFFIX])
            if mask is not None:
                layout.convert_mask(mask, dst / layout.GROUND_TRUTH / defect_type / layout.mask_name(image.stem))
