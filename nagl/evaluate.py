"""One evaluation job: a (method, source, training seed, target) over every category, shot setting and seed.

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
from nagl.data.unions import source_content_hash
from nagl.errors import NaglError
from nagl.heatmap import heat_rgb
from nagl.io import read_json, stable_hash
from nagl.methods import create_method, load_method, method_class
from nagl.methods.base import NormalSide, anomaly_maps, final_image_scores, pseudo_mask_count, score_batch
from nagl.metrics import image_metrics, pixel_metrics
from nagl.models.backbones import Backbone, DescribedBackbone, create_backbone
from nagl.models.cache import FeatureCache
from nagl.paths import cell_dir, feature_stamp, model_dir, model_file
from nagl.protocol import ReferenceCodeSplit, ReferenceSplit, draw_reference_code_split, draw_reference_split
from nagl.provenance import git_commit, now_utc, package_versions
from nagl.reference_checks import centre_square, check_frame, check_row, draw_swapped_references
from nagl.results.aliases import MEASURED_COLUMNS, canonical_cells, canonical_run_id, write_alias
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
    train_seed: int | None  # the checkpoint's training seed; None for a training-free method
    protocol: str = "clean"

    def folder(self, results: Path) -> Path:
        return cell_dir(results, self.method, self.backbone, self.source, self.target, self.category,
                        self.k_normal, self.k_abnormal, self.seed, self.train_seed, self.protocol)

    def run_id(self, settings_hash: str) -> str:
        # A clean cell keeps the run_id it had before protocols existed.
        key = {k: v for k, v in self.__dict__.items() if k != "protocol" or v != "clean"}
        return stable_hash({**key, "settings": settings_hash}, length=20)


def evaluation_backbone(config: RunConfig, results: Path, target: str) -> Backbone | DescribedBackbone:
    """The backbone as the target's features step described it (its stamp), so an evaluation job
    neither imports timm nor loads weights; the network itself without a stamp."""
    stamp = feature_stamp(results, config.backbone, target)
    if stamp.is_file():
        try:
            description = read_json(stamp).get("backbone")
        except (OSError, ValueError):
            description = None
        if (isinstance(description, dict) and description.get("name") == config.backbone
                and description.get("image_size") == config.image_size):
            return DescribedBackbone(description)
    return create_backbone(config.backbone, config.image_size)


def feature_cache(backbone: Backbone) -> FeatureCache:
    return FeatureCache(cache_dir() / "features", backbone)


def _is_finished(folder: Path, settings_hash: str, checkpoint_hash: str | None, with_checks: bool = False,
                 alias_of: str | None = None) -> bool:
    """Whether the cell's run.json records these settings (for an alias: this canonical cell; with
    ``with_checks``: its reference-use check is written too)."""
    run_file = folder / "run.json"
    if with_checks and not (folder / "reference_checks.parquet").is_file():
        return False
    if not run_file.is_file():
        return False
    try:
        row = read_json(run_file)
    except (OSError, ValueError):
        return False
    # A cell written before a column of `runs` existed lacks it: rerun it.
    return (row.get("config_hash") == settings_hash and row.get("checkpoint_hash") == checkpoint_hash
            and all(name in row for name in ("n_pseudo_masks", "source_datasets", "protocol", "alias_of"))
            and row["alias_of"] == alias_of)


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
    """Scores the cells of one (method, source, training seed, target) job."""

    def __init__(self, config: RunConfig, method: str, source: str, target: str, results: Path,
                 train_seed: int | None = None):
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
        if self.trainable == (train_seed is None):
            raise NaglError(f"method {method!r}: a trained method's job needs its checkpoint's training seed, "
                            f"a training-free method's none (got {train_seed!r})")
        self.train_seed = train_seed
        self.backbone = evaluation_backbone(config, results, target)
        self.cache = feature_cache(self.backbone)
        self.root = dataset_path(target)
        self.manifest = read_manifest(self.root)
        self.has_masks = bool(self.manifest["mask_path"].notna().any())
        self.settings_hash = cell_settings_hash(config, method)
        self.checkpoint_hash = None
        self.train_seconds = None
        self.source_datasets = None  # what the checkpoint was trained on (several for a union source)
        if self.trainable:
            folder = model_dir(results, method, config.backbone, source, train_seed)
            model_json = model_file(results, method, config.backbone, source, train_seed)
            if not model_json.is_file():
                raise NaglError(f"{model_json} not found: train {method} on {source} with seed {train_seed} first "
                                f"(the workflow's train rule, or `nagl train`)")
            self.method = load_method(folder)
            info = read_json(model_json)
            self.checkpoint_hash = info.get("checkpoint_hash")
            self.train_seconds = info.get("train_seconds")
            self.source_datasets = list(info.get("source_datasets") or [source])
        else:
            self.method = create_method(method, dim=self.backbone.dim,
                                        **method_class(method).config_for_backbone(self.backbone))
        self.levels = type(self.method).feature_levels(self.backbone)  # empty: the default grid
        # What score() gets as its grid: the default grid, or each level's grid
        self.grid = ({name: self.backbone.levels[name][0] for name in self.levels if name in self.backbone.levels}
                     if self.levels else self.backbone.grid)
        if self.levels:
            self._check_level_shapes()
        if hasattr(self.method, "eval"):
            self.method.eval()
        # The method's own settings (its config, and how it was trained), apart from the
        # run-level settings in config_hash.
        self.method_config_hash = stable_hash({"method": self.method.config_hash(),
                                               "training": ({"profile": config.training.profile} if self.trainable
                                                            else None)})
        self.target_hash = dataset_content_hash(target)
        self.source_hash = None if source == TRAINING_FREE_SOURCE else source_content_hash(self.source_datasets)[0]
        # Features and masks of the current category, loaded once per job (cleared per category).
        self._feature_memo: dict[str, torch.Tensor | dict[str, torch.Tensor]] = {}
        self._mask_memo: dict[tuple[str | None, int], np.ndarray] = {}
        self.computed: list[str] = []  # the job's cell folders it scores, and those recorded as aliases
        self.aliased: list[str] = []
        self.check_seconds = 0.0  # scoring the reference-use checks' swapped references (not a cell's time)

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
        new = ~rows["image_sha256"].isin(self._feature_memo.keys())
        if new.any():
            fresh = rows[new].drop_duplicates("image_sha256")
            shas = list(fresh["image_sha256"])
            self.cache.ensure([self.root / p for p in fresh["image_path"]], shas, progress=False, levels=self.levels)
            if self.levels:
                loaded = self.cache.load_levels(shas, self.levels)
                self._feature_memo.update((sha, {name: t[i] for name, t in loaded.items()}) for i, sha in enumerate(shas))
            else:
                self._feature_memo.update(zip(shas, self.cache.load(shas), strict=True))
        picked = [self._feature_memo[sha] for sha in rows["image_sha256"]]
        if self.levels:
            return {name: torch.stack([item[name] for item in picked]) for name in picked[0]}
        return torch.stack(picked)

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
        settings = self.shot_settings()
        max_kn = max(self.config.shots.k_normal)
        max_ka = max(self.config.shots.k_abnormal)
        gallery_seed = min(self.config.seeds)
        canonical = self._canonical_cells(categories)
        # The gallery setting's cells (a method's largest shot setting), and the cells that compute
        # them: a computed cell makes the gallery (of its first category and seed) when it or one of
        # its aliases is a gallery cell.
        largest: dict[str, tuple[int, int]] = {}
        for key in canonical:
            largest[key.method] = max(largest.get(key.method, (0, 0)), (key.k_normal, key.k_abnormal))
        gallery_cells = {key for key in canonical if (key.k_normal, key.k_abnormal) == largest[key.method]}
        gallery_cells |= {canonical[key] for key in gallery_cells}
        self.computed, self.aliased, self.check_seconds = [], [], 0.0
        for category in categories:
            self._feature_memo.clear()
            self._mask_memo.clear()
            for seed in sorted(self.config.seeds):
                keys = [CellKey(self.method_name, self.config.backbone, self.source, self.target,
                                category, kn, ka, seed, self.train_seed) for kn, ka in settings]
                aliases = {key: canonical_run_id(self.config, canonical[key]) for key in keys if canonical[key] != key}
                todo = [key for key in keys if not _is_finished(key.folder(self.results), self.settings_hash,
                                                                 self.checkpoint_hash, self._checks_for(key),
                                                                 aliases.get(key))]
                folders += [str(key.folder(self.results)) for key in keys]
                self.computed += [str(key.folder(self.results)) for key in keys if key not in aliases]
                self.aliased += [str(key.folder(self.results)) for key in aliases]
                if todo:
                    split = draw_reference_split(self.manifest, self.target, category, seed, max(max_kn, 1), max_ka)
                    gallery = gallery_cells if category == gallery_category and seed == gallery_seed else set()
                    self._write_aliases(split, [key for key in todo if key in aliases], aliases, gallery)
                    self._evaluate_split(split, [key for key in todo if key not in aliases], gallery)
                if "reference-code" in self.config.protocols:
                    folders += self._run_reference_code(category, seed, max(max_kn, 1), max_ka)
        return folders

    def _canonical_cells(self, categories: list[str]) -> dict[CellKey, CellKey]:
        """For every clean cell of the run on this target, the cell that computes it (nagl.results.aliases)."""
        keys = []
        for method, source, train_seed, target in self.config.evaluation_jobs():
            if target != self.target:
                continue
            settings = self.config.shots.settings()
            if not method_class(method).uses_abnormal_refs:
                settings = [(kn, ka) for kn, ka in settings if ka == 0]
            keys += [CellKey(method, self.config.backbone, source, self.target, category, kn, ka, seed, train_seed)
                     for category in categories for seed in sorted(self.config.seeds) for kn, ka in settings]
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

    def _checks_for(self, key: CellKey) -> bool:
        """Whether the cell gets the reference-use check (nagl.reference_checks)."""
        return (self.config.reference_checks and key.protocol == "clean" and key.k_abnormal > 0
                and self.method.uses_abnormal_refs)

    def _run_reference_code(self, category: str, seed: int, max_kn: int, max_ka: int) -> list[str]:
        """The reference-code protocol's cells of one (category, seed): settings with k_abnormal > 0 only."""
        keys = [CellKey(self.method_name, self.config.backbone, self.source, self.target, category, kn, ka, seed,
                        self.train_seed, "reference-code") for kn, ka in self.shot_settings() if ka > 0]
        todo = [key for key in keys
                if not _is_finished(key.folder(self.results), self.settings_hash, self.checkpoint_hash)]
        if todo:
            code = draw_reference_code_split(self.manifest, self.target, category, seed, max_kn, max_ka)
            self._evaluate_split(code.split, todo, gallery=set(), code=code)
        return [str(key.folder(self.results)) for key in keys]

    def _patch_map(self, query_features, normal, abnormal, masks: torch.Tensor | None,
                   category: str, normal_side: NormalSide | None = None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The method's patch maps of the queries, scored in batches of QUERY_BATCH, and its own
        image scores per batch (None where the method returns none). ``normal_side``: the
        queries' shared normal-side work for these normal references (``Method.normal_side``)."""
        patch_maps, image_parts = [], []
        # With the normal side given, the method's remaining work is per query (it chunks it itself):
        # one call, so what it derives from the abnormal references is computed once, not per batch.
        batch = _count(query_features) if normal_side is not None else QUERY_BATCH
        with torch.no_grad():
            for begin in range(0, _count(query_features), max(batch, 1)):
                end = begin + batch
                patch, image = score_batch(self.method, _rows(query_features, begin, end),
                                           normal, abnormal, masks, self.grid, category,
                                           normal_side.rows(begin, end) if normal_side is not None else None)
                patch_maps.append(patch)
                image_parts.append(image)
        return torch.cat(patch_maps), image_parts

    def _reference_code_map(self, code: ReferenceCodeSplit, key: CellKey, query_features, normal, abnormal_features,
                            abnormal_masks: torch.Tensor | None,
                            category: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Patch maps (and the method's own image scores, if any) where each query is scored with the
        abnormal references of its assigned defect type; and the number of pseudo-masks."""
        per_type = len(next(iter(code.by_type.values())))  # code.split.abnormal: each type's references in turn
        assigned = np.asarray(code.assigned_type)
        patch_map = torch.empty((len(assigned), *self.backbone.grid))
        own: torch.Tensor | None = None
        n_pseudo = 0
        for index, defect in enumerate(code.by_type):
            begin = index * per_type
            masks = abnormal_masks[begin:begin + key.k_abnormal] if abnormal_masks is not None else None
            n_pseudo += pseudo_mask_count(masks, key.k_abnormal, self.backbone.grid)
            rows = torch.from_numpy(np.flatnonzero(assigned == defect))
            if len(rows):
                part, parts = self._patch_map(_select(query_features, rows), normal,
                                              _rows(abnormal_features, begin, begin + key.k_abnormal), masks, category)
                patch_map[rows] = part
                if all(p is not None for p in parts):
                    own = torch.empty(len(assigned)) if own is None else own
                    own[rows] = torch.cat(parts)
        return patch_map, own, n_pseudo

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
                          query_masks: np.ndarray | None, category: str,
                          normal_side: NormalSide | None) -> pd.DataFrame:
        """The cell's rows of ``reference_checks``: its queries and normal references (and the clean
        cell's normal-side work), abnormal ones swapped."""
        rows = []
        for variant, features, masks in swapped:
            if len(features) < key.k_abnormal:
                continue  # too few candidates for this many references: no row
            start = time.perf_counter()
            patch_map, _ = self._patch_map(query_features, _rows(normal_features, 0, key.k_normal),
                                           _rows(features, 0, key.k_abnormal),
                                           masks[:key.k_abnormal] if masks is not None else None, category,
                                           normal_side)
            self.check_seconds += time.perf_counter() - start
            row = check_row(variant, labels, patch_map, query_masks, self.config.eval_resolution)
            if row is not None:
                rows.append(row)
        return check_frame(rows)

    def _evaluate_split(self, split: ReferenceSplit, keys: list[CellKey], gallery: set[CellKey],
                        code: ReferenceCodeSplit | None = None) -> None:
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
        sides, side_seconds = self._normal_sides(query_features, normal_features, keys) if code is None else ({}, {})
        for key in keys:
            if not self.method.uses_abnormal_refs and key.k_normal == 0:
                raise NaglError(f"method {self.method_name!r} uses normal references only; k_normal = 0 "
                                f"cannot be scored (cell {key})")
            start = time.perf_counter()
            if code is None:
                masks = abnormal_masks[:key.k_abnormal] if abnormal_masks is not None else None
                patch_map, own_scores = self._patch_map(query_features, _rows(normal_features, 0, key.k_normal),
                                                        _rows(abnormal_features, 0, key.k_abnormal), masks,
                                                        split.category, sides.get(key.k_normal))
                n_pseudo = pseudo_mask_count(masks, key.k_abnormal, self.backbone.grid)
            else:
                patch_map, own, n_pseudo = self._reference_code_map(
                    code, key, query_features, _rows(normal_features, 0, key.k_normal), abnormal_features,
                    abnormal_masks, split.category)
                own_scores = [own]
            image_score, pixel_maps = final_image_scores(self.method, patch_map, own_scores, resolution)
            scores = image_score.numpy().astype(np.float64)
            score_seconds = time.perf_counter() - start + side_seconds.get(key.k_normal, 0.0)
            in_gallery = key in gallery
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
            eval_seconds = time.perf_counter() - start  # the check below is not the cell's evaluation time
            checks = (self._reference_checks(key, swapped, query_features, normal_features, labels, query_masks,
                                             split.category, sides.get(key.k_normal))
                      if key in checked else None)
            write_cell(key.folder(self.results), self._run_row(key, split, len(queries), int(labels.sum()),
                                                               score_seconds, eval_seconds, n_pseudo),
                       metrics, scores_frame, split_json, gallery_frame, checks)

    def _normal_sides(self, query_features, normal_features,
                      keys: list[CellKey]) -> tuple[dict[int, NormalSide], dict[int, float]]:
        """The method's normal-side work (``Method.normal_side``) for every k_normal >= 1 of the
        split's cells, from one search of the largest bank, and each k_normal's share of its time.
        Empty when the method shares none."""
        shots = sorted({key.k_normal for key in keys if key.k_normal > 0})
        if not shots:
            return {}, {}
        start = time.perf_counter()
        with torch.no_grad():
            sides = self.method.normal_side(query_features, normal_features, shots)
        if sides is None:
            return {}, {}
        share = (time.perf_counter() - start) / len(shots)
        return sides, dict.fromkeys(shots, share)

    def _run_row(self, key: CellKey, split: ReferenceSplit, n_queries: int, n_anomalous: int,
                 score_seconds: float, eval_seconds: float, n_pseudo_masks: int) -> dict:
        versions = package_versions()
        return {
            "run_id": key.run_id(self.settings_hash), "alias_of": None, **key.__dict__,
            "backbone_identity": self.backbone.identity,
            "source_datasets": self.source_datasets,
            "in_domain": key.target in (self.source_datasets or []),
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


def _rows(features: torch.Tensor | dict[str, torch.Tensor], begin: int, end: int):
    """Rows ``begin:end`` of a features tensor, or of every level of a dict of levels."""
    if isinstance(features, dict):
        return {name: tensor[begin:end] for name, tensor in features.items()}
    return features[begin:end]


def _select(features: torch.Tensor | dict[str, torch.Tensor], rows: torch.Tensor):
    """The rows ``rows`` (an index tensor) of a features tensor or of every level of a dict."""
    if isinstance(features, dict):
        return {name: tensor[rows] for name, tensor in features.items()}
    return features[rows]


def _count(features: torch.Tensor | dict[str, torch.Tensor]) -> int:
    """The number of images in a features tensor or dict of levels."""
    return len(next(iter(features.values()))) if isinstance(features, dict) else len(features)


def evaluate_job(config: RunConfig, method: str, source: str, target: str,
                 train_seed: int | None = None) -> list[str]:
    return Evaluator(config, method, source, target, Path(config.results), train_seed).run()
