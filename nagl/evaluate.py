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
from nagl.methods.base import anomaly_maps, image_scores, nested_normal_scores, pseudo_mask_count
from nagl.metrics import image_metrics, pixel_metrics
from nagl.models.backbones import Backbone, create_backbone
from nagl.models.cache import FeatureCache
from nagl.paths import cell_dir, model_dir, model_file
from nagl.protocol import ReferenceSplit, draw_reference_split
from nagl.provenance import git_commit, now_utc, package_versions
from nagl.results.aliases import MEASURED_COLUMNS, canonical_cells, canonical_run_id, is_normal_knn_cell, write_alias
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


def _is_finished(folder: Path, settings_hash: str, checkpoint_hash: str | None, alias_of: str | None = None) -> bool:
    """Whether the cell's run.json records these settings (and, for an alias, this canonical cell)."""
    run_file = folder / "run.json"
    if not run_file.is_file():
        return False
    try:
        row = read_json(run_file)
    except (OSError, ValueError):
        return False
    # A cell written before `n_pseudo_masks` or `alias_of` existed lacks a column of `runs`: rerun it.
    return (row.get("config_hash") == settings_hash and row.get("checkpoint_hash") == checkpoint_hash
            and "n_pseudo_masks" in row and "alias_of" in row and row["alias_of"] == alias_of)


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
        # Features and masks of the current category, loaded once per job (cleared per category).
        self._feature_memo: dict[str, torch.Tensor] = {}
        self._mask_memo: dict[tuple[str | None, int], np.ndarray] = {}
        self.computed: list[str] = []  # the job's cell folders it scores, and those recorded as aliases
        self.aliased: list[str] = []

    # -- features and masks ------------------------------------------------------------
    def _features(self, rows: pd.DataFrame) -> torch.Tensor:
        if rows.empty:
            return torch.zeros(0, self.backbone.grid[0] * self.backbone.grid[1], self.backbone.dim)
        new = ~rows["image_sha256"].isin(self._feature_memo.keys())
        if new.any():
            fresh = rows[new].drop_duplicates("image_sha256")
            self.cache.ensure([self.root / p for p in fresh["image_path"]], list(fresh["image_sha256"]),
                              progress=False)
            self._feature_memo.update(zip(fresh["image_sha256"], self.cache.load(list(fresh["image_sha256"])),
                                          strict=True))
        return torch.stack([self._feature_memo[sha] for sha in rows["image_sha256"]])

    def _masks(self, rows: pd.DataFrame, size: int) -> np.ndarray:
        if not len(rows):
            return np.zeros((0, size, size), bool)
        for path in rows["mask_path"]:
            key = (path if isinstance(path, str) else None, size)
            if key not in self._mask_memo:
                self._mask_memo[key] = load_mask(self.root / path if key[0] else None, size)
        return np.stack([self._mask_memo[(p if isinstance(p, str) else None, size)] for p in rows["mask_path"]])

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
        canonical = self._canonical_cells(categories)
        # The gallery setting's cells, and the cells that compute them: a computed cell makes the
        # gallery (of its first category and seed) when it or one of its aliases is a gallery cell.
        gallery_cells = {key for key in canonical if (key.k_normal, key.k_abnormal) == (max_kn, max_ka)}
        gallery_cells |= {canonical[key] for key in gallery_cells}
        self.computed, self.aliased = [], []
        for category in categories:
            self._feature_memo.clear()
            self._mask_memo.clear()
            for seed in sorted(self.config.seeds):
                keys = [CellKey(self.method_name, self.config.backbone, self.source, self.target,
                                category, kn, ka, seed) for kn, ka in settings]
                aliases = {key: canonical_run_id(self.config, canonical[key]) for key in keys if canonical[key] != key}
                todo = [key for key in keys if not _is_finished(key.folder(self.results), self.settings_hash,
                                                                self.checkpoint_hash, aliases.get(key))]
                folders += [str(key.folder(self.results)) for key in keys]
                self.computed += [str(key.folder(self.results)) for key in keys if key not in aliases]
                self.aliased += [str(key.folder(self.results)) for key in aliases]
                if not todo:
                    continue
                split = draw_reference_split(self.manifest, self.target, category, seed, max(max_kn, 1), max_ka)
                gallery = gallery_cells if category == gallery_category and seed == gallery_seed else set()
                self._write_aliases(split, [key for key in todo if key in aliases], aliases, gallery)
                self._evaluate_split(split, [key for key in todo if key not in aliases], gallery)
        return folders

    def _canonical_cells(self, categories: list[str]) -> dict[CellKey, CellKey]:
        """For every cell of the run on this target, the cell that computes it (nagl.results.aliases)."""
        keys = [CellKey(method, self.config.backbone, source, self.target, category, kn, ka, seed)
                for method, source, target in self.config.evaluation_jobs() if target == self.target
                for category in categories for seed in sorted(self.config.seeds)
                for kn, ka in self.config.shots.settings()]
        return canonical_cells(keys, self.config.trainable_methods)

    def _write_aliases(self, split: ReferenceSplit, keys: list[CellKey], aliases: dict[CellKey, str],
                       gallery: set[CellKey]) -> None:
        """Record cells computed by another cell of the run: run.json only, nothing scored."""
        if not keys:
            return
        abnormal_masks = (torch.from_numpy(self._masks(split.abnormal, self.config.image_size))
                          if self.has_masks else None)
        labels = split.queries["label"].to_numpy()
        for key in keys:
            masks = abnormal_masks[:key.k_abnormal] if abnormal_masks is not None else None
            n_pseudo = pseudo_mask_count(masks, key.k_abnormal, self.backbone.grid)
            row = self._run_row(key, split, len(split.queries), int(labels.sum()), 0.0, 0.0, n_pseudo)
            for name in MEASURED_COLUMNS:
                del row[name]  # ingest takes them from the canonical cell
            write_alias(key.folder(self.results), {**row, "alias_of": aliases[key]}, gallery=key in gallery)

    def _evaluate_split(self, split: ReferenceSplit, keys: list[CellKey], gallery: set[CellKey]) -> None:
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
        shared, shared_seconds = self._shared_normal_scores(query_features, normal_features, keys)
        for key in keys:
            start = time.perf_counter()
            masks = abnormal_masks[:key.k_abnormal] if abnormal_masks is not None else None
            from_shared = key.k_normal in shared and is_normal_knn_cell(key.method, key.k_normal, key.k_abnormal)
            if from_shared:
                # The method's own map (nagl.results.aliases), from the split's one search of the normal bank.
                patch_map = (1.0 - shared[key.k_normal]).reshape(-1, *self.backbone.grid)
            else:
                patch_maps = []
                with torch.no_grad():
                    for begin in range(0, len(queries), QUERY_BATCH):
                        patch_maps.append(self.method.score(
                            query_features[begin:begin + QUERY_BATCH], normal_features[:key.k_normal],
                            abnormal_features[:key.k_abnormal], masks, self.backbone.grid))
                patch_map = torch.cat(patch_maps)
            n_pseudo = pseudo_mask_count(masks, key.k_abnormal, self.backbone.grid)
            scores = image_scores(patch_map).numpy().astype(np.float64)
            score_seconds = time.perf_counter() - start + (shared_seconds[key.k_normal] if from_shared else 0.0)
            in_gallery = key in gallery
            # Pixel maps serve the pixel metrics and the gallery only: an image-level target skips them.
            maps = anomaly_maps(patch_map, resolution).numpy() if self.has_masks or in_gallery else None
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

    def _shared_normal_scores(self, query_features: torch.Tensor, normal_features: torch.Tensor,
                              keys: list[CellKey]) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
        """``s_n`` of the queries for every k_normal of the cells whose map is ``1 - s_n``, from one
        search (:func:`nagl.methods.base.nested_normal_scores`), and each cell's share of its time."""
        shots = sorted({key.k_normal for key in keys if is_normal_knn_cell(key.method, key.k_normal, key.k_abnormal)})
        if not shots:
            return {}, {}
        start = time.perf_counter()
        with torch.no_grad():
            scores = nested_normal_scores(query_features.float(), normal_features, shots, chunk=QUERY_BATCH)
        share = (time.perf_counter() - start) / len(shots)
        return scores, dict.fromkeys(shots, share)

    def _run_row(self, key: CellKey, split: ReferenceSplit, n_queries: int, n_anomalous: int,
                 score_seconds: float, eval_seconds: float, n_pseudo_masks: int) -> dict:
        versions = package_versions()
        return {
            "run_id": key.run_id(self.settings_hash), "alias_of": None, **key.__dict__,
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
