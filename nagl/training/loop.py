"""The training loop, the same for every trainable method.

Training works on cached patch features: the caller passes a lookup from image
sha256 to features (``FeatureCache.load``, or a dict), so the frozen backbone never
runs inside the loop. The method builds its loss (:class:`~nagl.methods.base.TrainableMethod`);
the loop draws the episodes its :meth:`batch_spec` asks for, optimises with AdamW
and a step schedule, keeps the last epoch or the one with the lowest validation
loss, lets the method calibrate on the source validation episodes, and writes the
checkpoint with its metadata.
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
from nagl.errors import NaglError
from nagl.io import sha256_file, stable_hash
from nagl.methods import TrainableMethod, create_method, method_class
from nagl.provenance import now_utc, package_versions
from nagl.training.batch import Episode, EpisodeBatch
from nagl.training.episodes import FeatureLookup, FeatureStore, draw_episode, split_source, validation_episodes
from nagl.training.schedule import Schedule, schedule_for


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


def train_on_source(dataset_dir: str | Path, features: FeatureLookup, *, backbone_identity: str,
                    method: str = "nagl", profile: str = "embedded", seed: int = 0,
                    grid: tuple[int, int] | None = None, overrides: Mapping[str, Any] | None = None,
                    method_settings: Mapping[str, Any] | None = None,
                    out_dir: str | Path | None = None, source_hash: str | None = None,
                    backbone: str | None = None, backbone_parameters: int = 0,
                    categories: Sequence[str] | None = None,
                    on_epoch: Callable[[int, TrainableMethod], None] | None = None,
                    progress: bool = True) -> TrainResult:
    """Train ``method`` on the source dataset at ``dataset_dir`` from cached features.

    ``features`` maps image sha256 -> ``(G, C)`` features (a dict), or is a callable
    ``(sha256s) -> (N, G, C)`` such as ``FeatureCache.load``. ``overrides`` change the
    profile's :class:`Schedule`; ``method_settings`` are passed to the method's
    constructor. Same settings and seed -> identical weights. With ``out_dir`` the
    checkpoint is saved there (``weights.safetensors`` + ``model.json``).
    ``categories``: train on these categories of the source only (e.g. to hold one
    out). ``on_epoch(epoch, method)`` is called before training (epoch 0) and after
    every epoch, with the model in eval mode (for studies that score every epoch).
    """
    _check_trainable(method)
    schedule = schedule_for(profile, **dict(overrides or {}))
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if categories is not None:
        unknown = sorted(set(categories) - set(manifest["category"]))
        if unknown or not categories:
            raise NaglError(f"source dataset {dataset_dir}: categories {list(categories)} must be a non-empty "
                            f"list of its categories ({', '.join(sorted(manifest['category'].unique()))})")
        manifest = manifest[manifest["category"].isin(list(categories))]
    manifest = manifest.reset_index(drop=True)
    source = str(manifest["dataset"].iloc[0]) if len(manifest) else dataset_dir.name

    store = FeatureStore(manifest, dataset_dir, features, grid)
    model = create_method(method, store.dim, **dict(method_settings or {}), seed=seed)
    assert isinstance(model, TrainableMethod), f"{method} is trainable but not a TrainableMethod"
    spec = model.batch_spec(schedule.normal_shots, schedule.abnormal_shots)
    store.mask_size = spec.mask_size  # the masks the method's loss reads

    train_pool, val_pool, skipped = split_source(manifest, spec, schedule.val_fraction, seed, source)
    if not train_pool.categories():
        raise NaglError(f"source dataset {dataset_dir}: no category can form a training episode; each "
                        f"needs >= {max(spec.normal_shots) + 1} normal images and a defect type with "
                        f">= {max(spec.abnormal_shots) + 1} "
                        f"{'masked ' if spec.needs_masks else ''}anomalies")
    val_eps = (validation_episodes(train_pool, val_pool, spec, schedule.val_episodes, seed)
               if schedule.val_fraction > 0 else [])
    if schedule.select == "best" and not val_eps:
        raise NaglError(f"source dataset {dataset_dir}: no validation query could be held out with "
                        f"val_fraction={schedule.val_fraction}; set select to 'last' or use a larger source")

    module = model.trainable_module()
    optimiser = torch.optim.AdamW(module.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, list(schedule.milestones), schedule.gamma)
    rng = np.random.default_rng(int(stable_hash([seed, "train-episodes"]), 16))
    steps = math.ceil(schedule.episodes / schedule.batch)

    start = time.perf_counter()
    history: list[dict[str, Any]] = []
    if val_eps:
        history.append({"epoch": 0, "train_loss": None,
                        **_prefixed(validation_score(model, val_eps, store, schedule.batch))})
    if on_epoch:
        module.eval()
        on_epoch(0, model)
    best_state, best_loss, selected = copy.deepcopy(module.state_dict()), math.inf, 0
    with _progress(progress) as bar:
        task = bar.add_task("train", total=schedule.epochs * steps, info="")
        for epoch in range(1, schedule.epochs + 1):
            module.train()
            losses = []
            for step in range(steps):
                size = min(schedule.batch, schedule.episodes - step * schedule.batch)
                episodes = [draw_episode(train_pool, rng, spec) for _ in range(size)]
                loss, _ = model.loss(EpisodeBatch(episodes, store))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
                bar.update(task, advance=1, info=f"epoch {epoch}/{schedule.epochs} loss {np.mean(losses):.4f}")
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": optimiser.param_groups[0]["lr"]}
            lr_schedule.step()
            if val_eps:
                row.update(_prefixed(validation_score(model, val_eps, store, schedule.batch)))
                if schedule.select == "best" and row["val_loss"] < best_loss:
                    best_loss, selected = row["val_loss"], epoch
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
    calibration = model.calibrate(store, val_eps)  # on held-out SOURCE episodes only
    seconds = time.perf_counter() - start

    head_total, trainable = model.parameter_counts()
    versions = package_versions()
    metadata = {
        "source": source,
        "source_dir": str(dataset_dir),
        "source_manifest_sha256": sha256_file(dataset_dir / "manifest.parquet"),
        "source_dataset_hash": source_hash,
        "backbone": backbone or backbone_identity.split("@")[0],
        "backbone_identity": backbone_identity,
        "grid": list(store.grid),
        "seed": seed,
        "training_profile": schedule.profile,
        "training": {**asdict(schedule), "method": model.training_settings(), "selected_epoch": selected,
                     "skipped_categories": skipped, "train_categories": train_pool.categories(),
                     "n_validation_episodes": len(val_eps)},
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
                 out_dir: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Train ``method`` on the prepared dataset ``source``: make sure its features are in
    the feature cache (computing what is missing), then :func:`train_on_source`.

    The default ``out_dir`` is the model folder of :func:`nagl.paths.model_dir`
    under the results folder.
    """
    from nagl.data.prepare import dataset_content_hash, dataset_path
    from nagl.models.backbones import create_backbone
    from nagl.models.cache import FeatureCache, default_root
    from nagl.paths import model_dir
    from nagl.settings import results_dir

    _check_trainable(method)
    schedule_for(profile, **dict(overrides or {}))  # fail on bad settings before any feature work
    dataset_dir = dataset_path(source)
    manifest = read_manifest(dataset_dir)
    extractor = create_backbone(backbone, image_size)
    cache = FeatureCache(default_root(), extractor)
    cache.ensure([dataset_dir / p for p in manifest["image_path"]], list(manifest["image_sha256"]),
                 progress=progress)
    out_dir = Path(out_dir) if out_dir else model_dir(results_dir(), method, backbone, source)
    return train_on_source(dataset_dir, cache.load, backbone_identity=extractor.identity, method=method,
                           profile=profile, seed=seed, grid=extractor.grid, overrides=overrides,
                           out_dir=out_dir, source_hash=dataset_content_hash(source), backbone=backbone,
                           backbone_parameters=sum(p.numel() for p in extractor.parameters()),
                           progress=progress)


def train_from_config(config: RunConfig, method: str, source: str, out_dir: str | Path) -> TrainResult:
    """The workflow's train step: the run config's backbone, profile and seed.

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
    return train_source(method, source, backbone=config.backbone, image_size=config.image_size,
                        profile=config.training.profile, seed=config.training.seed,
                        overrides=overrides, out_dir=out_dir, progress=False)
