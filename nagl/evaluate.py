"""One evaluation job: a (method, source, target) over every category, shot setting and seed.

For each (category, seed) the reference split is drawn once (``nagl.protocol``);
every shot setting at that seed is scored on the same queries. Each cell is
written to its own folder with ``run.json`` last; a cell whose ``run.json``
records the current settings hash (and checkpoint) is skipped, so a killed job
resumes where it stopped.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from nagl.config import TRAINING_FREE_SOURCE, RunConfig, cell_settings_hash, is_trainable
from nagl.data.images import load_mask, load_rgb
from nagl.data.layout import read_manifest
from nagl.data.prepare import dataset_content_hash, dataset_path
from nagl.errors import NaglError
from nagl.heatmap import heat_rgb
from nagl.io import read_json, stable_hash
from nagl.methods import Method, create_method, load_method, method_class
from nagl.methods.base import anomaly_maps, pseudo_mask_count
from nagl.metrics import image_metrics, pixel_metrics
from nagl.models.backbones import Backbone, create_backbone
from nagl.models.cache import FeatureCache
from nagl.paths import cell_dir, model_dir, model_file
from nagl.protocol import ReferenceSplit, draw_reference_split
from nagl.provenance import git_commit, now_utc, package_versions
from nagl.results.cell import write_cell
from nagl.settings import cache_dir

QUERY_BATCH = 8
GALLERY_QUERIES = 3
GALLERY_SIZE = 128


@dataclass(frozen=True)
class CellKey:
    method: str
    backbone: str
    source: str
    target: str
    category: str
    k_normal: int
    k_abnormal: int
    seed: int

    def folder(self, results: Path) -> Path:
        return cell_dir(results, self.method, self.backbone, self.source, self.target, self.category,
                        self.k_normal, self.k_abnormal, self.seed)

    def run_id(self, settings_hash: str) -> str:
        return stable_hash({**self.__dict__, "settings": settings_hash}, length=20)


def feature_cache(backbone: Backbone) -> FeatureCache:
    return FeatureCache(cache_dir() / "features", backbone)


def _is_finished(folder: Path, settings_hash: str, checkpoint_hash: str | None) -> bool:
    run_file = folder / "run.json"
    if not run_file.is_file():
        return False
    try:
        row = read_json(run_file)
    except (OSError, ValueError):
        return False
    # A cell written before `n_pseudo_masks` existed lacks a column of `runs`: rerun it.
    return (row.get("config_hash") == settings_hash and row.get("checkpoint_hash") == checkpoint_hash
            and "n_pseudo_masks" in row)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def heat_png(values: np.ndarray, low: float, high: float) -> bytes:
    """A map rendered with the colour ramp, scaled to [low, high], as PNG."""
    return _png(heat_rgb(values, low, high))


def _gallery(queries: pd.DataFrame, root: Path, maps: np.ndarray, has_masks: bool) -> pd.DataFrame:
    """A few anomalous queries (and one normal) with mask and map, as small PNGs."""
    picks = list(np.flatnonzero(queries["label"].to_numpy() == 1)[:GALLERY_QUERIES - 1])
    picks += list(np.flatnonzero(queries["label"].to_numpy() == 0)[:1])
    low, high = float(maps.min()), float(maps.max())
    rows = []
    for index in picks:
        row = queries.iloc[index]
        image = Image.fromarray(load_rgb(root / row["image_path"])).resize((GALLERY_SIZE, GALLERY_SIZE),
                                                                          Image.BILINEAR)
        mask = None
        if has_masks:
            mask_path = root / row["mask_path"] if row["mask_path"] else None
            mask = _png(load_mask(mask_path, GALLERY_SIZE).astype(np.uint8) * 255)
        small = torch.nn.functional.interpolate(torch.from_numpy(maps[index])[None, None],
                                                size=(GALLERY_SIZE, GALLERY_SIZE), mode="bilinear",
                                                align_corners=False)[0, 0].numpy()
        rows.append({"image_path": row["image_path"], "label": int(row["label"]),
                     "image_png": _png(np.asarray(image)), "mask_png": mask,
                     "map_png": heat_png(small, low, high)})
    return pd.DataFrame(rows, columns=["image_path", "label", "image_png", "mask_png", "map_png"])


class Evaluator:
    """Scores the cells of one (method, source, target) job."""

    def __init__(self, config: RunConfig, method: str, source: str, target: str, results: Path):
        self.config = config
        self.method_name = method
        self.source = source
        self.target = target
        self.results = results
        self.trainable = is_trainable(method)
        if self.trainable == (source == TRAINING_FREE_SOURCE):
            raise NaglError(f"method {method!r} is {'trainable' if self.trainable else 'training-free'}: "
                            f"its source must be {'a source dataset' if self.trainable else repr(TRAINING_FREE_SOURCE)}, "
                            f"not {source!r}")
        self.backbone = create_backbone(config.backbone, config.image_size)
        self.cache = feature_cache(self.backbone)
        self.root = dataset_path(target)
        self.manifest = read_manifest(self.root)
        self.has_masks = bool(self.manifest["mask_path"].notna().any())
        self.settings_hash = cell_settings_hash(config, method)
        self.checkpoint_hash = None
        self.train_seconds = None
        if self.trainable:
            folder = model_dir(results, method, config.backbone, source)
            model_json = model_file(results, method, config.backbone, source)
            if not model_json.is_file():
                raise NaglError(f"{model_json} not found: train {method} on {source} first "
                                f"(the workflow's train rule, or `nagl train`)")
            self.method = load_method(folder)
            info = read_json(model_json)
            self.checkpoint_hash = info.get("checkpoint_hash")
            self.train_seconds = info.get("train_seconds")
        else:
            self.method = create_method(method, dim=self.backbone.dim,
                                        **method_class(method).config_for_backbone(self.backbone))
        self.levels = type(self.method).feature_levels(self.backbone)  # empty: the default grid
        if self.levels:
            self._check_level_shapes()
        if hasattr(self.method, "eval"):
            self.method.eval()
        # The method's own settings (its config, and how it was trained), apart from the
        # run-level settings in config_hash.
        self.method_config_hash = stable_hash({"method": self.method.config_hash(),
                                               "training": config.training.as_dict() if self.trainable else None})
        self.target_hash = dataset_content_hash(target)
        self.source_hash = None if source == TRAINING_FREE_SOURCE else dataset_content_hash(source)

    def _check_level_shapes(self) -> None:
        """A multi-level checkpoint must have been trained for this backbone's levels."""
        expected = type(self.method).config_for_backbone(self.backbone)
        for key, value in expected.items():
            if key in self.method.config and self.method.config[key] != value:
                raise NaglError(f"method {self.method_name!r} ({self.source}) was built for {key} = "
                                f"{self.method.config[key]}, but backbone {self.config.backbone!r} at "
                                f"image_size {self.config.image_size} gives {value}; retrain it for this backbone")

    # -- features and masks ------------------------------------------------------------
    def _features(self, rows: pd.DataFrame) -> torch.Tensor | dict[str, torch.Tensor]:
        """The default grid ``(n, G, C)``, or for a multi-level method ``{level: (n, G_l, C_l)}``."""
        if rows.empty:
            if self.levels:
                return {name: torch.zeros(0, *self.backbone.level_shape(name)) for name in self.levels}
            return torch.zeros(0, self.backbone.grid[0] * self.backbone.grid[1], self.backbone.dim)
        self.cache.ensure([self.root / p for p in rows["image_path"]], list(rows["image_sha256"]),
                          progress=False, levels=self.levels)
        if self.levels:
            return self.cache.load_levels(list(rows["image_sha256"]), self.levels)
        return self.cache.load(list(rows["image_sha256"]))

    def shot_settings(self) -> list[tuple[int, int]]:
        """The config's shot settings this method is evaluated in: all of them, or for a method
        that uses no abnormal references only those with ``k_abnormal = 0``."""
        settings = self.config.shots.settings()
        if self.method.uses_abnormal_refs:
            return settings
        kept = [(kn, ka) for kn, ka in settings if ka == 0]
        if not kept:
            raise NaglError(f"method {self.method_name!r} uses normal references only: the config's shots need "
                            f"k_abnormal 0 and a k_normal >= 1 (shots.k_normal {list(self.config.shots.k_normal)}, "
                            f"shots.k_abnormal {list(self.config.shots.k_abnormal)})")
        return kept

    def _masks(self, rows: pd.DataFrame, size: int) -> np.ndarray:
        return np.stack([load_mask(self.root / p if isinstance(p, str) else None, size)
                         for p in rows["mask_path"]]) if len(rows) else np.zeros((0, size, size), bool)

    # -- one job ----------------------------------------------------------------------
    def run(self) -> list[str]:
        """Evaluate every cell not finished yet; return the job's cell folders."""
        folders = []
        categories = sorted(self.manifest["category"].unique())
        gallery_category = categories[0]
        settings = self.shot_settings()
        max_kn = max(self.config.shots.k_normal)
        max_ka = max(self.config.shots.k_abnormal)
        gallery_setting = (max(kn for kn, _ in settings), max(ka for _, ka in settings))
        gallery_seed = min(self.config.seeds)
        for category in categories:
            for seed in sorted(self.config.seeds):
                keys = [CellKey(self.method_name, self.config.backbone, self.source, self.target,
                                category, kn, ka, seed) for kn, ka in settings]
                todo = [key for key in keys
                        if not _is_finished(key.folder(self.results), self.settings_hash, self.checkpoint_hash)]
                folders += [str(key.folder(self.results)) for key in keys]
                if not todo:
                    continue
                split = draw_reference_split(self.manifest, self.target, category, seed, max(max_kn, 1), max_ka)
                self._evaluate_split(split, todo, gallery=(category == gallery_category and seed == gallery_seed),
                                     gallery_setting=gallery_setting)
        return folders

    def _evaluate_split(self, split: ReferenceSplit, keys: list[CellKey], gallery: bool,
                        gallery_setting: tuple[int, int]) -> None:
        size = self.config.image_size
        resolution = self.config.eval_resolution
        queries = split.queries
        query_features = self._features(queries)
        normal_features = self._features(split.normal)
        abnormal_features = self._features(split.abnormal)
        abnormal_masks = torch.from_numpy(self._masks(split.abnormal, size)) if self.has_masks else None
        labels = queries["label"].to_numpy()
        query_masks = self._masks(queries, resolution) if self.has_masks else None
        split_json = split.to_json()
        for key in keys:
            if not self.method.uses_abnormal_refs and key.k_normal == 0:
                raise NaglError(f"method {self.method_name!r} uses normal references only; k_normal = 0 "
                                f"cannot be scored (cell {key})")
            start = time.perf_counter()
            masks = abnormal_masks[:key.k_abnormal] if abnormal_masks is not None else None
            patch_maps, image_parts = [], []
            with torch.no_grad():
                for begin in range(0, len(queries), QUERY_BATCH):
                    patch, image = score_batch(
                        self.method, self.backbone, _rows(query_features, begin, begin + QUERY_BATCH),
                        _rows(normal_features, 0, key.k_normal), _rows(abnormal_features, 0, key.k_abnormal),
                        masks, split.category)
                    patch_maps.append(patch)
                    image_parts.append(image)
            patch_map = torch.cat(patch_maps)
            n_pseudo = pseudo_mask_count(masks, key.k_abnormal, self.backbone.grid)
            image_score, pixel_maps = final_image_scores(self.method, patch_map, image_parts, resolution)
            scores = image_score.numpy().astype(np.float64)
            score_seconds = time.perf_counter() - start
            in_gallery = gallery and (key.k_normal, key.k_abnormal) == gallery_setting
            # Pixel maps serve the pixel metrics and the gallery only: an image-level target skips them.
            maps = None
            if self.has_masks or in_gallery:
                maps = (pixel_maps if pixel_maps is not None else anomaly_maps(patch_map, resolution)).numpy()
            metrics = {"image": image_metrics(labels, scores),
                       "pixel": (pixel_metrics(query_masks, maps) if self.has_masks
                                 else {"auroc": None, "ap": None, "f1max": None, "aupro": None})}
            scores_frame = pd.DataFrame({"image_path": queries["image_path"],
                                         "defect_type": queries["defect_type"],
                                         "label": labels.astype(int), "score": scores})
            gallery_frame = _gallery(queries, self.root, maps, self.has_masks) if in_gallery else None
            write_cell(key.folder(self.results), self._run_row(key, split, len(queries), int(labels.sum()),
                                                               score_seconds, time.perf_counter() - start,
                                                               n_pseudo),
                       metrics, scores_frame, split_json, gallery_frame)

    def _run_row(self, key: CellKey, split: ReferenceSplit, n_queries: int, n_anomalous: int,
                 score_seconds: float, eval_seconds: float, n_pseudo_masks: int) -> dict:
        versions = package_versions()
        return {
            "run_id": key.run_id(self.settings_hash), **key.__dict__,
            "backbone_identity": self.backbone.identity,
            "in_domain": key.source == key.target,
            "image_size": self.config.image_size, "eval_resolution": self.config.eval_resolution,
            "n_queries": n_queries, "n_anomalous_queries": n_anomalous, "n_pseudo_masks": n_pseudo_masks,
            "config_hash": self.settings_hash, "method_config_hash": self.method_config_hash,
            "checkpoint_hash": self.checkpoint_hash,
            "source_dataset_hash": self.source_hash, "target_dataset_hash": self.target_hash,
            "split_hash": split.hash, "git_commit": git_commit(),
            "nagl_version": versions["nagl"], "torch_version": versions["torch"],
            "python_version": versions["python"],
            "train_seconds": self.train_seconds, "eval_seconds": eval_seconds,
            "images_per_second": n_queries / max(score_seconds, 1e-9),
            "created_at": now_utc(),
        }


@torch.no_grad()
def score_batch(method: Method, backbone: Backbone, query, normal, abnormal, masks,
                category: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(patch_maps, image_scores or None)`` of one batch of queries: the default grid's tensors
    and grid, or for a multi-level method dicts of levels, their grids and the category."""
    if method.level_group is None:
        return method.score(query, normal, abnormal, masks, backbone.grid), None
    grids = {name: backbone.levels[name][0] for name in query if name in backbone.levels}
    out = method.score(query, normal, abnormal, masks, grids, category=category)
    return out if isinstance(out, tuple) else (out, None)


@torch.no_grad()
def final_image_scores(method: Method, patch_maps: torch.Tensor, parts: list[torch.Tensor | None],
                       resolution: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(image scores (Q,), pixel maps or None)``: the scores the method returned with its patch
    maps (``parts``, one per batch), else its ``image_scores`` hook, given the pixel maps when it
    asks for them."""
    if parts and all(part is not None for part in parts):
        return torch.cat(parts), None
    pixel_maps = anomaly_maps(patch_maps, resolution) if method.image_scores_need_pixels else None
    return method.image_scores(patch_maps, pixel_maps), pixel_maps


def _rows(features: torch.Tensor | dict[str, torch.Tensor], begin: int, end: int):
    """Rows ``begin:end`` of a features tensor, or of every level of a dict of levels."""
    if isinstance(features, dict):
        return {name: tensor[begin:end] for name, tensor in features.items()}
    return features[begin:end]


def evaluate_job(config: RunConfig, method: str, source: str, target: str) -> list[str]:
    return Evaluator(config, method, source, target, Path(config.results)).run()
