"""Time and minor page faults of one evaluation cell's worth of work, stage by stage.

Run: .venv/bin/python benchmarks/metrics.py [--repeats 5]

(1) `pixel_metrics` on 35 queries at 128 and 256 px, float32 maps (what methods
produce) and float64 (the general sorting path). (2) One cell as the evaluation
job runs it: scoring of 35 queries (a 32x32 grid of 152-wide features, k_normal = 4)
in batches of 8 by knn-normal, and by nagl (an untrained head, one abnormal
reference with a mask), image scores, 256 px anomaly maps, pixel metrics.
Prints the best time of the repeats and the fewest minor page faults
(resource.getrusage ru_minflt) of one repetition, after one warm-up.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from scipy import ndimage

from nagl.methods import create_method
from nagl.methods.base import anomaly_maps, image_scores
from nagl.metrics import image_metrics, pixel_metrics

N_MAPS = 35
QUERY_BATCH = 8  # as nagl.evaluate scores the queries
GRID, DIM, K_NORMAL, RESOLUTION = (32, 32), 152, 4, 256


def cell(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Half the queries carry a few blob-shaped defects; maps are smooth noise plus signal."""
    noise = ndimage.gaussian_filter(rng.random((N_MAPS, size, size)), sigma=(0, size / 32, size / 32))
    masks = np.zeros((N_MAPS, size, size), dtype=bool)
    for i in range(0, N_MAPS, 2):
        masks[i] = noise[i] > np.quantile(noise[i], 0.97)
    maps = ndimage.gaussian_filter(rng.random(masks.shape), sigma=(0, 4, 4)) + 0.1 * masks
    return masks, maps


def measure(fn, repeats: int) -> tuple[float, int]:
    """(best seconds, fewest minor page faults) over ``repeats`` calls after one warm-up."""
    fn()
    times, faults = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(times), min(faults)


def one_cell(repeats: int) -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(N_MAPS, GRID[0] * GRID[1], DIM, generator=generator)
    normal = torch.randn(K_NORMAL, GRID[0] * GRID[1], DIM, generator=generator)
    masks, _ = cell(RESOLUTION, np.random.default_rng(1))
    abnormal = torch.randn(1, GRID[0] * GRID[1], DIM, generator=generator)
    abnormal_mask = torch.zeros(1, RESOLUTION, RESOLUTION)
    abnormal_mask[0, 100:140, 90:150] = 1
    knn, nagl = create_method("knn-normal", dim=DIM), create_method("nagl", dim=DIM)
    state = {}

    def score() -> None:
        state["S"] = torch.cat([knn.score(query[b:b + QUERY_BATCH], normal, grid=GRID)
                                for b in range(0, N_MAPS, QUERY_BATCH)])

    def score_nagl() -> None:
        state["S_nagl"] = torch.cat([nagl.score(query[b:b + QUERY_BATCH], normal, abnormal, abnormal_mask, GRID)
                                     for b in range(0, N_MAPS, QUERY_BATCH)])

    def post() -> None:
        state["scores"] = image_scores(state["S"])
        state["maps"] = anomaly_maps(state["S"], RESOLUTION).numpy()

    def metrics() -> None:
        state["pixel"] = pixel_metrics(masks, state["maps"])

    print(f"one cell: {N_MAPS} queries, grid {GRID[0]}x{GRID[1]}, dim {DIM}, "
          f"k_normal {K_NORMAL}, maps {RESOLUTION} px (best of {repeats})")
    for name, fn in (("knn-normal", score), ("nagl, 1 abn.", score_nagl), ("scores+maps", post),
                     ("pixel metrics", metrics)):
        seconds, faults = measure(fn, repeats)
        print(f"  {name:<14} {seconds * 1000:8.1f} ms  {faults:8d} minor faults")
    pretty = ", ".join(f"{k}={v:.6f}" for k, v in state["pixel"].items())
    print(f"  check: score sums {float(state['S'].double().sum()):.6f} (knn-normal), "
          f"{float(state['S_nagl'].double().sum()):.6f} (nagl); {pretty}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as an evaluation job runs (threads: 1)
    rng = np.random.default_rng(0)
    print(f"pixel_metrics on {N_MAPS} maps (best of {args.repeats})")
    for size in (128, 256):
        masks, maps = cell(size, rng)
        for dtype in (np.float32, np.float64):
            typed = maps.astype(dtype)
            seconds, faults = measure(lambda m=masks, t=typed: pixel_metrics(m, t), args.repeats)
            values = pixel_metrics(masks, typed)
            pretty = ", ".join(f"{k}={v:.4f}" for k, v in values.items())
            print(f"  {size:>3} px  {np.dtype(dtype).name:<7}  {masks.size / 1e6:5.2f} M pixels  "
                  f"{seconds * 1000:7.1f} ms  {faults:7d} minor faults  ({pretty})")
    labels = rng.integers(0, 2, N_MAPS)
    scores = rng.random(N_MAPS) + labels
    seconds, _ = measure(lambda: image_metrics(labels, scores), args.repeats)
    print(f"image_metrics on {N_MAPS} scores: {seconds * 1e6:.0f} us")
    one_cell(args.repeats)


if __name__ == "__main__":
    main()
