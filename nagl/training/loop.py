"""The training loop, the same for every trainable method.

Training works on cached patch features: the caller passes a lookup from image
sha256 to features (``FeatureCache.load``, or a dict), so the frozen backbone never
runs inside the loop. The method builds its loss (:class:`~nagl.methods.base.TrainableMethod`);
the loop draws the episodes its :meth:`batch_spec` asks for, optimises with AdamW
and a step schedule, keeps the last epoch, the one with the lowest validation
loss or the one with the highest held-out source image AUROC
(:mod:`nagl.training.selection`), lets the method calibrate on held-out SOURCE
episodes, and writes the checkpoint with its metadata.

The seed sets the three random parts of training: the source validation split,
the initial weights and the episode order.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nagl.config import RunConfig
from nagl.data.layout import read_manifest
from nagl.data.unions import source_content_hash, union_manifest
from nagl.errors import NaglError
from nagl.io import sha256_file, stable_hash
from nagl.methods import TrainableMethod, create_method, method_class
from nagl.provenance import now_utc, package_versions
from nagl.training.batch import Episode, EpisodeBatch
from nagl.training.episodes import (
    BalancedSampler,
    FeatureLookup,
    FeatureStore,
    LevelLookup,
    calibration_episodes,
    draw_batch,
    split_source,
    validation_episodes,
)
from nagl.training.schedule import Schedule, schedule_for
from nagl.training.selection import detection_auroc, detection_sets


@dataclass
class TrainResult:
    method: TrainableMethod
    schedule: Schedule
    history: list[dict[str, Any]]
    selected_epoch: int
    seconds: float
    metadata: dict[str, Any]
    checkpoint: Path | None = None


def _auroc(labels: list[int], scores: list[float]) -> float | None:
    if len(set(labels)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


@torch.no_grad()
def validation_score(method: TrainableMethod, episodes: Sequence[Episode], store: FeatureStore,
                     batch: int) -> dict[str, float | None]:
    """Mean loss and image AUROC of the method's image scores over fixed (validation) episodes."""
    method.trainable_module().eval()
    losses, scores = [], []
    for start in range(0, len(episodes), batch):
        part = episodes[start:start + batch]
        loss, t = method.loss(EpisodeBatch(part, store))
        losses.append(float(loss) * len(part))
        scores.extend(t.tolist())
    return {"loss": sum(losses) / max(1, len(episodes)),
            "auroc": _auroc([e.label for e in episodes], scores)}


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]training[/]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def _check_trainable(method: str) -> None:
    if not method_class(method).trainable:
        raise NaglError(f"method {method!r} is training-free; there is nothing to train "
                        f"(use it directly with `nagl predict --method {method}`)")


def _prefixed(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {f"val_{k}": v for k, v in metrics.items()}


def train_on_source(dataset_dir: str | Path | Mapping[str, str | Path], features: FeatureLookup, *,
                    backbone_identity: str,
                    method: str = "nagl", profile: str = "embedded", seed: int = 0,
                    grid: tuple[int, int] | None = None, overrides: Mapping[str, Any] | None = None,
                    method_settings: Mapping[str, Any] | None = None,
                    out_dir: str | Path | None = None, source_hash: str | None = None,
                    source: str | None = None, member_hashes: Mapping[str, str] | None = None,
                    backbone: str | None = None, backbone_parameters: int = 0,
                    categories: Sequence[str] | None = None,
                    on_epoch: Callable[[int, TrainableMethod], None] | None = None,
                    progress: bool = True, extractor: Any = None,
                    level_lookup: LevelLookup | None = None) -> TrainResult:
    """Train ``method`` on the source dataset at ``dataset_dir`` from cached features.

    ``features`` maps image sha256 -> ``(G, C)`` features (a dict), or is a callable
    ``(sha256s) -> (N, G, C)`` such as ``FeatureCache.load``. ``overrides`` change the
    profile's :class:`Schedule`; ``method_settings`` are passed to the method's
    constructor. Same settings and seed -> identical weights. With ``out_dir`` the
    checkpoint is saved there (``weights.safetensors`` + ``model.json``).
    ``categories``: train on these categories of the source only (e.g. to hold one
    out). ``on_epoch(epoch, method)`` is called before training (epoch 0) and after
    every epoch, with the model in eval mode (for studies that score every epoch).

    A multi-level method (its class sets ``level_group``) also needs ``extractor`` (the
    backbone, for its level shapes: ``config_for_backbone``) and ``level_lookup``
    ``(sha256s, names) -> {level: (N, G_l, C_l)}`` such as ``FeatureCache.load_levels``.

    A union source (``nagl.data.unions``): ``dataset_dir`` maps each member dataset to its
    folder, ``source`` names the union (its categories are ``<dataset>/<category>``).
    ``member_hashes``: each member's content hash, recorded in ``source_members``.
    """
    _check_trainable(method)
    schedule = schedule_for(profile, method=method, **dict(overrides or {}))
    cls = method_class(method)
    level_names: tuple[str, ...] = ()
    backbone_config: dict[str, Any] = {}
    if cls.level_group is not None:
        if extractor is None or level_lookup is None:
            raise NaglError(f"method {method!r} reads feature levels ({cls.level_group!r}): pass the backbone "
                            f"(extractor=) and a level lookup (level_lookup=), or train it with train_source")
        level_names = cls.feature_levels(extractor)
        backbone_config = cls.config_for_backbone(extractor)
    union = isinstance(dataset_dir, Mapping)
    if union:
        if not source:
            raise NaglError("training on a union source needs its name: pass source=")
        folders = {str(name): Path(folder) for name, folder in dataset_dir.items()}
        manifest = union_manifest(folders)
        where = f"union source {source} ({', '.join(folders)})"
    else:
        dataset_dir = Path(dataset_dir)
        manifest = read_manifest(dataset_dir)
        where = f"source dataset {dataset_dir}"
    if categories is not None:
        unknown = sorted(set(categories) - set(manifest["category"]))
        if unknown or not categories:
            raise NaglError(f"{where}: categories {list(categories)} must be a non-empty "
                            f"list of its categories ({', '.join(sorted(manifest['category'].unique()))})")
        manifest = manifest[manifest["category"].isin(list(categories))]
    manifest = manifest.reset_index(drop=True)
    source = source or (str(manifest["dataset"].iloc[0]) if len(manifest) else dataset_dir.name)
    if not union:
        folders = {source: dataset_dir}

    store = FeatureStore(manifest, folders if union else dataset_dir, features, grid,
                         level_lookup=level_lookup, level_names=level_names)
    model = create_method(method, store.dim, **backbone_config, **dict(method_settings or {}), seed=seed)
    assert isinstance(model, TrainableMethod), f"{method} is trainable but not a TrainableMethod"
    # the optimisers first: a method may read the schedule there that its batch spec depends on
    # (ResAD's normal-only first epochs are a share of the schedule's epochs)
    optimisers = model.configure_optimisers(schedule)
    spec = model.batch_spec(schedule.normal_shots, schedule.abnormal_shots)
    store.mask_size = spec.mask_size  # the masks the method's loss reads

    train_pool, val_pool, skipped = split_source(manifest, spec, schedule.val_fraction, seed, source)
    if not train_pool.categories():
        raise NaglError(f"{where}: no category can form a training episode; each "
                        f"needs >= {max(spec.normal_shots) + 1} normal images and a defect type with "
                        f">= {max(spec.abnormal_shots) + 1} "
                        f"{'masked ' if spec.needs_masks else ''}anomalies")
    val_eps = (validation_episodes(train_pool, val_pool, spec, schedule.val_episodes, seed)
               if schedule.val_fraction > 0 else [])
    if schedule.select == "best" and not val_eps:
        raise NaglError(f"{where}: no validation query could be held out with "
                        f"val_fraction={schedule.val_fraction}; set select to 'last' or use a larger source")
    select_sets = (detection_sets(train_pool, val_pool, spec, schedule.val_references, seed)
                   if schedule.val_fraction > 0 and schedule.val_references > 0 else [])
    if schedule.select == "auroc" and not select_sets:
        raise NaglError(f"{where}: no category keeps both a normal and an anomalous "
                        f"held-out image with val_fraction={schedule.val_fraction}; set select to 'last' "
                        f"or use a larger source")

    module = model.trainable_module()
    lr_schedules = [torch.optim.lr_scheduler.MultiStepLR(optimiser, list(schedule.milestones), schedule.gamma)
                    for optimiser in optimisers]
    rng = np.random.default_rng(int(stable_hash([seed, "train-episodes"]), 16))
    sampler = BalancedSampler(train_pool, rng) if spec.balanced else None
    steps = math.ceil(schedule.episodes / schedule.batch)

    start = time.perf_counter()
    history: list[dict[str, Any]] = []
    select_sides: dict = {}  # the selection sets' normal-side work: the same every epoch (frozen features)

    def validate(row: dict[str, Any]) -> dict[str, Any]:
        if val_eps:
            row.update(_prefixed(validation_score(model, val_eps, store, schedule.batch)))
        if select_sets and row["epoch"] > 0:  # the initial weights are never selected: not scored
            row["select_auroc"] = detection_auroc(model, select_sets, store, normal_sides=select_sides)
        return row

    if val_eps:
        history.append(validate({"epoch": 0, "train_loss": None}))
    if on_epoch:
        module.eval()
        on_epoch(0, model)
    # The selection score, higher is better: -validation loss ('best') or the held-out AUROC ('auroc').
    best_state, best_score, selected = copy.deepcopy(module.state_dict()), -math.inf, 0
    with _progress(progress) as bar:
        task = bar.add_task("train", total=schedule.epochs * steps, info="")
        for epoch in range(1, schedule.epochs + 1):
            model.start_epoch(epoch, schedule.epochs)
            module.train()
            losses = []
            for step in range(steps):
                size = min(schedule.batch, schedule.episodes - step * schedule.batch)
                episodes = draw_batch(train_pool, rng, spec, size, epoch, sampler)
                losses.append(model.training_step(EpisodeBatch(episodes, store), optimisers))
                bar.update(task, advance=1, info=f"epoch {epoch}/{schedule.epochs} loss {np.mean(losses):.4f}")
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": optimisers[0].param_groups[0]["lr"]}
            for lr_schedule in lr_schedules:
                lr_schedule.step()
            validate(row)
            if schedule.select != "last":
                score = -row["val_loss"] if schedule.select == "best" else row["select_auroc"]
                if score > best_score:
                    best_score, selected = score, epoch
                    best_state = copy.deepcopy(module.state_dict())
            history.append(row)
            if on_epoch:
                module.eval()
                on_epoch(epoch, model)
    if schedule.select == "last":
        selected = schedule.epochs
    else:
        module.load_state_dict(best_state)
    module.eval()
    calibration = None
    # Held-out source episodes: the selection's reference draws over every held-out image, else the
    # validation episodes.
    held_out = [episode for s in select_sets for episode in s.episodes()] or val_eps
    if spec.calibrate_on_validation and not held_out:
        raise NaglError(f"{where}: method {method!r} is calibrated on held-out source validation episodes, "
                        f"but none were held out; train with a profile that holds out a validation split "
                        f"(val_fraction > 0), e.g. the `embedded` profile")
    if spec.calibration_images > 0:
        chosen = calibration_episodes(train_pool, spec, spec.calibration_images, seed)
    else:
        chosen = held_out if spec.calibrate_on_validation else []
    if chosen:  # on SOURCE episodes only
        with torch.no_grad():
            calibration = model.calibrate([EpisodeBatch(chosen[i:i + schedule.batch], store)
                                           for i in range(0, len(chosen), schedule.batch)])
    seconds = time.perf_counter() - start

    head_total, trainable = model.parameter_counts()
    versions = package_versions()
    metadata = {
        "source": source,
        "source_dir": None if union else str(dataset_dir),
        "source_manifest_sha256": None if union else sha256_file(dataset_dir / "manifest.parquet"),
        "source_dataset_hash": source_hash,  # for a union: nagl.data.unions.union_content_hash
        "source_datasets": list(folders),
        "source_members": [{"dataset": name, "dir": str(folder),
                            "manifest_sha256": sha256_file(folder / "manifest.parquet"),
                            "content_hash": (member_hashes or {}).get(name, None if union else source_hash)}
                           for name, folder in folders.items()],
        "backbone": backbone or backbone_identity.split("@")[0],
        "backbone_identity": backbone_identity,
        "grid": list(store.grid),
        "train_seed": seed,
        "training_profile": schedule.profile,
        "training": {**asdict(schedule), "method": model.training_settings(), "selected_epoch": selected,
                     "skipped_categories": skipped, "train_categories": train_pool.categories(),
                     "n_validation_episodes": len(val_eps),
                     "n_selection_episodes": sum(len(s.queries) for s in select_sets)},
        "training_config_hash": stable_hash({"schedule": asdict(schedule), "method": model.training_settings()}),
        "history": history,
        "calibration": calibration,
        "train_seconds": seconds,
        "params_head": head_total,
        "params_trainable": trainable,
        "params_backbone": int(backbone_parameters),
        "params_total": head_total + int(backbone_parameters),
        "nagl_version": versions["nagl"],
        "torch_version": versions["torch"],
        "python_version": versions["python"],
        "created_at": now_utc(),
    }
    result = TrainResult(model, schedule, history, selected, seconds, metadata)
    if out_dir is not None:
        result.checkpoint = model.save(out_dir, metadata)
    return result


# ------------------------------------------------------ from a dataset name --

def train_source(method: str, source: str, *, backbone: str = "effnet-lite0", image_size: int | None = None,
                 profile: str = "embedded", seed: int = 0, overrides: Mapping[str, Any] | None = None,
                 out_dir: str | Path | None = None, progress: bool = True,
                 datasets: Sequence[str] | None = None) -> TrainResult:
    """Train ``method`` on the prepared dataset ``source``: make sure its features are in
    the feature cache (computing what is missing), then :func:`train_on_source`.
    With ``datasets``, ``source`` names a union source made of those prepared datasets.

    The default ``out_dir`` is the model folder of :func:`nagl.paths.model_dir`
    under the results folder.
    """
    from nagl.data.prepare import dataset_path
    from nagl.models.backbones import create_backbone
    from nagl.models.cache import FeatureCache, default_root
    from nagl.paths import model_dir
    from nagl.settings import results_dir

    _check_trainable(method)
    schedule_for(profile, method=method, **dict(overrides or {}))  # fail on bad settings before any feature work
    members = list(datasets) if datasets else [source]
    folders = {name: dataset_path(name) for name in members}
    extractor = create_backbone(backbone, image_size)
    levels = method_class(method).feature_levels(extractor)
    cache = FeatureCache(default_root(), extractor)
    for folder in folders.values():
        manifest = read_manifest(folder)
        cache.ensure([folder / p for p in manifest["image_path"]], list(manifest["image_sha256"]),
                     progress=progress, levels=levels)
    source_hash, member_hashes = source_content_hash(members)
    out_dir = Path(out_dir) if out_dir else model_dir(results_dir(), method, backbone, source, seed)
    return train_on_source(folders if datasets else folders[source], cache.load,
                           backbone_identity=extractor.identity, method=method,
                           profile=profile, seed=seed, grid=extractor.grid, overrides=overrides,
                           out_dir=out_dir, source_hash=source_hash, source=source if datasets else None,
                           member_hashes=member_hashes, backbone=backbone,
                           backbone_parameters=extractor.parameter_count(levels),
                           progress=progress, extractor=extractor,
                           level_lookup=cache.load_levels if levels else None)


def train_from_config(config: RunConfig, method: str, source: str, train_seed: int,
                      out_dir: str | Path) -> TrainResult:
    """The workflow's train step: the run config's backbone and profile, one of its training seeds.

    The model is trained for every positive ``k_normal`` (and ``k_abnormal``) of the
    config's shot settings at once, so one checkpoint serves all of them.
    """
    overrides: dict[str, Any] = {}
    normal = sorted({k for k in config.shots.k_normal if k > 0})
    abnormal = sorted({k for k in config.shots.k_abnormal if k > 0})
    if normal:
        overrides["normal_shots"] = normal
    if abnormal:
        overrides["abnormal_shots"] = abnormal
    datasets = config.source_datasets(source)
    return train_source(method, source, backbone=config.backbone, image_size=config.image_size,
                        profile=config.training.profile, seed=train_seed,
                        overrides=overrides, out_dir=out_dir, progress=False,
                        datasets=None if datasets == (source,) else datasets)
