"""Source-side evidence for issue 11 items 3-4: nagl vs nagl-cal vs knn-normal.

For every embedded SOURCE and training seed, trains (the `embedded` profile, cached
effnet-lite0 features) three heads with the generic loop:

- ``paper``: nagl-cal with the paper's loss forms and type-matched episodes; its head is
  exactly ``nagl``'s (same seed, episodes and loss), so it gives both nagl and nagl-cal;
- ``embedded-loss``: the same with ``loss_form = embedded`` (the former forms);
- ``unmatched``: ``match_defect_type = False`` (paper loss forms).

Each head is scored on the source's held-out validation images (the loop's split for
that seed) with test-like references: per category and reference seed (0, 1, 2), one
normal image and one anomaly of any defect type from the training pool, independent of
the query. Image AUROC per category, macro-averaged, mean over reference seeds.
nagl-cal's weight was calibrated on the loop's validation episodes, whose queries are the
same held-out images (with type-matched references): its numbers here are optimistic.
Nothing from a target dataset is read.

    nice python benchmarks/nagl_fidelity.py [--sources ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from nagl.data.layout import read_manifest
from nagl.data.prepare import dataset_path
from nagl.evaluate import feature_cache
from nagl.io import stable_hash
from nagl.methods import image_scores
from nagl.models.backbones import create_backbone
from nagl.training.episodes import FeatureStore, split_source
from nagl.training.loop import train_on_source
from nagl.training.schedule import schedule_for

VARIANTS = {"paper": {"match_defect_type": True}, "embedded-loss": {"loss_form": "embedded", "match_defect_type": True},
            "unmatched": {"match_defect_type": False}}


def held_out_auroc(model, manifest, store, seed, source, ref_seeds=(0, 1, 2)):
    """{name: AUROC} for knn-normal (w=0), nagl (w=1) and nagl-cal (calibrated w)."""
    schedule = schedule_for("embedded")
    spec = model.batch_spec(schedule.normal_shots, schedule.abnormal_shots)
    train, val, _ = split_source(manifest, spec, schedule.val_fraction, seed, source)
    weight = model.config["abnormal_weight"]
    out = {"knn-normal": [], "nagl": [], "nagl-cal": []}
    for r in ref_seeds:
        per_cat = {k: [] for k in out}
        for category in train.categories():
            queries = val.normals.get(category, []) + [i for v in val.anomalies.get(category, {}).values() for i in v]
            labels = np.array([int(store.items.at[i, "label"]) for i in queries])
            if len(set(labels.tolist())) < 2:
                continue
            rng = np.random.default_rng(int(stable_hash([source, category, r, "fidelity-refs"]), 16))
            normals = train.normals[category]
            anomalies = sorted(i for v in train.anomalies[category].values() for i in v)
            normal = [normals[rng.integers(len(normals))]]
            abnormal = [anomalies[rng.integers(len(anomalies))]]
            masks = torch.stack([store.mask(i) for i in abnormal])
            q = store.features(queries)
            model.config["abnormal_weight"] = 0.0
            s0 = model.score(q, store.features(normal), store.features(abnormal), masks, store.grid)
            model.config["abnormal_weight"] = 1.0
            s_a = model.score(q, store.features(normal), store.features(abnormal), masks, store.grid) - s0
            for name, w in (("knn-normal", 0.0), ("nagl", 1.0), ("nagl-cal", weight)):
                per_cat[name].append(roc_auc_score(labels, image_scores(s0 + w * s_a).numpy()))
        for name in out:
            out[name].append(float(np.mean(per_cat[name])))
    model.config["abnormal_weight"] = weight
    return {k: float(np.mean(v)) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", nargs="+", default=["embedded-textures", "embedded-medical", "embedded-objects"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = create_backbone("effnet-lite0", 256)
    cache = feature_cache(backbone)
    for source in args.sources:
        folder = dataset_path(source)
        manifest = read_manifest(folder).reset_index(drop=True)
        for variant in args.variants:
            for seed in args.seeds:
                start = time.perf_counter()
                result = train_on_source(folder, cache.load, backbone_identity=backbone.identity, method="nagl-cal",
                                         seed=seed, grid=backbone.grid, method_settings=VARIANTS[variant],
                                         progress=False)
                store = FeatureStore(manifest, folder, cache.load, backbone.grid, mask_size=256)
                row = {"source": source, "seed": seed, "variant": variant,
                       "lambda": result.method.config["abnormal_weight"],
                       "selected_epoch": result.selected_epoch,
                       **held_out_auroc(result.method, manifest, store, seed, str(manifest["dataset"].iloc[0])),
                       "seconds": round(time.perf_counter() - start, 1)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
