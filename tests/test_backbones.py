"""Backbone registry: shapes, grids, identities of every backbone kind."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from nagl.errors import NaglError
from nagl.models.backbones import backbone_info, create_backbone, list_backbones

torch.set_num_threads(1)


def _images(count: int, height: int = 70, width: int = 90) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("name", ["tiny-dinov2", "tiny-clip"])
def test_tiny_vit_backbones_give_patch_grids(name):
    backbone = create_backbone(name)
    size = backbone.image_size
    batch = torch.stack([backbone.preprocess(image) for image in _images(2)])
    assert batch.shape == (2, 3, size, size)

    features = backbone(batch)

    h, w = backbone.grid
    assert features.shape == (2, h * w, backbone.dim)
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])  # different images, different features
    assert not any(p.requires_grad for p in backbone.parameters())
    # seeded random init: a second build gives the same features
    assert torch.equal(create_backbone(name)(batch), features)


def test_tiny_dims_come_from_the_model_config():
    dinov2 = create_backbone("tiny-dinov2")
    assert (dinov2.grid, dinov2.dim) == ((4, 4), 48)  # 56 px / patch 14; embed_dim 48, no prefix tokens
    clip = create_backbone("tiny-clip")
    assert (clip.grid, clip.dim) == ((4, 4), 2 * 64)  # two blocks of width 64 concatenated


def test_real_architectures_grid_and_dim():
    expected = {
        "dinov2-vits14": (448, (32, 32), 384),
        "clip-vit-b-16-plus-240": (240, (15, 15), 2 * 896),
        "clip-vit-b-16-plus-240-e32": (240, (15, 15), 2 * 896),
        "clip-vit-l-14-336": (336, (24, 24), 2 * 1024),
        "effnet-lite0": (256, (32, 32), 40 + 112),
        "wide-resnet50-2": (224, (28, 28), 512 + 1024),
    }
    for name, (size, grid, dim) in expected.items():
        info = backbone_info(name)
        assert (info["image_size"], info["grid"], info["dim"]) == (size, grid, dim), name
    assert backbone_info("dinov2-vits14", image_size=224)["grid"] == (16, 16)
    assert set(expected) | {"tiny-dinov2", "tiny-clip"} == set(list_backbones())


def test_real_dinov2_architecture_drops_the_class_token():
    backbone = create_backbone("dinov2-vits14", image_size=112, random_init=True)
    features = backbone(torch.stack([backbone.preprocess(image) for image in _images(1)]))
    assert features.shape == (1, 8 * 8, 384)
    assert backbone.identity == "dinov2-vits14@112:random-seed0"


def test_effnet_lite0_with_its_packaged_weights():
    backbone = create_backbone("effnet-lite0")
    assert re.fullmatch(r"effnet-lite0@256:[0-9a-f]{16}", backbone.identity)
    batch = torch.stack([backbone.preprocess(image) for image in _images(2, 300, 260)])
    features = backbone(batch)
    assert features.shape == (2, 32 * 32, 152)
    assert torch.isfinite(features).all()
    assert torch.equal(backbone(batch), features)
    random = create_backbone("effnet-lite0", random_init=True)
    assert random.identity == "effnet-lite0@256:random-seed0"
    assert not torch.allclose(random(batch), features)


def test_settings_that_change_features_change_the_identity():
    default = create_backbone("tiny-clip")
    one_block = create_backbone("tiny-clip", layers=(2,))
    assert one_block.dim == 64
    assert default.identity == "tiny-clip@64/blocks=0+1:random-seed0"
    assert one_block.identity == "tiny-clip@64/blocks=2:random-seed0"
    assert create_backbone("tiny-clip", seed=1).identity != default.identity
    bigger = create_backbone("tiny-clip", image_size=96)
    assert bigger.grid == (6, 6) and bigger.identity != default.identity
    # CLIP normalisation, not ImageNet's, and it is part of the cache key
    assert "0.48145466" in default.preprocessing
    assert "0.485" in create_backbone("tiny-dinov2").preprocessing


def test_bad_settings_are_user_errors():
    with pytest.raises(NaglError, match="image_size must be a multiple of 14"):
        create_backbone("tiny-dinov2", image_size=60)
    with pytest.raises(NaglError, match="image_size must be a multiple of 16"):
        create_backbone("tiny-clip", image_size=70)
    with pytest.raises(NaglError, match=r"layers=\(3,\).*0\.\.2"):
        create_backbone("tiny-clip", layers=(3,))
    with pytest.raises(NaglError, match="unknown backbone 'nope'"):
        create_backbone("nope")
    with pytest.raises(NaglError, match="'effnet-lite0'.*unexpected keyword argument 'layers'.*image_size"):
        create_backbone("effnet-lite0", layers=(1,))
    backbone = create_backbone("tiny-dinov2")
    with pytest.raises(NaglError, match="expected an RGB uint8 image"):
        backbone.preprocess(np.zeros((8, 8), dtype=np.uint8))


@pytest.mark.parametrize("name, kwargs", [("effnet-lite0", {"image_size": 64}), ("tiny-clip", {})])
def test_a_described_backbone_stands_for_the_network_until_features_are_computed(name, kwargs):
    """Evaluation reads the backbone from its features step's stamp (no timm import, no weights):
    the description has the network's shapes, levels and cache key, and builds the network only
    to compute features, refusing weights that changed since the description."""
    import json

    from nagl.models.backbones import DescribedBackbone, describe_backbone

    backbone = create_backbone(name, **kwargs)
    described = DescribedBackbone(json.loads(json.dumps(describe_backbone(backbone))))
    for attribute in ("identity", "preprocessing", "grid", "dim", "levels", "level_groups", "default_slices",
                      "embed_dim", "image_size"):
        assert getattr(described, attribute) == getattr(backbone, attribute), attribute
    for level in [*backbone.levels, "default"]:
        assert described.level_shape(level) == backbone.level_shape(level)
    assert described._network is None  # nothing above needed the network
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    x = described.preprocess(image)[None]
    assert described._network is not None
    assert torch.equal(described.extract_levels(x, ["default"])["default"], backbone.extract_levels(x, ["default"])["default"])

    stale = DescribedBackbone({**describe_backbone(backbone), "weights_id": "0" * 16})
    with pytest.raises(NaglError, match="weights changed"):
        stale.preprocess(image)
