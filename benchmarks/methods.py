"""Size and speed of every registered method: head parameters (total / trainable), training
time per source, head images/s on cached features (and the backbone's images/s).

    .venv/bin/python benchmarks/methods.py [--threads 2] [--queries 32] [--small] [--no-train]
                                           [--sources embedded-textures,embedded-medical,embedded-objects]

- **Parameters**: each method's head is built from backbone *shapes* alone (the backbone
  on PyTorch's meta device, no weights; ``config_for_backbone`` gives a multi-level
  method its level widths and grids), on the backbones listed for it in
  :data:`PARAMETER_BACKBONES` (the embedded default otherwise), and compared with the
  counts its spec gives (:data:`SPEC_PARAMETERS`). Add a method's rows there.
- **Training**: every trainable method with ITS OWN ``embedded`` profile on each source,
  from cached effnet-lite0 features (the features are computed first, not timed).
- **Head images/s**: queries scored as the harness scores them (batches of 8, image
  scores included) on cached features, with 1 and 4 normal references (and one
  abnormal reference for the methods that use them).

Sources are the prepared datasets under ``datasets/`` when they exist, else built from
their registry entries into a temporary folder (``--small``: fewer images per
category, for a quick look). Numbers depend on the machine and its load; they are
printed, never asserted.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from nagl.data.images import load_mask, load_rgb
from nagl.data.layout import read_manifest
from nagl.evaluate import QUERY_BATCH
from nagl.methods import create_method, feature_levels, list_methods, method_class
from nagl.methods.base import final_image_scores, score_batch
from nagl.models.backbones import backbone_shapes, create_backbone
from nagl.models.cache import FeatureCache
from nagl.settings import datasets_dir
from nagl.training.loop import train_on_source
from nagl.training.schedule import schedule_for

BACKBONE = "effnet-lite0"
# The backbones each method's head size is reported on (shapes only, no weights needed).
PARAMETER_BACKBONES: dict[str, tuple[str, ...]] = {
    "inctrl": ("clip-vit-b-16-plus-240", BACKBONE),
    "resad": ("wide-resnet50-2", BACKBONE),
}
# Trainable parameter counts given by the method specs (../shared/spec/<method>-method.md).
SPEC_PARAMETERS: dict[tuple[str, str], int] = {
    ("inctrl", "clip-vit-b-16-plus-240"): 333_186,
    ("inctrl", BACKBONE): 1_131_778,
    ("resad", "wide-resnet50-2"): 55_404_800,
    ("resad", BACKBONE): 6_110_608,
}
SOURCES = ("embedded-textures", "embedded-medical", "embedded-objects")
SMALL_COUNTS = {"train_good": 12, "test_good": 4, "test_anomalous": 12}


def source_dataset(workdir: Path, name: str, small: bool) -> Path:
    """The prepared dataset ``name``, or (``small``, or not prepared) one built from its registry entry."""
    prepared = datasets_dir() / name
    if not small and (prepared / "manifest.parquet").is_file():
        return prepared
    from nagl.data import embedded, layout
    from nagl.data.registry import DatasetSpec, load_registry

    spec = load_registry()[name]
    options = {k: v for k, v in spec.options.items() if k in embedded.OPTION_KEYS}
    if small:
        options["counts"] = SMALL_COUNTS
    folder = workdir / name
    embedded.build(DatasetSpec(name, "embedded", spec.domain, options), folder)
    layout.write_manifest(folder, name)
    return folder


def parameter_rows(methods: list[str]) -> list[tuple]:
    """(method, backbone, head total, trainable, spec trainable, backbone parameters) per method and backbone."""
    rows = []
    for name in methods:
        cls = method_class(name)
        for backbone_name in PARAMETER_BACKBONES.get(name, (BACKBONE,)):
            shapes = backbone_shapes(backbone_name)
            method = create_method(name, shapes.dim, **cls.config_for_backbone(shapes))
            total, trainable = method.parameter_counts()
            rows.append((name, backbone_name, total, trainable, SPEC_PARAMETERS.get((name, backbone_name)),
                         shapes.parameter_count(cls.feature_levels(shapes))))
    return rows


def _features(cache: FeatureCache, levels: tuple[str, ...], shas: list[str]):
    return cache.load_levels(shas, levels) if levels else cache.load(shas)


def head_rate(method, backbone, cache, manifest, dataset: Path, queries: int, k_normal: int) -> float:
    """Queries per second of ``score`` + image scores, as the harness runs them, on cached features."""
    levels = type(method).feature_levels(backbone)
    test = manifest[manifest["split"] == "test"]
    category = str(test["category"].iloc[0])
    test = test[test["category"] == category]
    train = manifest[(manifest["split"] == "train") & (manifest["category"] == category)]
    query = _features(cache, levels, list(test["image_sha256"].iloc[:queries]))
    normal = _features(cache, levels, list(train["image_sha256"].iloc[:k_normal]))
    k_abnormal = 1 if method.uses_abnormal_refs else 0
    abnormal_rows = test[test["label"] == 1].iloc[-k_abnormal:] if k_abnormal else test.iloc[:0]
    abnormal = _features(cache, levels, list(abnormal_rows["image_sha256"]))
    masks = (torch.stack([torch.from_numpy(load_mask(dataset / p, backbone.image_size))
                          for p in abnormal_rows["mask_path"]]) if k_abnormal else None)

    def rows(features, begin, end):
        return {k: v[begin:end] for k, v in features.items()} if isinstance(features, dict) else features[begin:end]

    grid = ({name: backbone.levels[name][0] for name in levels if name in backbone.levels} if levels
            else backbone.grid)

    def run(count: int) -> None:
        patches, parts = [], []
        for begin in range(0, count, QUERY_BATCH):
            patch, image = score_batch(method, rows(query, begin, min(begin + QUERY_BATCH, count)),
                                       normal, abnormal, masks, grid, category)
            patches.append(patch)
            parts.append(image)
        final_image_scores(method, torch.cat(patches), parts, backbone.image_size)

    count = len(test.iloc[:queries])
    run(min(2, count))  # warm-up
    start = time.perf_counter()
    run(count)
    return count / (time.perf_counter() - start)


def main(threads: int = typer.Option(2, help="torch threads"),
         queries: int = typer.Option(32, help="queries scored per timing"),
         small: bool = typer.Option(False, help="smaller source datasets (quick look)"),
         train: bool = typer.Option(True, help="also time training with each method's embedded profile"),
         sources: str = typer.Option(",".join(SOURCES), help="comma-separated source datasets")) -> None:
    torch.set_num_threads(threads)
    console = Console(width=160)
    methods = list_methods()

    table = Table(title="head parameters, from backbone shapes (no weights)")
    for column in ("method", "backbone", "head total", "head trainable", "spec (trainable)", "backbone", "total"):
        table.add_column(column, justify="right")
    for name, backbone_name, total, trainable, spec, backbone_params in parameter_rows(methods):
        table.add_row(name, backbone_name, f"{total:,}", f"{trainable:,}", f"{spec:,}" if spec else "-",
                      f"{backbone_params:,}", f"{total + backbone_params:,}")
    console.print(table)

    backbone = create_backbone(BACKBONE)
    levels = feature_levels(methods, backbone)
    with tempfile.TemporaryDirectory() as tmp:
        trained: dict[str, object] = {}
        train_table = Table(title=f"training, each method's embedded profile, cached {BACKBONE} features")
        for column in ("method", "source", "images", "steps", "train s", "selected epoch", "val loss"):
            train_table.add_column(column, justify="right")
        first = None
        for source in [s.strip() for s in sources.split(",") if s.strip()]:
            dataset = source_dataset(Path(tmp), source, small)
            manifest = read_manifest(dataset)
            cache = FeatureCache(Path(tmp) / "features", backbone)
            start = time.perf_counter()
            computed = cache.ensure([dataset / p for p in manifest["image_path"]], list(manifest["image_sha256"]),
                                    progress=False, levels=levels)
            console.print(f"source {source}: {len(manifest)} images, features of {computed} computed in "
                          f"{time.perf_counter() - start:.1f} s (levels: {', '.join(levels) or 'default grid only'})")
            if first is None:
                first = (dataset, manifest, cache)
            if not train:
                continue
            for name in methods:
                if not method_class(name).trainable:
                    continue
                schedule = schedule_for("embedded", method=name)
                result = train_on_source(dataset, cache.load, backbone_identity=backbone.identity, method=name,
                                         profile="embedded", grid=backbone.grid, progress=False,
                                         backbone_parameters=backbone.parameter_count(
                                             method_class(name).feature_levels(backbone)),
                                         extractor=backbone, level_lookup=cache.load_levels)
                trained.setdefault(name, result.method)
                losses = [h["val_loss"] for h in result.history if h.get("val_loss") is not None]
                train_table.add_row(name, source, str(len(manifest)),
                                    str(schedule.epochs * -(-schedule.episodes // schedule.batch)),
                                    f"{result.seconds:.1f}", str(result.selected_epoch),
                                    f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-")
        if train:
            console.print(train_table)
        if first is None:
            return

        dataset, manifest, cache = first
        paths = [dataset / p for p in manifest["image_path"][:queries]]
        backbone(torch.stack([backbone.preprocess(load_rgb(p)) for p in paths[:2]]))  # warm-up
        start = time.perf_counter()
        for begin in range(0, len(paths), 8):
            backbone(torch.stack([backbone.preprocess(load_rgb(p)) for p in paths[begin:begin + 8]]))
        backbone_rate = len(paths) / (time.perf_counter() - start)

        speed = Table(title=f"head images/s on cached {BACKBONE} features ({dataset.name}; "
                            f"backbone alone: {backbone_rate:.1f} images/s, default grid)")
        for column in ("method", "references", "1 normal", "4 normal", "weights"):
            speed.add_column(column, justify="right")
        for name in methods:
            cls = method_class(name)
            method = trained.get(name) or create_method(name, backbone.dim, **cls.config_for_backbone(backbone))
            if hasattr(method, "eval"):
                method.eval()
            rates = [head_rate(method, backbone, cache, manifest, dataset, queries, k) for k in (1, 4)]
            speed.add_row(name, "normal + 1 abnormal" if cls.uses_abnormal_refs else "normal only",
                          f"{rates[0]:.1f}", f"{rates[1]:.1f}",
                          "trained" if name in trained else ("untrained" if cls.trainable else "-"))
        console.print(speed)


if __name__ == "__main__":
    typer.run(main)
