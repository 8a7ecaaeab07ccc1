"""ResAD's `embedded` training profile, chosen on the SOURCE only.

    .venv/bin/python benchmarks/resad_profile.py [--sources embedded-textures,...] [--seed 0]
                                                 [--references 4] [--threads 2] [--out resad_profile.json]

For every source and candidate schedule (learning rate x epochs; Adam, weight decay
5e-4, lr x0.1 at 80 % of the epochs, the last epoch kept, as the `embedded` profile),
ResAD is trained on the source's training pool (20 % of each category and defect type
held out, the loop's seeded rule), its constants ``c_l`` fixed on the training pool,
and the held-out source images are scored against ``--references`` draws of normal
references per category (1, 2, 4 normal references in turn; the selection sets of
``select = auroc``): mean image AUROC over the draws. One epoch at 1e-3 (calibrated
the same way) is the nearly untrained baseline. Only the source is read; no target is opened. Prints
a table and writes the numbers as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import typer

from nagl.data.layout import read_manifest
from nagl.data.prepare import dataset_path
from nagl.methods import method_class
from nagl.models.backbones import create_backbone
from nagl.models.cache import FeatureCache, default_root
from nagl.training.episodes import FeatureStore, split_source
from nagl.training.loop import train_on_source
from nagl.training.selection import detection_auroc, detection_sets

SOURCES = "embedded-textures,embedded-medical,embedded-objects"
# (lr, epochs): the `embedded` candidate (1e-3, 10) and its neighbours; (1e-3, 1) is a
# nearly untrained baseline (one epoch).
CANDIDATES = [(1e-3, 10), (1e-4, 10), (1e-3, 20), (1e-4, 20), (1e-3, 1)]
VAL_FRACTION = 0.2


def held_out_auroc(result, manifest, folder, backbone, cache, levels, seed: int, references: int) -> float:
    model = result.method
    spec = model.batch_spec(result.schedule.normal_shots, result.schedule.abnormal_shots)
    spec = dataclasses.replace(spec, normal_shots=(1, 2, 4))
    train_pool, val_pool, _ = split_source(manifest, spec, VAL_FRACTION, seed, folder.name)
    sets = detection_sets(train_pool, val_pool, spec, references, seed)
    store = FeatureStore(manifest, folder, cache.load, backbone.grid, level_lookup=cache.load_levels,
                         level_names=levels)
    return detection_auroc(model, sets, store)


def main(sources: str = SOURCES, seed: int = 0, references: int = 4, threads: int = 2,
         out: Path = Path("resad_profile.json")) -> None:
    torch.set_num_threads(threads)
    backbone = create_backbone("effnet-lite0", 256)
    cache = FeatureCache(default_root(), backbone)
    levels = method_class("resad").feature_levels(backbone)
    rows = []
    for source in sources.split(","):
        folder = dataset_path(source)
        manifest = read_manifest(folder).reset_index(drop=True)
        cache.ensure([folder / p for p in manifest["image_path"]], list(manifest["image_sha256"]),
                     progress=False, levels=levels)
        for lr, epochs in CANDIDATES:
            overrides = {"lr": lr, "epochs": epochs, "milestones": (max(1, round(0.8 * epochs)),),
                         "val_fraction": VAL_FRACTION, "val_references": 0, "select": "last"}
            start = time.perf_counter()
            result = train_on_source(folder, cache.load, backbone_identity=backbone.identity, method="resad",
                                     profile="embedded", seed=seed, grid=backbone.grid, overrides=overrides,
                                     progress=False, extractor=backbone, level_lookup=cache.load_levels)
            trained = time.perf_counter() - start
            auroc = held_out_auroc(result, manifest, folder, backbone, cache, levels, seed, references)
            row = {"source": source, "seed": seed, "lr": lr, "epochs": epochs, "heldout_auroc": auroc,
                   "train_seconds": trained, "score_seconds": time.perf_counter() - start - trained}
            rows.append(row)
            print(f"{source} lr {lr:g} epochs {epochs}: held-out image AUROC {auroc:.3f} "
                  f"(training {trained:.0f} s, scoring {row['score_seconds']:.0f} s)", flush=True)
    means = {f"{lr:g} x {epochs}": sum(r["heldout_auroc"] for r in rows if (r["lr"], r["epochs"]) == (lr, epochs))
             / len(sources.split(",")) for lr, epochs in CANDIDATES}
    print(json.dumps({"mean_over_sources": means}, indent=2))
    out.write_text(json.dumps({"mean_over_sources": means, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
