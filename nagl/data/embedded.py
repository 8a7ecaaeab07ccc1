"""The embedded semi-synthetic benchmark: builder kind ``embedded``.

Three domains (presets) of three categories each, made offline from real
photographs that scikit-image ships, with generated defects (``nagl.data.defects``)
and exact masks. See ``docs/embedded-benchmark.md`` for the design.

Every image is a pure function of ``(dataset name, category, role, index)``: its
random choices come from a ``numpy.random.Generator`` seeded with a stable hash of
that key, so the files are byte-identical on every build, in any process, and a
smaller ``counts`` option yields a prefix of the full set.

Registry options: ``preset`` (required), ``categories: [..]`` (a subset, default
all), ``counts: {train_good, test_good, test_anomalous}`` (default 40 / 15 / 20).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from nagl.data.defects import Context, apply_defect
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError
from nagl.io import atomic_write_bytes, stable_hash

SIZE = 256
ROLES = ("train_good", "test_good", "test_anomalous")
DEFAULT_COUNTS = {"train_good": 40, "test_good": 15, "test_anomalous": 20}
MAX_COUNT = 10_000
OPTION_KEYS = ("preset", "categories", "counts")


@dataclass(frozen=True)
class Category:
    """How one category's normal images are cut from its source photograph.

    Sizes are in *work* pixels: the source resized once by ``work_scale``.
    ``center``/``jitter`` are fractions of the work image (y, x): the view's
    centre is drawn uniformly in ``center +- jitter``.
    """

    name: str
    source: str  # file in skimage/data
    defects: tuple[str, ...]
    work_scale: float = 1.0
    tint: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None  # grey -> RGB
    view: float = 256.0  # side of the square view
    zoom: float = 0.08  # +- relative view size
    center: tuple[float, float] = (0.5, 0.5)
    jitter: tuple[float, float] = (0.2, 0.2)
    rotate: float = 5.0  # +- degrees
    flip: bool = False  # random mirror
    pad: str = "mirror"  # how the view is filled beyond the photograph (scipy.ndimage mode)
    light: float = 0.08  # +- brightness gain; gamma and shading scale with it
    foreground: str | None = None  # where defects may sit: None (anywhere), "bright", "fundus"
    foreign_from: str | None = None  # category (same preset) whose images are pasted as 'foreign'
    defect_scale: float = 1.0
    defect_contrast: float = 1.0


TEXTURE_DEFECTS = ("scratch", "hole", "stain", "foreign")
MEDICAL_DEFECTS = ("dark_lesion", "bright_lesion", "stain", "deformation")
OBJECT_DEFECTS = ("scratch", "missing", "colour", "deformation")

PRESETS: dict[str, dict[str, Category]] = {
    "textures": {c.name: c for c in (
        Category("brick", "brick.png", TEXTURE_DEFECTS, tint=((45, 22, 14), (240, 178, 150)),
                 rotate=3.0, flip=True, foreign_from="gravel"),
        Category("grass", "grass.png", TEXTURE_DEFECTS, tint=((18, 34, 8), (205, 232, 150)),
                 rotate=5.0, flip=True, foreign_from="gravel"),
        Category("gravel", "gravel.png", TEXTURE_DEFECTS, tint=((32, 28, 24), (230, 218, 200)),
                 rotate=5.0, flip=True, foreign_from="grass"),
    )},
    "medical": {c.name: c for c in (
        Category("fundus", "retina.jpg", MEDICAL_DEFECTS, work_scale=0.2, view=284.0, zoom=0.04,
                 jitter=(0.02, 0.02), rotate=8.0, pad="nearest", foreground="fundus", defect_scale=1.2),
        Category("histology", "ihc.png", MEDICAL_DEFECTS, view=240.0, zoom=0.02,
                 jitter=(0.01, 0.01), rotate=1.5, defect_scale=1.5, defect_contrast=1.3),
        Category("microscopy", "cell.png", MEDICAL_DEFECTS, tint=((0, 0, 0), (238, 242, 255)),
                 center=(380 / 660, 370 / 550), jitter=(0.08, 0.05), rotate=8.0, flip=True,
                 defect_scale=1.3, defect_contrast=1.4),
    )},
    "objects": {c.name: c for c in (
        Category("coins", "coins.png", OBJECT_DEFECTS, tint=((0, 0, 0), (255, 246, 228)), view=300.0,
                 zoom=0.04, jitter=(0.02, 0.02), rotate=3.0, foreground="bright", defect_scale=1.5,
                 defect_contrast=1.3),
        Category("coffee", "coffee.png", OBJECT_DEFECTS, work_scale=0.7, view=266.0, zoom=0.04,
                 center=(0.5, 0.47), jitter=(0.02, 0.02), rotate=4.0),
        Category("cat", "chelsea.png", OBJECT_DEFECTS, view=290.0, zoom=0.04,
                 center=(0.5, 0.5), jitter=(0.02, 0.03), rotate=4.0),
    )},
}


@dataclass(frozen=True)
class Options:
    preset: str
    categories: tuple[str, ...]
    counts: dict[str, int]


@dataclass(frozen=True)
class Rendered:
    """One generated image: ``image`` as written, ``clean`` its defect-free version."""

    image: np.ndarray  # (SIZE, SIZE, 3) uint8
    clean: np.ndarray  # (SIZE, SIZE, 3) uint8; equals image for normal images
    mask: np.ndarray | None  # (SIZE, SIZE) bool for anomalous images, else None
    defect: str  # "good" or the defect type


def parse_options(spec: DatasetSpec) -> Options:
    """Check ``spec.options``; errors name the dataset and the bad option."""
    where = f"dataset {spec.name!r} (config/datasets.yaml)"
    unknown = sorted(set(spec.options) - set(OPTION_KEYS))
    if unknown:
        raise NaglError(f"{where}: unknown option(s) {', '.join(unknown)}; "
                        f"embedded datasets take {', '.join(OPTION_KEYS)}")
    preset = spec.options.get("preset")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise NaglError(f"{where}: option 'preset' is {preset!r}; set it to one of {', '.join(PRESETS)}")
    known = tuple(PRESETS[preset])
    categories = spec.options.get("categories")
    if categories is None:
        categories = known
    else:
        if isinstance(categories, str) or not isinstance(categories, (list, tuple)) or not categories:
            raise NaglError(f"{where}: option 'categories' must be a non-empty list of names from "
                            f"{', '.join(known)}")
        bad = [c for c in categories if c not in known]
        if bad:
            raise NaglError(f"{where}: option 'categories' names unknown categor(y/ies) "
                            f"{', '.join(map(repr, bad))}; preset {preset!r} has {', '.join(known)}")
        if len(set(categories)) != len(categories):
            raise NaglError(f"{where}: option 'categories' lists a category twice")
        categories = tuple(categories)
    counts = dict(DEFAULT_COUNTS)
    given = spec.options.get("counts") or {}
    if not isinstance(given, dict):
        raise NaglError(f"{where}: option 'counts' must be a mapping with keys {', '.join(ROLES)}")
    for key, value in given.items():
        if key not in ROLES:
            raise NaglError(f"{where}: option 'counts' has unknown key {key!r}; use {', '.join(ROLES)}")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
            raise NaglError(f"{where}: option 'counts.{key}' is {value!r}; "
                            f"it must be a whole number from 1 to {MAX_COUNT}")
        counts[key] = value
    return Options(preset=preset, categories=categories, counts=counts)


def category(preset: str, name: str) -> Category:
    return PRESETS[preset][name]


def defect_of(cat: Category, index: int) -> tuple[str, int]:
    """The defect type of anomalous image ``index`` and its number within that type.

    Types take turns, so any prefix of the anomalies covers as many types as it can.
    """
    return cat.defects[index % len(cat.defects)], index // len(cat.defects)


def relative_paths(cat: Category, role: str, index: int) -> tuple[str, str | None]:
    """``(image path, mask path or None)`` relative to the dataset folder."""
    if role == "train_good":
        return f"{cat.name}/train/good/{index:03d}.png", None
    if role == "test_good":
        return f"{cat.name}/test/good/{index:03d}.png", None
    defect, number = defect_of(cat, index)
    return (f"{cat.name}/test/{defect}/{number:03d}.png",
            f"{cat.name}/ground_truth/{defect}/{number:03d}_mask.png")


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(int(stable_hash([str(k) for k in key], length=16), 16))


# ---------------------------------------------------------------- sources


def _skimage_data_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


@functools.lru_cache(maxsize=16)
def _source(file: str, work_scale: float,
            tint: tuple[tuple[float, float, float], tuple[float, float, float]] | None) -> np.ndarray:
    """A source photograph as float64 RGB in work pixels (read-only, cached per process)."""
    path = _skimage_data_dir() / file
    if not path.is_file():
        raise NaglError(f"scikit-image data file {path} is missing; the embedded benchmark is built "
                        f"from it: reinstall scikit-image (pip install --force-reinstall scikit-image)")
    with Image.open(path) as image:
        image = image.convert("L" if tint is not None else "RGB")
        if work_scale != 1.0:
            size = (round(image.width * work_scale), round(image.height * work_scale))
            image = image.resize(size, Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.float64)
    if tint is not None:
        dark, light = np.asarray(tint[0], dtype=np.float64), np.asarray(tint[1], dtype=np.float64)
        array = dark + (array[..., None] / 255.0) * (light - dark)
    array.setflags(write=False)
    return array


def _view(cat: Category, source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A jittered square view of the source, resampled to SIZE x SIZE (float64 RGB)."""
    height, width = source.shape[:2]
    cy = (cat.center[0] + rng.uniform(-cat.jitter[0], cat.jitter[0])) * height
    cx = (cat.center[1] + rng.uniform(-cat.jitter[1], cat.jitter[1])) * width
    step = cat.view * (1.0 + rng.uniform(-cat.zoom, cat.zoom)) / SIZE
    angle = np.deg2rad(rng.uniform(-cat.rotate, cat.rotate))
    offsets = (np.arange(SIZE, dtype=np.float64) - (SIZE - 1) / 2) * step
    v, u = np.meshgrid(offsets, offsets, indexing="ij")
    ys = cy + v * np.cos(angle) - u * np.sin(angle)
    xs = cx + v * np.sin(angle) + u * np.cos(angle)
    view = np.stack([ndimage.map_coordinates(source[..., c], [ys, xs], order=1, mode=cat.pad)
                     for c in range(3)], axis=-1)
    if cat.flip and rng.integers(2):
        view = view[:, ::-1]
    return np.ascontiguousarray(view)


def _photometric(cat: Category, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting jitter (gain, gamma, white balance, a soft gradient) and sensor noise -> uint8."""
    gain = 1.0 + rng.uniform(-cat.light, cat.light)
    gamma = 1.0 + rng.uniform(-cat.light, cat.light)
    balance = 1.0 + rng.uniform(-cat.light / 3, cat.light / 3, size=3)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.arange(SIZE) - (SIZE - 1) / 2) / SIZE
    gradient = 1.0 + rng.uniform(0, cat.light) * (ramp[:, None] * np.sin(direction)
                                                   + ramp[None, :] * np.cos(direction))
    image = 255.0 * (np.clip(view, 0, 255) / 255.0) ** gamma
    image = image * gain * balance * gradient[..., None]
    image = image + rng.normal(0.0, rng.uniform(1.0, 2.5), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _normal(cat: Category, rng: np.random.Generator) -> np.ndarray:
    source = _source(cat.source, cat.work_scale, cat.tint)
    return _photometric(cat, _view(cat, source, rng), rng)


def _allowed(cat: Category, clean: np.ndarray) -> np.ndarray | None:
    """Where a defect may sit: on the object, inside the fundus, or (None) anywhere."""
    if cat.foreground is None:
        return None
    gray = ndimage.gaussian_filter(clean.mean(axis=-1), 2.0)
    if cat.foreground == "bright":
        return gray > 110
    if cat.foreground == "fundus":
        return ndimage.binary_erosion(gray > 25, iterations=8)
    raise ValueError(f"unknown foreground rule {cat.foreground!r}")


# ---------------------------------------------------------------- rendering


def render(dataset: str, preset: str, category_name: str, role: str, index: int) -> Rendered:
    """Generate one image of the benchmark; the same arguments always give the same pixels."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    cat = category(preset, category_name)
    key = (dataset, category_name, role, index)
    clean = _normal(cat, _rng(*key, "image"))
    if role != "test_anomalous":
        return Rendered(image=clean, clean=clean, mask=None, defect="good")
    defect, _ = defect_of(cat, index)
    rng = _rng(*key, "defect")
    foreign = None
    if defect == "foreign":
        other = category(preset, cat.foreign_from) if cat.foreign_from else cat
        foreign = _normal(other, _rng(*key, "foreign"))
    context = Context(allowed=_allowed(cat, clean), foreign=foreign,
                      scale=cat.defect_scale, contrast=cat.defect_contrast)
    image, mask = apply_defect(defect, clean, rng, context)
    return Rendered(image=image, clean=clean, mask=mask, defect=defect)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes with fixed settings (no metadata, fixed zlib level), so the bytes are stable."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) array, got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(
        buffer, format="PNG", compress_level=1, optimize=False)
    return buffer.getvalue()


@register_builder("embedded")
def build(spec: DatasetSpec, out_dir: Path) -> None:
    """Write the dataset in the canonical layout into the empty folder ``out_dir``."""
    options = parse_options(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise NaglError(f"{out_dir} is not empty; the embedded builder writes into an empty folder "
                        f"(remove it or choose another)")
    for name in options.categories:
        cat = category(options.preset, name)
        for role in ROLES:
            for index in range(options.counts[role]):
                item = render(spec.name, options.preset, name, role, index)
                image_path, mask_path = relative_paths(cat, role, index)
                atomic_write_bytes(out_dir / image_path, encode_png(item.image))
                if mask_path is not None:
                    atomic_write_bytes(out_dir / mask_path,
                                       encode_png(item.mask.astype(np.uint8) * 255))
