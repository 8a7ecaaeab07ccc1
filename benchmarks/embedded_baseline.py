"""How hard is the embedded benchmark? A normal-only nearest-neighbour baseline.

For each domain (preset), category, k in {1, 2, 4} and seed in {0, 1, 2}: k normal
references are drawn from train/good (nested: the first k of one seeded draw of
4), every test image is a query, a patch scores ``1 - max cosine similarity`` to
any reference patch (EfficientNet-Lite0 multi-scale patch features), an image
scores the mean of its top 1 % patches, and image AUROC comes from scikit-learn.

Prints a table per domain / category / k (mean and std over seeds), per-defect
AUROCs at k = 4, per-domain means and the build time.

    .venv/bin/python benchmarks/embedded_baseline.py            # builds into a temp dir
    .venv/bin/python benchmarks/embedded_baseline.py --data datasets   # uses datasets/embedded-*
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nagl.data.embedded import PRESETS, build  # noqa: E402
from nagl.data.images import load_rgb  # noqa: E402
from nagl.data.registry import DatasetSpec  # noqa: E402
from nagl.io import stable_hash  # noqa: E402
from nagl.models.backbones import create_backbone  # noqa: E402

SHOTS = (1, 2, 4)
SEEDS = (0, 1, 2)


def features(backbone, paths: list[Path], batch: int = 16) -> torch.Tensor:
    """L2-normalised patch features (N, G, C) of images on disk."""
    out = []
    for start in range(0, len(paths), batch):
        x = torch.stack([backbone.preprocess(load_rgb(p).copy()) for p in paths[start:start + batch]])
        out.append(torch.nn.functional.normalize(backbone(x), dim=-1))
    return torch.cat(out)


def image_scores(queries: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """Mean of the top 1 % patch scores, patch score = 1 - max cosine to a reference patch."""
    bank = references.reshape(-1, references.shape[-1])
    top = max(1, int(0.01 * queries.shape[1]))
    scores = []
    for query in queries:
        patch = 1.0 - (query @ bank.T).max(dim=1).values
        scores.append(patch.topk(top).values.mean().item())
    return np.asarray(scores)


def evaluate_category(backbone, root: Path, dataset: str, category: str) -> dict:
    train = sorted((root / category / "train" / "good").glob("*.png"))
    tests = sorted((root / category / "test").glob("*/*.png"))
    labels = np.array([p.parent.name != "good" for p in tests], dtype=int)
    defects = np.array([p.parent.name for p in tests])
    query_features = features(backbone, tests)
    result = {"auroc": {k: [] for k in SHOTS}, "by_defect": {}}
    for seed in SEEDS:
        rng = np.random.default_rng(int(stable_hash([dataset, category, seed]), 16))
        draw = rng.permutation(len(train))[:max(SHOTS)]
        reference_features = features(backbone, [train[i] for i in draw])
        for k in SHOTS:
            scores = image_scores(query_features, reference_features[:k])
            result["auroc"][k].append(roc_auc_score(labels, scores))
            if k == max(SHOTS):
                for defect in sorted(set(defects) - {"good"}):
                    keep = (defects == "good") | (defects == defect)
                    result["by_defect"].setdefault(defect, []).append(
                        roc_auc_score(labels[keep], scores[keep]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder holding embedded-<preset>/ (default: build to a temp dir)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--categories", nargs="+", help="only these categories (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = create_backbone("effnet-lite0")

    with tempfile.TemporaryDirectory(prefix="nagl-embedded-") as tmp:
        base = args.data or Path(tmp)
        domain_means = {}
        for preset in args.presets:
            if args.categories and not set(args.categories) & set(PRESETS[preset]):
                continue
            dataset = f"embedded-{preset}"
            root = base / dataset
            if args.data is None:
                started = time.perf_counter()
                options = {"preset": preset}
                if args.categories:
                    options["categories"] = [c for c in PRESETS[preset] if c in args.categories]
                build(DatasetSpec(dataset, "embedded", preset, options), root)
                count = sum(1 for _ in root.rglob("*.png"))
                print(f"built {dataset}: {count} PNG files in {time.perf_counter() - started:.1f} s")
            print(f"\n{dataset}")
            print(f"  {'category':<12} " + " ".join(f"{'k=' + str(k):>13}" for k in SHOTS)
                  + "   per-defect AUROC at k=4")
            per_k = {k: [] for k in SHOTS}
            for category in PRESETS[preset]:
                if args.categories and category not in args.categories:
                    continue
                result = evaluate_category(backbone, root, dataset, category)
                cells = []
                for k in SHOTS:
                    values = np.asarray(result["auroc"][k])
                    per_k[k].append(values.mean())
                    cells.append(f"{values.mean():.3f}+-{values.std():.3f}")
                by_defect = ", ".join(f"{d} {np.mean(v):.2f}" for d, v in result["by_defect"].items())
                print(f"  {category:<12} " + " ".join(f"{c:>13}" for c in cells) + f"   {by_defect}")
            means = [float(np.mean(per_k[k])) for k in SHOTS]
            domain_means[preset] = means
            print(f"  {'mean':<12} " + " ".join(f"{m:>13.3f}" for m in means)
                  + f"   (all k: {np.mean(means):.3f})")
        print("\nper-domain mean image AUROC")
        for preset, means in domain_means.items():
            print(f"  {preset:<10} " + "  ".join(f"k={k}: {m:.3f}" for k, m in zip(SHOTS, means, strict=False))
                  + f"  mean {np.mean(means):.3f}")


if __name__ == "__main__":
    main()
