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
from nagl.methods import create_method, load_method
from nagl.methods.base import anomaly_maps, image_scores, pseudo_mask_count
from nagl.metrics import image_metrics, pixel_metrics
from nagl.models.backbones import Backbone, create_backbone
from nagl.models.cache import FeatureCache
from nagl.paths import cell_dir, model_dir, model_file
from nagl.protocol import ReferenceCodeSplit, ReferenceSplit, draw_reference_code_split, draw_reference_split
from nagl.provenance import git_commit, now_utc, package_versions
from nagl.reference_checks import centre_square, check_frame, check_row, draw_swapped_references
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
    protocol: str = "clean"

    def folder(self, results: Path) -> Path:
        return cell_dir(results, self.method, self.backbone, self.source, self.target, self.category,
                        self.k_normal, self.k_abnormal, self.seed, self.protocol)

    def run_id(self, settings_hash: str) -> str:
        # A clean cell keeps the run_id it had before protocols existed.
        key = {k: v for k, v in self.__dict__.items() if k != "protocol" or v != "clean"}
        return stable_hash({**key, "settings": settings_hash}, length=20)


def feature_cache(backbone: Backbone) -> FeatureCache:
    return FeatureCache(cache_dir() / "features", backbone)


def _is_finished(folder: Path, settings_hash: str, checkpoint_hash: str | None, with_checks: bool = False) -> bool:
    run_file = folder / "run.json"
    if with_checks and not (folder / "reference_checks.parquet").is_file():
        return False
    if not run_file.is_file():
        return False
    try:
        row = read_json(run_file)
    except (OSError, ValueError):
        return False
    # A cell written before `n_pseudo_masks` or `protocol` existed lacks a column of `runs`: rerun it.
    return (row.get("config_hash") == settings_hash and row.get("checkpoint_hash") == checkpoint_hash
            and "n_pseudo_masks" in row and "protocol" in row)


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
            self.method = create_method(method, dim=self.backbone.dim)
        if hasattr(self.method, "eval"):
            self.method.eval()
        # The method's own settings (its config, and how it was trained), apart from the
        # run-level settings in config_hash.
        self.method_config_hash = stable_hash({"method": self.method.config_hash(),
                                               "training": config.training.as_dict() if self.trainable else None})
        self.target_hash = dataset_content_hash(target)
        self.source_hash = None if source == TRAINING_FREE_SOURCE else dataset_content_hash(source)

    # -- features and masks ------------------------------------------------------------
    def _features(self, rows: pd.DataFrame) -> torch.Tensor:
        if rows.empty:
            return torch.zeros(0, self.backbone.grid[0] * self.backbone.grid[1], self.backbone.dim)
        self.cache.ensure([self.root / p for p in rows["image_path"]], list(rows["image_sha256"]),
                          progress=False)
        return self.cache.load(list(rows["image_sha256"]))

    def _masks(self, rows: pd.DataFrame, size: int) -> np.ndarray:
        return np.stack([load_mask(self.root / p if isinstance(p, str) else None, size)
                         for p in rows["mask_path"]]) if len(rows) else np.zeros((0, size, size), bool)

    # -- one job ----------------------------------------------------------------------
    def run(self) -> list[str]:
        """Evaluate every cell not finished yet; return the job's cell folders."""
        folders = []
        categories = sorted(self.manifest["category"].unique())
        gallery_category = categories[0]
        settings = self.config.shots.settings()
        max_kn = max(self.config.shots.k_normal)
        max_ka = max(self.config.shots.k_abnormal)
        gallery_seed = min(self.config.seeds)
        for category in categories:
            for seed in sorted(self.config.seeds):
                keys = [CellKey(self.method_name, self.config.backbone, self.source, self.target,
                                category, kn, ka, seed) for kn, ka in settings]
                todo = [key for key in keys if not _is_finished(key.folder(self.results), self.settings_hash,
                                                                 self.checkpoint_hash, self._checks_for(key))]
                folders += [str(key.folder(self.results)) for key in keys]
                if todo:
                    split = draw_reference_split(self.manifest, self.target, category, seed, max(max_kn, 1), max_ka)
                    self._evaluate_split(split, todo, gallery=(category == gallery_category and seed == gallery_seed),
                                         gallery_setting=(max_kn, max_ka))
                if "reference-code" in self.config.protocols:
                    folders += self._run_reference_code(category, seed, max(max_kn, 1), max_ka)
        return folders

    def _checks_for(self, key: CellKey) -> bool:
        """Whether the cell gets the reference-use check (nagl.reference_checks)."""
        return (self.config.reference_checks and key.protocol == "clean" and key.k_abnormal > 0
                and self.method.uses_abnormal_references)

    def _run_reference_code(self, category: str, seed: int, max_kn: int, max_ka: int) -> list[str]:
        """The reference-code protocol's cells of one (category, seed): settings with k_abnormal > 0 only."""
        keys = [CellKey(self.method_name, self.config.backbone, self.source, self.target, category, kn, ka, seed,
                        "reference-code") for kn, ka in self.config.shots.settings() if ka > 0]
        todo = [key for key in keys
                if not _is_finished(key.folder(self.results), self.settings_hash, self.checkpoint_hash)]
        if todo:
            code = draw_reference_code_split(self.manifest, self.target, category, seed, max_kn, max_ka)
            self._evaluate_split(code.split, todo, gallery=False, gallery_setting=(max_kn, max_ka), code=code)
        return [str(key.folder(self.results)) for key in keys]

    def _patch_map(self, query_features: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor,
                   masks: torch.Tensor | None) -> torch.Tensor:
        """The method's patch maps of the queries, scored in batches of QUERY_BATCH."""
        patch_maps = []
        with torch.no_grad():
            for begin in range(0, len(query_features), QUERY_BATCH):
                patch_maps.append(self.method.score(query_features[begin:begin + QUERY_BATCH], normal, abnormal,
                                                    masks, self.backbone.grid))
        return torch.cat(patch_maps)

    def _reference_code_map(self, code: ReferenceCodeSplit, key: CellKey, query_features: torch.Tensor,
                            normal: torch.Tensor, abnormal_features: torch.Tensor,
                            abnormal_masks: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Patch maps where each query is scored with the abnormal references of its assigned defect type."""
        per_type = len(next(iter(code.by_type.values())))  # code.split.abnormal: each type's references in turn
        assigned = np.asarray(code.assigned_type)
        patch_map = torch.empty((len(assigned), *self.backbone.grid))
        n_pseudo = 0
        for index, defect in enumerate(code.by_type):
            refs = slice(index * per_type, index * per_type + key.k_abnormal)
            masks = abnormal_masks[refs] if abnormal_masks is not None else None
            n_pseudo += pseudo_mask_count(masks, key.k_abnormal, self.backbone.grid)
            rows = torch.from_numpy(np.flatnonzero(assigned == defect))
            if len(rows):
                patch_map[rows] = self._patch_map(query_features[rows], normal, abnormal_features[refs], masks)
        return patch_map, n_pseudo

    def _swapped_references(self, split: ReferenceSplit, max_ka: int) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(variant, features, masks) of the reference-use check's swapped abnormal references of one split."""
        size = self.config.image_size
        loaded = []
        for swap in draw_swapped_references(self.manifest, split, max_ka):
            if swap.square_mask:
                masks = torch.from_numpy(np.stack([centre_square(size)] * len(swap.rows)))
            else:
                masks = torch.from_numpy(self._masks(swap.rows, size)) if self.has_masks else None
            loaded.append((swap.variant, self._features(swap.rows), masks))
        return loaded

    def _reference_checks(self, key: CellKey, swapped: list[tuple[str, torch.Tensor, torch.Tensor | None]],
                          query_features: torch.Tensor, normal_features: torch.Tensor, labels: np.ndarray,
                          query_masks: np.ndarray | None) -> pd.DataFrame:
        """The cell's rows of ``reference_checks``: its queries and normal references, abnormal ones swapped."""
        rows = []
        for variant, features, masks in swapped:
            if len(features) < key.k_abnormal:
                continue  # too few candidates for this many references: no row
            patch_map = self._patch_map(query_features, normal_features[:key.k_normal], features[:key.k_abnormal],
                                        masks[:key.k_abnormal] if masks is not None else None)
            row = check_row(variant, labels, patch_map, query_masks, self.config.eval_resolution)
            if row is not None:
                rows.append(row)
        return check_frame(rows)

    def _evaluate_split(self, split: ReferenceSplit, keys: list[CellKey], gallery: bool,
                        gallery_setting: tuple[int, int], code: ReferenceCodeSplit | None = None) -> None:
        size = self.config.image_size
        resolution = self.config.eval_resolution
        queries = split.queries
        query_features = self._features(queries)
        normal_features = self._features(split.normal)
        abnormal_features = self._features(split.abnormal)
        abnormal_masks = torch.from_numpy(self._masks(split.abnormal, size)) if self.has_masks else None
        labels = queries["label"].to_numpy()
        query_masks = self._masks(queries, resolution) if self.has_masks else None
        split_json = split.to_json() if code is None else code.to_json()
        checked = [key for key in keys if self._checks_for(key)]
        swapped = self._swapped_references(split, max(k.k_abnormal for k in checked)) if checked else []
        for key in keys:
            start = time.perf_counter()
            if code is None:
                masks = abnormal_masks[:key.k_abnormal] if abnormal_masks is not None else None
                patch_map = self._patch_map(query_features, normal_features[:key.k_normal],
                                            abnormal_features[:key.k_abnormal], masks)
                n_pseudo = pseudo_mask_count(masks, key.k_abnormal, self.backbone.grid)
            else:
                patch_map, n_pseudo = self._reference_code_map(code, key, query_features, normal_features[:key.k_normal],
                                                               abnormal_features, abnormal_masks)
            scores = image_scores(patch_map).numpy().astype(np.float64)
            score_seconds = time.perf_counter() - start
            in_gallery = gallery and (key.k_normal, key.k_abnormal) == gallery_setting
            # Pixel maps serve the pixel metrics and the gallery only: an image-level target skips them.
            maps = anomaly_maps(patch_map, resolution).numpy() if self.has_masks or in_gallery else None
            metrics = {"image": image_metrics(labels, scores),
                       "pixel": (pixel_metrics(query_masks, maps) if self.has_masks
                                 else {"auroc": None, "ap": None, "f1max": None, "aupro": None})}
            scores_frame = pd.DataFrame({"image_path": queries["image_path"],
                                         "defect_type": queries["defect_type"],
                                         "label": labels.astype(int), "score": scores})
            gallery_frame = _gallery(queries, self.root, maps, self.has_masks) if in_gallery else None
            eval_seconds = time.perf_counter() - start  # the check below is not the cell's evaluation time
            checks = (self._reference_checks(key, swapped, query_features, normal_features, labels, query_masks)
                      if key in checked else None)
            write_cell(key.folder(self.results), self._run_row(key, split, len(queries), int(labels.sum()),
                                                               score_seconds, eval_seconds, n_pseudo),
                       metrics, scores_frame, split_json, gallery_frame, checks)

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


def evaluate_job(config: RunConfig, method: str, source: str, target: str) -> list[str]:
    return Evaluator(config, method, source, target, Path(config.results)).run()
