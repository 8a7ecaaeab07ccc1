"""Episodic training of a trainable method (NAGL) on a SOURCE dataset only.

Training works on cached patch features: the caller passes a lookup from image
sha256 to features (``FeatureCache.load``, or a dict), so the frozen backbone never
runs inside the training loop.

An episode (``/work/shared/spec/nagl-method.md``): a category drawn uniformly; ``k1``
normal references (``k1`` drawn from ``normal_shots``); ``k2`` abnormal references of
one defect type, with masks; a query, normal or abnormal with probability 1/2 (an
abnormal query has the references' defect type); the query is never one of its
references. With ``normal_shots = (1, 2, 4)`` one model per source serves every test
shot setting; the paper's one-model-per-shot mode is ``normal_shots = (k,)``.

Losses, each with weight 1: cross-entropy of ``[1 - t, t]`` against the label, ``t`` =
mean of the top-k patch scores (k = 20 at 32x32, scaled with the grid); focal loss
(alpha 0.25, gamma 2) and dice loss of the two-channel map ``[s_n, s_a]``, upsampled
to the mask size, against ``[1 - mask, mask]``.

The checkpoint is the last epoch or the best epoch on a validation split held out
from the SOURCE dataset (a seeded fraction of each category's images per defect
type). Nothing from a target dataset is ever read here.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import nagl
from nagl.data.images import load_mask
from nagl.errors import NaglError
from nagl.io import sha256_file, stable_hash
from nagl.methods import create_method, method_class
from nagl.methods.base import infer_grid, pool_masks, prepare_references, top_k_count, top_k_mean
from nagl.methods.nagl import NaglMethod

FeatureLookup = Mapping[str, torch.Tensor] | Callable[[Sequence[str]], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run (hashed into the checkpoint's metadata).

    An epoch is ``episodes`` episodes, in optimiser steps of ``batch`` episodes.
    ``select``: ``last`` (the last epoch) or ``best`` (lowest validation loss).
    """

    profile: str
    epochs: int
    episodes: int
    batch: int
    lr: float
    weight_decay: float
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    normal_shots: tuple[int, ...] = (1, 2, 4)
    abnormal_shots: tuple[int, ...] = (1,)
    select: str = "last"
    val_fraction: float = 0.0
    val_episodes: int = 0
    top_k: float = 20.0  # patches at a 32x32 grid; scaled with the grid
    mask_size: int = 256
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    proxies: int = 25
    heads: int = 4

    def check(self) -> None:
        where = f"training profile {self.profile!r}"
        positive = ("epochs", "episodes", "batch", "mask_size", "proxies", "heads")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise NaglError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        if not self.normal_shots or min(self.normal_shots) < 1:
            raise NaglError(f"{where}: normal_shots must be a non-empty list of counts >= 1, "
                            f"got {list(self.normal_shots)}")
        if not self.abnormal_shots or min(self.abnormal_shots) < 1:
            raise NaglError(f"{where}: abnormal_shots must be a non-empty list of counts >= 1, "
                            f"got {list(self.abnormal_shots)}")
        if self.select not in ("last", "best"):
            raise NaglError(f"{where}: select must be 'last' or 'best', got {self.select!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise NaglError(f"{where}: val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.select == "best" and (self.val_fraction <= 0 or self.val_episodes < 1):
            raise NaglError(f"{where}: select='best' needs val_fraction > 0 and val_episodes >= 1")
        if self.lr <= 0:
            raise NaglError(f"{where}: lr must be > 0, got {self.lr}")


PROFILES: dict[str, TrainConfig] = {
    # About a minute of compute on 2 CPU cores with cached effnet-lite0 features
    # (80 steps of 8 episodes); see docs/methods.md for how it was chosen.
    "embedded": TrainConfig(profile="embedded", epochs=10, episodes=64, batch=8, lr=1e-3,
                            weight_decay=0.01, milestones=(8,), select="best",
                            val_fraction=0.2, val_episodes=24),
    # The paper's schedule.
    "paper": TrainConfig(profile="paper", epochs=20, episodes=500, batch=8, lr=1e-5,
                         weight_decay=0.01, milestones=(10, 15), select="last"),
    # A few episodes: checks the workflow end to end, learns nothing useful.
    "smoke": TrainConfig(profile="smoke", epochs=1, episodes=4, batch=2, lr=1e-3,
                         weight_decay=0.01, select="last"),
}


def training_config(profile: str = "embedded", **overrides: Any) -> TrainConfig:
    """A profile's config with ``overrides`` (field names of :class:`TrainConfig`)."""
    if profile not in PROFILES:
        raise NaglError(f"unknown training profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    known = set(TrainConfig.__dataclass_fields__) - {"profile"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise NaglError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("milestones", "normal_shots", "abnormal_shots"):
        if key in overrides:
            overrides[key] = tuple(int(v) for v in overrides[key])
    config = replace(PROFILES[profile], **overrides)
    config.check()
    return config


# ------------------------------------------------------------------- data --

POOLED = "(pooled defects)"


@dataclass
class SourcePool:
    """The source images usable for training, split into train and validation pools.

    ``normals[category]`` / ``anomalies[category][defect]``: indices into ``items``.
    """

    items: pd.DataFrame
    normals: dict[str, list[int]] = field(default_factory=dict)
    anomalies: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def categories(self) -> list[str]:
        return sorted(c for c in self.normals if self.normals[c] and self.anomalies.get(c))


def read_source_manifest(dataset_dir: Path) -> pd.DataFrame:
    try:
        from nagl.data.layout import read_manifest
    except ImportError:  # pragma: no cover - layout is part of the package
        return pd.read_parquet(Path(dataset_dir) / "manifest.parquet")
    return read_manifest(dataset_dir)


def split_source(manifest: pd.DataFrame, config: TrainConfig, seed: int,
                 dataset: str = "source") -> tuple[SourcePool, SourcePool, list[str]]:
    """Seeded train / validation pools of the source, per category and defect type.

    A share ``val_fraction`` (rounded) of each group is held out, but the training
    pool keeps enough for an episode: ``max(normal_shots) + 1`` normal images and
    ``max(abnormal_shots) + 1`` images per defect type. Anomalies without a mask and
    defect types too small for an episode are not used, except that a category where
    no defect type is large enough has its masked anomalies pooled into one group
    (:data:`POOLED`; its abnormal queries may then differ in type from the
    references). Returns the pools and the names of categories that cannot form an
    episode.
    """
    items = manifest.reset_index(drop=True)
    need_normal = max(config.normal_shots) + 1
    need_abnormal = max(config.abnormal_shots) + 1
    train, val = SourcePool(items), SourcePool(items)
    skipped = []
    for category in sorted(items["category"].unique()):
        rows = items[items["category"] == category]
        groups = {"good": rows.index[rows["label"] == 0].tolist()}
        masked = rows[(rows["label"] == 1) & rows["mask_path"].notna()]
        for defect in sorted(masked["defect_type"].unique()):
            groups[defect] = masked.index[masked["defect_type"] == defect].tolist()
        if len(groups) > 1 and max(len(v) for k, v in groups.items() if k != "good") < need_abnormal:
            groups = {"good": groups["good"], POOLED: masked.index.tolist()}
        for group, indices in groups.items():
            need = need_normal if group == "good" else need_abnormal
            if len(indices) < need:
                continue
            rng = np.random.default_rng(int(stable_hash([dataset, category, group, seed, "val"]), 16))
            order = [indices[i] for i in rng.permutation(len(indices))]
            n_val = min(round(config.val_fraction * len(order)), len(order) - need)
            held, kept = sorted(order[:n_val]), sorted(order[n_val:])
            if group == "good":
                train.normals[category], val.normals[category] = kept, held
            else:
                train.anomalies.setdefault(category, {})[group] = kept
                if held:
                    val.anomalies.setdefault(category, {})[group] = held
        if category not in train.categories():
            skipped.append(str(category))
    return train, val, skipped


@dataclass(frozen=True)
class Episode:
    category: str
    query: int
    label: int
    normal: tuple[int, ...]
    abnormal: tuple[int, ...]
    defect: str


def draw_episode(pool: SourcePool, rng: np.random.Generator, config: TrainConfig) -> Episode:
    """One training episode from ``pool`` (see the module docstring)."""
    categories = pool.categories()
    category = categories[rng.integers(len(categories))]
    k1 = int(config.normal_shots[rng.integers(len(config.normal_shots))])
    k2 = int(config.abnormal_shots[rng.integers(len(config.abnormal_shots))])
    defects = sorted(pool.anomalies[category])
    defect = defects[rng.integers(len(defects))]
    normals, anomalies = pool.normals[category], pool.anomalies[category][defect]
    label = int(rng.random() < 0.5)
    if label:
        picked = rng.choice(len(anomalies), size=k2 + 1, replace=False)
        query, abnormal = anomalies[picked[0]], [anomalies[i] for i in picked[1:]]
        normal = [normals[i] for i in rng.choice(len(normals), size=k1, replace=False)]
    else:
        picked = rng.choice(len(normals), size=k1 + 1, replace=False)
        query, normal = normals[picked[0]], [normals[i] for i in picked[1:]]
        abnormal = [anomalies[i] for i in rng.choice(len(anomalies), size=k2, replace=False)]
    return Episode(category, int(query), label, tuple(normal), tuple(abnormal), defect)


def validation_episodes(train: SourcePool, val: SourcePool, config: TrainConfig,
                        seed: int) -> list[Episode]:
    """A fixed list of episodes whose queries are held-out source images and whose
    references come from the training pool; normal and abnormal queries alternate."""
    rng = np.random.default_rng(int(stable_hash([seed, "validation-episodes"]), 16))
    queries: dict[int, list[tuple[str, int, str]]] = {0: [], 1: []}
    for category in train.categories():
        for index in val.normals.get(category, []):
            queries[0].append((category, index, ""))
        for defect, indices in sorted(val.anomalies.get(category, {}).items()):
            if defect in train.anomalies[category]:
                queries[1].extend((category, index, defect) for index in indices)
    for label in (0, 1):
        queries[label] = [queries[label][i] for i in rng.permutation(len(queries[label]))]
    ordered = [q for pair in zip(queries[0], queries[1], strict=False) for q in pair]
    ordered += queries[0][len(ordered) // 2:] + queries[1][len(ordered) // 2:]
    episodes = []
    for number, (category, index, defect) in enumerate(ordered[: config.val_episodes]):
        label = int(bool(defect))
        if not defect:
            defects = sorted(train.anomalies[category])
            defect = defects[rng.integers(len(defects))]
        k1 = int(config.normal_shots[number % len(config.normal_shots)])
        k2 = int(config.abnormal_shots[number % len(config.abnormal_shots)])
        normals, anomalies = train.normals[category], train.anomalies[category][defect]
        normal = [normals[i] for i in rng.choice(len(normals), size=min(k1, len(normals)), replace=False)]
        abnormal = [anomalies[i] for i in rng.choice(len(anomalies), size=min(k2, len(anomalies)), replace=False)]
        episodes.append(Episode(category, int(index), label, tuple(normal), tuple(abnormal), defect))
    return episodes


class FeatureStore:
    """Features and masks of source images by manifest row, memoised up to ``max_bytes``."""

    def __init__(self, items: pd.DataFrame, dataset_dir: Path, lookup: FeatureLookup,
                 grid: tuple[int, int] | None, mask_size: int, max_bytes: int = 4 << 30):
        self.items, self.dir, self.lookup = items, Path(dataset_dir), lookup
        self.mask_size, self.max_bytes, self.used = mask_size, max_bytes, 0
        self._features: dict[int, torch.Tensor] = {}
        self._masks: dict[int, torch.Tensor] = {}
        first = self.features([int(items.index[0])])
        self.grid = infer_grid(first.shape[1], grid)
        self.dim = int(first.shape[2])

    def _fetch(self, shas: list[str]) -> torch.Tensor:
        if callable(self.lookup):
            out = self.lookup(shas)
        else:
            missing = [s for s in shas if s not in self.lookup]
            if missing:
                raise NaglError(f"no cached features for image sha256 {missing[0]}; "
                                f"compute the source's features first")
            out = torch.stack([torch.as_tensor(self.lookup[s]) for s in shas])
        return torch.as_tensor(out, dtype=torch.float32)

    def features(self, rows: Sequence[int]) -> torch.Tensor:
        """``(len(rows), G, C)`` features of manifest rows."""
        missing = [r for r in dict.fromkeys(rows) if r not in self._features]
        fetched: dict[int, torch.Tensor] = {}
        if missing:
            loaded = self._fetch([str(self.items.at[r, "image_sha256"]) for r in missing])
            for row, tensor in zip(missing, loaded, strict=False):
                fetched[row] = tensor
                if self.used + tensor.numel() * 4 <= self.max_bytes:
                    self._features[row] = tensor
                    self.used += tensor.numel() * 4
        return torch.stack([self._features[r] if r in self._features else fetched[r] for r in rows])

    def mask(self, row: int) -> torch.Tensor:
        """The pixel mask at ``mask_size`` (all False for normal images)."""
        if row not in self._masks:
            path = self.items.at[row, "mask_path"]
            path = None if path is None or pd.isna(path) else self.dir / str(path)
            self._masks[row] = torch.from_numpy(load_mask(path, self.mask_size))
        return self._masks[row]


# ----------------------------------------------------------------- losses --

def focal_loss(prob: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Focal loss on probability maps (NAGL's maps are already in [0, 1])."""
    prob = prob.clamp(1e-6, 1 - 1e-6)
    p_t = torch.where(target > 0.5, prob, 1 - prob)
    alpha_t = torch.where(target > 0.5, torch.full_like(prob, alpha), torch.full_like(prob, 1 - alpha))
    return (-alpha_t * (1 - p_t) ** gamma * p_t.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``1 - dice`` per sample and channel, averaged; ``prob``, ``target`` ``(B, K, H, W)``."""
    inter = (prob * target).sum(dim=(2, 3))
    total = prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3))
    return (1 - (2 * inter + eps) / (total + eps)).mean()


def episode_loss(method: NaglMethod, episodes: Sequence[Episode], store: FeatureStore,
                 config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Total loss of a batch of episodes, and the image scores ``t`` ``(B,)``."""
    grid = store.grid
    query = store.features([e.query for e in episodes])
    references = []
    for e in episodes:
        patch_masks = pool_masks(torch.stack([store.mask(r) for r in e.abnormal]), grid)
        references.append(prepare_references(store.features(list(e.normal)), store.features(list(e.abnormal)),
                                             None, grid, patch_masks=patch_masks))
    s_n, s_a = method.episode_maps(query, references, grid)
    S = (s_a + 1 - s_n) / 2
    t = top_k_mean(S, top_k_count(S.shape[1], config.top_k)).clamp(1e-6, 1 - 1e-6)
    labels = torch.tensor([float(e.label) for e in episodes])
    image = F.binary_cross_entropy(t, labels)
    h, w = grid
    maps = torch.stack([s_n, s_a], dim=1).reshape(len(episodes), 2, h, w)
    maps = F.interpolate(maps, size=(config.mask_size, config.mask_size), mode="bilinear",
                         align_corners=False).clamp(0, 1)
    mask = torch.stack([store.mask(e.query) for e in episodes]).float()[:, None]
    target = torch.cat([1 - mask, mask], dim=1)
    pixel = focal_loss(maps, target, config.focal_alpha, config.focal_gamma) + dice_loss(maps, target)
    return image + pixel, t.detach()


def _auroc(labels: list[int], scores: list[float]) -> float | None:
    if len(set(labels)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


@torch.no_grad()
def evaluate(method: NaglMethod, episodes: Sequence[Episode], store: FeatureStore,
             config: TrainConfig) -> dict[str, float | None]:
    """Mean loss and image AUROC of ``t`` over fixed (validation) episodes."""
    method.head.eval()
    losses, scores = [], []
    for start in range(0, len(episodes), config.batch):
        part = episodes[start:start + config.batch]
        loss, t = episode_loss(method, part, store, config)
        losses.append(float(loss) * len(part))
        scores.extend(t.tolist())
    return {"loss": sum(losses) / max(1, len(episodes)),
            "auroc": _auroc([e.label for e in episodes], scores)}


# --------------------------------------------------------------- training --

@dataclass
class TrainResult:
    method: NaglMethod
    config: TrainConfig
    history: list[dict[str, Any]]
    selected_epoch: int
    seconds: float
    metadata: dict[str, Any]
    checkpoint: Path | None = None


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]training[/]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def train_on_source(dataset_dir: str | Path, features: FeatureLookup, *, backbone_identity: str,
                    method: str = "nagl", profile: str = "embedded", seed: int = 0,
                    grid: tuple[int, int] | None = None, overrides: Mapping[str, Any] | None = None,
                    out_dir: str | Path | None = None, source_hash: str | None = None,
                    backbone: str | None = None, backbone_parameters: int = 0,
                    progress: bool = True) -> TrainResult:
    """Train ``method`` on the source dataset at ``dataset_dir`` from cached features.

    ``features`` maps image sha256 -> ``(G, C)`` features (a dict), or is a callable
    ``(sha256s) -> (N, G, C)`` such as ``FeatureCache.load``. Same config and seed ->
    identical weights. With ``out_dir`` the checkpoint is saved there
    (``weights.safetensors`` + ``model.json``).
    """
    if not method_class(method).trainable:
        raise NaglError(f"method {method!r} is training-free; there is nothing to train "
                        f"(use it directly with `nagl predict --method {method}`)")
    config = training_config(profile, **dict(overrides or {}))
    dataset_dir = Path(dataset_dir)
    manifest = read_source_manifest(dataset_dir)
    source = str(manifest["dataset"].iloc[0]) if len(manifest) else dataset_dir.name
    train_pool, val_pool, skipped = split_source(manifest, config, seed, source)
    if not train_pool.categories():
        raise NaglError(f"source dataset {dataset_dir}: no category can form a training episode; each "
                        f"needs >= {max(config.normal_shots) + 1} normal images and a defect type with "
                        f">= {max(config.abnormal_shots) + 1} masked anomalies")
    val_eps = validation_episodes(train_pool, val_pool, config, seed) if config.val_fraction > 0 else []
    if config.select == "best" and not val_eps:
        raise NaglError(f"source dataset {dataset_dir}: no validation query could be held out with "
                        f"val_fraction={config.val_fraction}; set select to 'last' or use a larger source")
    store = FeatureStore(manifest.reset_index(drop=True), dataset_dir, features, grid, config.mask_size)

    model = create_method(method, store.dim, proxies=config.proxies, heads=config.heads, seed=seed)
    assert isinstance(model, NaglMethod)
    optimiser = torch.optim.AdamW(model.head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, list(config.milestones), config.gamma)
    rng = np.random.default_rng(int(stable_hash([seed, "train-episodes"]), 16))
    steps = math.ceil(config.episodes / config.batch)

    start = time.perf_counter()
    history: list[dict[str, Any]] = []
    if val_eps:
        history.append({"epoch": 0, "train_loss": None, **_prefixed(evaluate(model, val_eps, store, config))})
    best_state, best_loss, selected = copy.deepcopy(model.head.state_dict()), math.inf, 0
    with _progress(progress) as bar:
        task = bar.add_task("train", total=config.epochs * steps, info="")
        for epoch in range(1, config.epochs + 1):
            model.head.train()
            losses = []
            for step in range(steps):
                size = min(config.batch, config.episodes - step * config.batch)
                batch = [draw_episode(train_pool, rng, config) for _ in range(size)]
                loss, _ = episode_loss(model, batch, store, config)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
                bar.update(task, advance=1, info=f"epoch {epoch}/{config.epochs} loss {np.mean(losses):.4f}")
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": optimiser.param_groups[0]["lr"]}
            schedule.step()
            if val_eps:
                row.update(_prefixed(evaluate(model, val_eps, store, config)))
                if config.select == "best" and row["val_loss"] < best_loss:
                    best_loss, selected = row["val_loss"], epoch
                    best_state = copy.deepcopy(model.head.state_dict())
            history.append(row)
    if config.select == "last":
        selected = config.epochs
    else:
        model.head.load_state_dict(best_state)
    model.head.eval()
    seconds = time.perf_counter() - start

    head_total, trainable = model.parameter_counts()
    metadata = {
        "source": source,
        "source_dir": str(dataset_dir),
        "source_manifest_sha256": sha256_file(dataset_dir / "manifest.parquet"),
        "source_dataset_hash": source_hash,
        "backbone": backbone or backbone_identity.split("@")[0],
        "backbone_identity": backbone_identity,
        "grid": list(store.grid),
        "seed": seed,
        "training_profile": config.profile,
        "training": {**asdict(config), "selected_epoch": selected, "skipped_categories": skipped,
                     "train_categories": train_pool.categories(),
                     "n_validation_episodes": len(val_eps)},
        "training_config_hash": stable_hash(asdict(config)),
        "history": history,
        "train_seconds": seconds,
        "params_head": head_total,
        "params_trainable": trainable,
        "params_backbone": int(backbone_parameters),
        "params_total": head_total + int(backbone_parameters),
        "nagl_version": nagl.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result = TrainResult(model, config, history, selected, seconds, metadata)
    if out_dir is not None:
        result.checkpoint = model.save(out_dir, metadata)
    return result


def _prefixed(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {f"val_{k}": v for k, v in metrics.items()}


# ------------------------------------------------------ from a dataset name --

def train_source(method: str, source: str, *, backbone: str = "effnet-lite0", image_size: int | None = None,
                 profile: str = "embedded", seed: int = 0, overrides: Mapping[str, Any] | None = None,
                 out_dir: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Train ``method`` on the prepared dataset ``source``: make sure its features are in
    the feature cache (computing what is missing), then :func:`train_on_source`.

    The default ``out_dir`` is ``results/models/<method>/<backbone>/<source>/``.
    """
    from nagl.data.prepare import dataset_content_hash, dataset_path
    from nagl.models.backbones import create_backbone
    from nagl.models.cache import FeatureCache, default_root
    from nagl.settings import results_dir

    if not method_class(method).trainable:
        raise NaglError(f"method {method!r} is training-free; there is nothing to train "
                        f"(use it directly with `nagl predict --method {method}`)")
    training_config(profile, **dict(overrides or {}))  # fail on bad settings before any feature work
    dataset_dir = dataset_path(source)
    manifest = read_source_manifest(dataset_dir)
    extractor = create_backbone(backbone, image_size)
    cache = FeatureCache(default_root(), extractor)
    cache.ensure([dataset_dir / p for p in manifest["image_path"]], list(manifest["image_sha256"]),
                 progress=progress)
    out_dir = Path(out_dir) if out_dir else results_dir() / "models" / method / backbone / source
    return train_on_source(dataset_dir, cache.load, backbone_identity=extractor.identity, method=method,
                           profile=profile, seed=seed, grid=extractor.grid, overrides=overrides,
                           out_dir=out_dir, source_hash=dataset_content_hash(source), backbone=backbone,
                           backbone_parameters=sum(p.numel() for p in extractor.parameters()),
                           progress=progress)


def train_from_config(config: Mapping[str, Any], method: str, source: str, out_dir: str | Path) -> TrainResult:
    """The workflow's train step: the run config's backbone, profile and seed.

    The model is trained for every positive ``k_normal`` of the config's shot
    settings at once (``normal_shots``), so one checkpoint serves all of them.
    """
    shots = config.get("shots", {})
    overrides: dict[str, Any] = {}
    normal = sorted({int(k) for k in shots.get("k_normal", []) if int(k) > 0})
    abnormal = sorted({int(k) for k in shots.get("k_abnormal", []) if int(k) > 0})
    if normal:
        overrides["normal_shots"] = normal
    if abnormal:
        overrides["abnormal_shots"] = abnormal
    training = config.get("training", {})
    return train_source(method, source, backbone=config["backbone"], image_size=config.get("image_size"),
                        profile=training.get("profile", "embedded"), seed=int(training.get("seed", 0)),
                        overrides=overrides, out_dir=out_dir, progress=False)
