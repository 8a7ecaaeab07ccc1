"""Backbone throughput and feature-cache size per image.

    .venv/bin/python benchmarks/backbones.py [--backbone effnet-lite0] [--threads 2]

Prints (1) forward images/s on already-preprocessed batches, (2) end-to-end
images/s of ``FeatureCache.ensure`` on PNG files (read, hash, preprocess,
forward, write), (3) bytes per image on disk. Images are seeded random PNGs.
``--random-init`` times an architecture without its weights (speed only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nagl.io import sha256_file
from nagl.models.backbones import create_backbone
from nagl.models.cache import FeatureCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="effnet-lite0")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--random-init", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    kwargs = {"random_init": True} if args.random_init else {}
    backbone = create_backbone(args.backbone, args.image_size, **kwargs)
    size = backbone.image_size
    rng = np.random.default_rng(0)
    count = args.batch_size * args.batches
    images = [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(count)]

    batches = [torch.stack([backbone.preprocess(im) for im in images[i:i + args.batch_size]])
               for i in range(0, count, args.batch_size)]
    backbone(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        backbone(batch)
    forward = count / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for index, image in enumerate(images):
            path = Path(tmp) / f"{index}.png"
            Image.fromarray(image).save(path)
            paths.append(path)
        shas = [sha256_file(p) for p in paths]
        cache = FeatureCache(Path(tmp) / "cache", backbone)
        start = time.perf_counter()
        cache.ensure(paths, shas, batch_size=args.batch_size, progress=False)
        end_to_end = count / (time.perf_counter() - start)
        per_image = cache.path(shas[0]).stat().st_size

    h, w = backbone.grid
    print(f"backbone        {backbone.identity}")
    print(f"input           {size}x{size} px, grid {h}x{w}, dim {backbone.dim}, torch threads {args.threads}")
    print(f"forward         {forward:.1f} images/s (batch {args.batch_size}, {count} images)")
    print(f"ensure (PNG in) {end_to_end:.1f} images/s")
    print(f"on disk         {per_image} bytes/image ({h * w} x {backbone.dim} float16 + npy header)")


if __name__ == "__main__":
    main()
