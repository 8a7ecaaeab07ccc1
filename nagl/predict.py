"""`nagl predict`: score a folder of images against a few reference images.

What an inspection engineer runs on their own pictures: a folder of images to
check, a folder of normal references, optionally a folder of abnormal references
and their masks, and (for NAGL with abnormal references) a checkpoint from
`nagl train`. Writes ``scores.csv`` (``file, score``; higher = more anomalous),
one heat-map overlay PNG per image in ``maps/``, and ``predict.json`` (what was
run). Folders are read flat (no sub-folders); files are matched by name stem.

A mask belongs to the abnormal image with the same stem (``<stem>.png`` or
``<stem>_mask.png``); an abnormal image without a mask gets the documented
pseudo-mask (``docs/methods.md``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from nagl.data.images import load_mask, load_rgb
from nagl.errors import NaglError
from nagl.heatmap import heat_rgb
from nagl.io import atomic_path, atomic_write_json, atomic_write_text
from nagl.methods import create_method, load_method, method_class
from nagl.methods.base import anomaly_maps, image_scores, read_checkpoint_config
from nagl.models.backbones import Backbone, create_backbone

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_BACKBONE = "effnet-lite0"
OVERLAY_ALPHA = 0.5
# A dark-to-bright ramp (black, purple, red, orange, pale yellow) for the heat maps.


@dataclass
class PredictResult:
    scores: pd.DataFrame  # file, score
    csv: Path
    maps: Path
    method: str
    backbone_identity: str
    seconds: float


def list_images(folder: str | Path, what: str) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; a NaglError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NaglError(f"{what} folder {folder} does not exist or is not a folder; pass a folder of images")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise NaglError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                        f"put the images there or pass another folder")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise NaglError(f"{what} folder {folder}: {stems[path.stem].name} and {path.name} share the "
                            f"name {path.stem!r}; rename one (outputs and masks are matched by name)")
        stems[path.stem] = path
    return files


def match_masks(images: Sequence[Path], mask_folder: str | Path) -> list[Path | None]:
    """The mask of each abnormal image (``<stem>.png`` or ``<stem>_mask.png``), or None.

    A mask file that matches no image is an error: it usually means a misnamed file.
    """
    masks = list_images(mask_folder, "abnormal-masks")
    by_stem = {p.stem: p for p in images}
    found: dict[str, Path] = {}
    for mask in masks:
        stem = mask.stem
        if stem not in by_stem and stem.endswith("_mask"):
            stem = stem[: -len("_mask")]
        if stem not in by_stem:
            raise NaglError(f"mask {mask} has no abnormal image named {stem!r} in "
                            f"{Path(images[0]).parent}; name masks <image stem>.png or "
                            f"<image stem>_mask.png, or remove it")
        if stem in found:
            raise NaglError(f"abnormal image {by_stem[stem].name} has two masks: {found[stem].name} "
                            f"and {mask.name}; keep one")
        found[stem] = mask
    return [found.get(p.stem) for p in images]


def _image_size_of(identity: str) -> int | None:
    match = re.search(r"@(\d+):", identity or "")
    return int(match.group(1)) if match else None


def resolve_model(checkpoint: str | Path | None, method: str | None, backbone: str | None,
                  k_abnormal: int) -> tuple[str, Backbone, object]:
    """``(method name, backbone, method)`` from the options, checked against the checkpoint."""
    if checkpoint is None:
        name = method or "nagl"
        if method_class(name).trainable and k_abnormal:
            raise NaglError(f"{name} with abnormal references needs a trained model: pass --checkpoint "
                            "(made by `nagl train`), or use --method knn-naive / knn-normal")
        chosen = create_backbone(backbone or DEFAULT_BACKBONE)
        return name, chosen, create_method(name, chosen.dim)
    info = read_checkpoint_config(checkpoint)
    if method and method != info["method"]:
        raise NaglError(f"checkpoint {checkpoint} holds a {info['method']!r} model, not {method!r}; "
                        f"drop --method or pass a {method} checkpoint")
    trained_on = info.get("backbone")
    if not trained_on:
        raise NaglError(f"checkpoint {checkpoint} does not record its backbone; retrain it with `nagl train`")
    if backbone and backbone != trained_on:
        raise NaglError(f"checkpoint {checkpoint} was made for backbone {trained_on!r}, not {backbone!r}; "
                        f"drop --backbone or pass a checkpoint trained on {backbone}")
    chosen = create_backbone(trained_on, _image_size_of(info.get("backbone_identity", "")))
    if info.get("backbone_identity") and info["backbone_identity"] != chosen.identity:
        raise NaglError(f"checkpoint {checkpoint} was made for backbone {info['backbone_identity']}, but "
                        f"this installation gives {chosen.identity} (other weights or input size); "
                        f"retrain with `nagl train` or install the original weights")
    if int(info["dim"]) != chosen.dim:
        raise NaglError(f"checkpoint {checkpoint} expects features of width {info['dim']}, backbone "
                        f"{chosen.identity} gives {chosen.dim}; use the checkpoint's backbone")
    return info["method"], chosen, load_method(checkpoint)


def overlay(image: np.ndarray, heat_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """The heat map, resized to the image, blended over it (uint8 RGB)."""
    height, width = image.shape[:2]
    resized = np.asarray(Image.fromarray(heat_map.astype(np.float32), "F").resize((width, height),
                                                                                  Image.BILINEAR))
    blended = (1 - OVERLAY_ALPHA) * image.astype(float) + OVERLAY_ALPHA * heat_rgb(resized, low, high)
    return blended.round().clip(0, 255).astype(np.uint8)


def _features(backbone: Backbone, files: Sequence[Path], batch_size: int, bar, task) -> torch.Tensor:
    g = backbone.grid[0] * backbone.grid[1]
    parts = [torch.zeros((0, g, backbone.dim))]
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        parts.append(backbone(torch.stack([backbone.preprocess(load_rgb(p)) for p in chunk])))
        bar.update(task, advance=len(chunk))
    return torch.cat(parts)


def predict_folder(images: str | Path, normal: str | Path | None, out: str | Path, *,
                   abnormal: str | Path | None = None, abnormal_masks: str | Path | None = None,
                   checkpoint: str | Path | None = None, method: str | None = None,
                   backbone: str | None = None, batch_size: int = 8, progress: bool = True) -> PredictResult:
    """Score every image in ``images``; write ``scores.csv``, ``maps/*.png`` and ``predict.json`` to ``out``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    start = time.perf_counter()
    queries = list_images(images, "images")
    normals = list_images(normal, "normal") if normal is not None else []
    abnormals = list_images(abnormal, "abnormal") if abnormal is not None else []
    if abnormal_masks is not None and abnormal is None:
        raise NaglError("--abnormal-masks was given without --abnormal; pass the abnormal images too")
    masks = match_masks(abnormals, abnormal_masks) if abnormal_masks is not None else [None] * len(abnormals)
    if not normals and not abnormals:
        raise NaglError("no references: pass --normal (and/or --abnormal) with at least one image")
    name, chosen, model = resolve_model(checkpoint, method, backbone, len(abnormals))

    total = len(queries) + len(normals) + len(abnormals)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task(f"features {chosen.name}", total=total)
        normal_f = _features(chosen, normals, batch_size, bar, task)
        abnormal_f = _features(chosen, abnormals, batch_size, bar, task)
        size = chosen.image_size
        mask_t = [None if m is None else torch.from_numpy(load_mask(m, size)) for m in masks]
        patch_maps = []
        for begin in range(0, len(queries), batch_size):
            chunk = queries[begin:begin + batch_size]
            query_f = _features(chosen, chunk, batch_size, bar, task)
            patch_maps.append(model.score(query_f, normal_f, abnormal_f, mask_t, chosen.grid))
    patch_map = torch.cat(patch_maps)
    scores = image_scores(patch_map).numpy().astype(float)
    maps = anomaly_maps(patch_map, chosen.image_size).numpy()
    low, high = float(maps.min()), float(maps.max())

    out = Path(out)
    map_dir = out / "maps"
    map_dir.mkdir(parents=True, exist_ok=True)
    for path, heat_map in zip(queries, maps, strict=False):
        with atomic_path(map_dir / f"{path.stem}.png") as tmp:
            Image.fromarray(overlay(load_rgb(path), heat_map, low, high)).save(tmp, format="PNG")
    frame = pd.DataFrame({"file": [p.name for p in queries], "score": scores})
    atomic_write_text(out / "scores.csv", frame.to_csv(index=False, float_format="%.6f"))
    seconds = time.perf_counter() - start
    atomic_write_json(out / "predict.json", {
        "method": name, "checkpoint": str(checkpoint) if checkpoint else None,
        "backbone_identity": chosen.identity, "images": str(images),
        "normal": [str(p) for p in normals], "abnormal": [str(p) for p in abnormals],
        "abnormal_masks": [str(m) if m else None for m in masks],
        "map_range": [low, high], "seconds": seconds,
    })
    return PredictResult(frame, out / "scores.csv", map_dir, name, chosen.identity, seconds)
