"""Reading images and masks of a prepared dataset.

Prepared datasets hold 8-bit RGB images and 8-bit single-channel masks (see
``nagl.data.layout``); these readers resize them for a backbone or for metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nagl.data.layout import UNREADABLE_IMAGE
from nagl.errors import NaglError


def load_rgb(path: str | Path) -> np.ndarray:
    """An image as ``HxWx3`` uint8 RGB."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except UNREADABLE_IMAGE as error:
        raise NaglError(f"cannot read image {path}: {error}; replace or remove the file") from error


def load_mask(path: str | Path | None, size: int | tuple[int, int]) -> np.ndarray:
    """A mask as a boolean array of ``size`` (nearest resize); all False if ``path`` is None.

    ``size`` is an int for a square, or ``(height, width)``.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if path is None:
        return np.zeros((height, width), dtype=bool)
    try:
        with Image.open(path) as mask:
            mask = mask.convert("L")
            if mask.size != (width, height):
                mask = mask.resize((width, height), Image.NEAREST)
            return np.asarray(mask) > 0
    except UNREADABLE_IMAGE as error:
        raise NaglError(f"cannot read mask {path}: {error}; replace or remove the file") from error
