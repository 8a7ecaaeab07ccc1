"""scikit-learn's handwritten digits as a semantic one-vs-all dataset (builder kind ``sklearn-digits``), offline.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 digits (values 0-16, about
180 per class; the UCI "Optical Recognition of Handwritten Digits" test set).
Following InCTRL's MNIST one-vs-all protocol, category ``digit-<c>`` has class
``c`` as normal and every other class as anomalous:

- the images of class ``c`` are split by :func:`~nagl.data.builders.subsets.split_normals`
  (test = ceil(25 %), seeded) into train/good and test/good (the release has no
  train/test split of its own);
- every image of another class ``k`` -> test/digit-<k>.

Upsampling (one fixed way): values scaled to 0-255 (``round(v * 255 / 16)``), then
Pillow bilinear resize from 8x8 to ``size`` x ``size`` (default 64), grey PNG.
File names are the image's index in ``load_digits``: ``<index:04d>.png``, so the
same image has the same bytes (and cached features) in every category.
Image-level labels only. Options: ``seed`` (default 0), ``size``, ``max_images``
(per category, see ``subsets.read_caps``) and ``max_categories`` (keep that many
categories, drawn by ``subsets.capped`` with stream 30: a seeded subset, never hand-picked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nagl.data import layout
from nagl.data.builders.subsets import capped, read_caps, read_seed, split_normals
from nagl.data.registry import DatasetSpec, register_builder
from nagl.errors import NaglError

CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)  # load_digits, classes 0-9
DEFAULT_SIZE = 64


def digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, size, size) uint8, labels (N,))`` of ``load_digits``, upsampled as documented above."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = tuple(int(n) for n in np.bincount(digits.target, minlength=10))
    if counts != CLASS_COUNTS:
        raise NaglError(f"sklearn.datasets.load_digits has class counts {counts}, expected {CLASS_COUNTS}; "
                        f"this scikit-learn ships another version of the digits")
    scaled = np.rint(digits.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
                       for image in scaled])
    return images, digits.target.astype(int)


@register_builder("sklearn-digits")
def build_digits(spec: DatasetSpec, out_dir: Path) -> None:
    where = f"dataset {spec.name!r} (config/datasets.yaml)"
    seed, caps = read_seed(spec.options, where), read_caps(spec.options, where)
    size = spec.options.get("size", DEFAULT_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1024:
        raise NaglError(f"{where}: option 'size' must be an integer between 8 and 1024, got {size!r}")
    max_categories = spec.options.get("max_categories")
    if max_categories is not None and (isinstance(max_categories, bool) or not isinstance(max_categories, int)
                                       or not 1 <= max_categories <= 10):
        raise NaglError(f"{where}: option 'max_categories' must be an integer from 1 to 10, got {max_categories!r}")
    images, labels = digit_images(size)
    for normal_class in capped(list(range(10)), max_categories, seed, 30):
        category = Path(out_dir) / f"digit-{normal_class}"
        train, test = split_normals(np.flatnonzero(labels == normal_class).tolist(), seed)
        anomalous = np.flatnonzero(labels != normal_class).tolist()
        # The streams differ per category so that the capped subsets are not the same indices everywhere.
        stream = 3 * normal_class
        picks = [(capped(train, caps["train_good"], seed, stream), layout.TRAIN),
                 (capped(test, caps["test_good"], seed, stream + 1), layout.TEST),
                 (capped(anomalous, caps["test_anomalous"], seed, stream + 2), layout.TEST)]
        for indices, split in picks:
            for index in indices:
                folder = layout.GOOD if labels[index] == normal_class else f"digit-{labels[index]}"
                path = category / split / folder / f"{index:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[index]).save(path)
