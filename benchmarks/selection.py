"""Checkpoint selection on the SOURCE only: validation loss (24 episodes) against held-out AUROC.

    .venv/bin/python benchmarks/selection.py [--sources embedded-textures,...] [--seeds 0,1,2]
                                             [--references 4] [--threads 2] [--out selection.json]

For every (source, training seed) one model is trained with the embedded profile,
recording after every epoch (1) the validation loss on 24 fixed episodes (the old
rule, ``select = best``) and (2) the image AUROC of the held-out source images
against ``--references`` reference draws per category (the new rule,
``select = auroc``), also separately on two disjoint halves A and B of the
held-out images (one scoring per epoch serves all three). The new rule's epoch is then judged on the half it did not see
(choose on A, measure on B, and the reverse), so the comparison does not reward it
for measuring on its own selection set. Only the source is read; no target is
opened. Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import typer
from sklearn.metrics import roc_auc_score

from nagl.data.layout import read_manifest
from nagl.data.prepare import dataset_path
from nagl.io import stable_hash
from nagl.methods import create_method
from nagl.models.backbones import create_backbone
from nagl.models.cache import FeatureCache, default_root
from nagl.training.episodes import FeatureStore, split_source
from nagl.training.loop import train_on_source
from nagl.training.schedule import schedule_for
from nagl.training.selection import detection_sets, set_scores

SOURCES = "embedded-textures,embedded-medical,embedded-objects"


def query_halves(sets, seed: int) -> list[np.ndarray]:
    """Per selection set, a seeded 0/1 half of each of its queries."""
    return [np.array([int(stable_hash([seed, s.category, q, "half"]), 16) % 2 for q in s.queries]) for s in sets]


def mean_auroc(sets, scores, keep) -> float:
    """Mean over sets of the image AUROC of the kept queries (sets with one class left out)."""
    values = []
    for s, score, mask in zip(sets, scores, keep, strict=True):
        labels = np.asarray(s.labels)[mask]
        if len(set(labels)) == 2:
            values.append(roc_auc_score(labels, score[mask]))
    return float(np.mean(values))


def run_one(source: str, seed: int, references: int, backbone, cache) -> dict:
    folder = dataset_path(source)
    manifest = read_manifest(folder).reset_index(drop=True)
    # The loop keeps the last epoch and records the validation loss (24 episodes) of every
    # epoch; the hook scores the held-out images once per epoch for the AUROC rule.
    overrides = {"select": "last", "val_fraction": 0.2, "val_episodes": 24, "val_references": 0}
    schedule = schedule_for("embedded", **overrides)
    spec = create_method("nagl", backbone.dim).batch_spec(schedule.normal_shots, schedule.abnormal_shots)
    train_pool, val_pool, _ = split_source(manifest, spec, schedule.val_fraction, seed, source)
    sets = detection_sets(train_pool, val_pool, spec, references, seed)
    sides = query_halves(sets, seed)
    store = FeatureStore(manifest, folder, cache.load, backbone.grid, spec.mask_size)
    per_epoch: list[tuple[float, float, float]] = []
    scoring_seconds = []

    def score_epoch(epoch, model):
        start = time.perf_counter()
        scores = [set_scores(model, s, store) for s in sets]
        scoring_seconds.append(time.perf_counter() - start)
        per_epoch.append((mean_auroc(sets, scores, [np.ones(len(x), bool) for x in sides]),
                          mean_auroc(sets, scores, [x == 0 for x in sides]),
                          mean_auroc(sets, scores, [x == 1 for x in sides])))

    result = train_on_source(folder, cache.load, backbone_identity=backbone.identity, seed=seed,
                             grid=backbone.grid, overrides=overrides, progress=False, on_epoch=score_epoch)
    epochs = list(range(1, len(result.history)))
    loss = [result.history[e]["val_loss"] for e in epochs]
    full, auc_a, auc_b = ([per_epoch[e][i] for e in epochs] for i in range(3))
    old = epochs[int(np.argmin(loss))]
    new = epochs[int(np.argmax(full))]
    on_a, on_b = epochs[int(np.argmax(auc_a))], epochs[int(np.argmax(auc_b))]
    held = [(a + b) / 2 for a, b in zip(auc_a, auc_b, strict=True)]  # held-out AUROC, both halves
    return {
        "source": source, "seed": seed, "val_loss": loss, "select_auroc": full, "auroc_a": auc_a, "auroc_b": auc_b,
        "epoch_loss_rule": old, "epoch_auroc_rule": new, "agree": old == new,
        # held-out AUROC of the chosen epoch: the loss rule on both halves; the AUROC rule cross-fitted
        "heldout_loss_rule": held[old - 1],
        "heldout_auroc_rule": (auc_b[on_a - 1] + auc_a[on_b - 1]) / 2,
        "heldout_last": held[-1], "heldout_initial": (per_epoch[0][1] + per_epoch[0][2]) / 2,
        "n_selection_episodes": sum(len(s.queries) for s in sets),
        "seconds_training_and_loss_validation": result.seconds - sum(scoring_seconds),
        "seconds_auroc_selection": sum(scoring_seconds),
    }


def main(sources: str = SOURCES, seeds: str = "0,1,2", references: int = 4, threads: int = 2,
         out: Path = Path("selection.json")) -> None:
    torch.set_num_threads(threads)
    backbone = create_backbone("effnet-lite0", 256)
    cache = FeatureCache(default_root(), backbone)
    runs = []
    for source in sources.split(","):
        for seed in (int(s) for s in seeds.split(",")):
            row = run_one(source, seed, references, backbone, cache)
            runs.append(row)
            print(f"{source} seed {seed}: loss rule epoch {row['epoch_loss_rule']} "
                  f"(held-out AUROC {row['heldout_loss_rule']:.3f}), AUROC rule epoch {row['epoch_auroc_rule']} "
                  f"(cross-fitted {row['heldout_auroc_rule']:.3f}), last {row['heldout_last']:.3f}, "
                  f"initial {row['heldout_initial']:.3f}; {row['n_selection_episodes']} selection episodes; "
                  f"{row['seconds_training_and_loss_validation']:.0f} s training + loss validation, "
                  f"{row['seconds_auroc_selection']:.0f} s AUROC selection",
                  flush=True)
    summary = {
        "agreement": float(np.mean([r["agree"] for r in runs])),
        "heldout_loss_rule": float(np.mean([r["heldout_loss_rule"] for r in runs])),
        "heldout_auroc_rule": float(np.mean([r["heldout_auroc_rule"] for r in runs])),
        "heldout_last": float(np.mean([r["heldout_last"] for r in runs])),
        "heldout_initial": float(np.mean([r["heldout_initial"] for r in runs])),
        "seconds_training_and_loss_validation": float(np.mean([r["seconds_training_and_loss_validation"]
                                                               for r in runs])),
        "seconds_auroc_selection": float(np.mean([r["seconds_auroc_selection"] for r in runs])),
    }
    print(json.dumps(summary, indent=2))
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
