"""Time `pixel_metrics` on one evaluation cell's worth of maps: 35 queries at 128 and 256 px.

Run: .venv/bin/python benchmarks/metrics.py
Prints the best of a few repetitions for float32 maps (what methods produce) and
for float64 maps (the general sorting path).
"""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage

from nagl.metrics import image_metrics, pixel_metrics

N_MAPS = 35
REPEATS = 5


def cell(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Half the queries carry a few blob-shaped defects; maps are smooth noise plus signal."""
    noise = ndimage.gaussian_filter(rng.random((N_MAPS, size, size)), sigma=(0, size / 32, size / 32))
    masks = np.zeros((N_MAPS, size, size), dtype=bool)
    for i in range(0, N_MAPS, 2):
        masks[i] = noise[i] > np.quantile(noise[i], 0.97)
    maps = ndimage.gaussian_filter(rng.random(masks.shape), sigma=(0, 4, 4)) + 0.1 * masks
    return masks, maps


def best_time(fn) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"pixel_metrics on {N_MAPS} maps (best of {REPEATS})")
    for size in (128, 256):
        masks, maps = cell(size, rng)
        for dtype in (np.float32, np.float64):
            typed = maps.astype(dtype)
            seconds = best_time(lambda m=masks, t=typed: pixel_metrics(m, t))
            values = pixel_metrics(masks, typed)
            pretty = ", ".join(f"{k}={v:.4f}" for k, v in values.items())
            print(f"  {size:>3} px  {np.dtype(dtype).name:<7}  {masks.size / 1e6:5.2f} M pixels  {seconds * 1000:7.1f} ms  ({pretty})")
    labels = rng.integers(0, 2, N_MAPS)
    scores = rng.random(N_MAPS) + labels
    seconds = best_time(lambda: image_metrics(labels, scores))
    print(f"image_metrics on {N_MAPS} scores: {seconds * 1e6:.0f} us")


if __name__ == "__main__":
    main()
