"""Speed and size of the methods: backbone images/s, head images/s on cached features,
training time of the embedded profile, parameters (total incl. backbone / trainable).

    .venv/bin/python benchmarks/methods.py [--threads 2] [--queries 32] [--small]

Uses the prepared dataset ``datasets/embedded-textures`` when it exists, else builds
the embedded texture preset into a temporary folder (``--small``: 2 categories with
fewer images, for a quick look). Numbers depend on the machine and its load; they
are printed, never asserted.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from nagl.data.images import load_rgb
from nagl.data.layout import read_manifest
from nagl.methods import create_method, list_methods
from nagl.models.backbones import create_backbone
from nagl.models.cache import FeatureCache
from nagl.settings import datasets_dir
from nagl.training.loop import train_on_source

SMALL = {"categories": ["brick", "gravel"], "counts": {"train_good": 12, "test_good": 4, "test_anomalous": 12}}


def source_dataset(workdir: Path, small: bool) -> Path:
    prepared = datasets_dir() / "embedded-textures"
    if not small and (prepared / "manifest.parquet").is_file():
        return prepared
    from nagl.data import embedded, layout
    from nagl.data.registry import DatasetSpec

    options = {"preset": "textures", **(SMALL if small else {})}
    folder = workdir / "embedded-textures"
    embedded.build(DatasetSpec("embedded-textures", "embedded", "industrial-texture", options), folder)
    layout.write_manifest(folder, "embedded-textures")
    return folder


def main(threads: int = typer.Option(2, help="torch threads"),
         queries: int = typer.Option(32, help="queries scored per timing"),
         small: bool = typer.Option(False, help="a smaller source dataset (quick look)"),
         train: bool = typer.Option(True, help="also time a training run of the embedded profile")) -> None:
    torch.set_num_threads(threads)
    console = Console(width=150)
    backbone = create_backbone("effnet-lite0")
    backbone_params = sum(p.numel() for p in backbone.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        dataset = source_dataset(Path(tmp), small)
        manifest = read_manifest(dataset)
        console.print(f"source {dataset} ({len(manifest)} images), backbone {backbone.identity}, "
                      f"{threads} threads")

        # backbone: preprocessing + forward pass, batches of 8
        paths = [dataset / p for p in manifest["image_path"][:queries]]
        backbone(torch.stack([backbone.preprocess(load_rgb(p)) for p in paths[:2]]))  # warm-up
        start = time.perf_counter()
        for begin in range(0, len(paths), 8):
            backbone(torch.stack([backbone.preprocess(load_rgb(p)) for p in paths[begin:begin + 8]]))
        backbone_ips = len(paths) / (time.perf_counter() - start)

        cache = FeatureCache(Path(tmp) / "features", backbone)
        cache.ensure([dataset / p for p in manifest["image_path"]], list(manifest["image_sha256"]), progress=False)
        test = manifest[manifest["split"] == "test"]
        normal_rows = manifest[manifest["split"] == "train"].iloc[:4]
        abnormal_row = test[test["label"] == 1].iloc[:1]
        query = cache.load(list(test["image_sha256"].iloc[1:queries + 1]))
        normal = cache.load(list(normal_rows["image_sha256"]))
        abnormal = cache.load(list(abnormal_row["image_sha256"]))
        from nagl.data.images import load_mask

        mask = torch.from_numpy(load_mask(dataset / abnormal_row["mask_path"].iloc[0], backbone.image_size))[None]

        training_seconds, history = None, []
        if train:
            result = train_on_source(dataset, cache.load, backbone_identity=backbone.identity,
                                     grid=backbone.grid, backbone_parameters=backbone_params, progress=True)
            training_seconds, history = result.seconds, result.history
            trained = result.method

        table = Table(title="methods on effnet-lite0 features")
        for column in ("method", "backbone img/s", "head img/s 1N+1A", "head img/s 4N+1A",
                       "train s (embedded)", "params total", "params trainable"):
            table.add_column(column, justify="right")
        for name in list_methods():
            method = trained if (name == "nagl" and train) else create_method(name, backbone.dim)
            rates = []
            for k1 in (1, 4):
                method.score(query[:2], normal[:k1], abnormal, mask, backbone.grid)  # warm-up
                start = time.perf_counter()
                method.score(query, normal[:k1], abnormal, mask, backbone.grid)
                rates.append(len(query) / (time.perf_counter() - start))
            head_total, trainable = method.parameter_counts()
            seconds = f"{training_seconds:.1f}" if (method.trainable and training_seconds) else "-"
            table.add_row(name, f"{backbone_ips:.1f}", f"{rates[0]:.1f}", f"{rates[1]:.1f}", seconds,
                          f"{head_total + backbone_params:,}", f"{trainable:,}")
        console.print(table)
        if history:
            console.print("embedded-profile validation loss per epoch: "
                          + ", ".join(f"{h['val_loss']:.4f}" for h in history if h.get("val_loss") is not None))
            console.print("train loss per epoch: "
                          + ", ".join(f"{h['train_loss']:.4f}" for h in history if h.get("train_loss") is not None))


if __name__ == "__main__":
    typer.run(main)
