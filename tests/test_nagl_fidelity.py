"""NAGL's fidelity to the reference (initialisation, loss forms) and the source-calibrated
``nagl-cal``, on REAL effnet-lite0 features of small embedded datasets."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nagl.data import embedded, layout
from nagl.data.images import load_mask
from nagl.data.registry import DatasetSpec
from nagl.errors import NaglError
from nagl.methods import create_method, load_method
from nagl.methods.base import prepare_references
from nagl.methods.nagl import _abnormal_tokens, dice_loss, image_loss, pixel_loss, sigmoid_focal_loss
from nagl.models.backbones import create_backbone
from nagl.models.cache import FeatureCache
from nagl.training.batch import BatchSpec
from nagl.training.episodes import draw_episode, split_source
from nagl.training.loop import train_on_source

COUNTS = {"train_good": 6, "test_good": 3, "test_anomalous": 12}  # 4 defect types of 3 images


def _build(root: Path, name: str, preset: str, categories: list[str], cache: FeatureCache) -> tuple[Path, object]:
    dataset = root / "datasets" / name
    embedded.build(DatasetSpec(name, "embedded", "test", {"preset": preset, "categories": categories,
                                                          "counts": COUNTS}), dataset)
    manifest = layout.write_manifest(dataset, name)
    cache.ensure([dataset / p for p in manifest["image_path"]], list(manifest["image_sha256"]), progress=False)
    return dataset, manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A source (two texture categories) and a target (one medical category), both cached."""
    root = tmp_path_factory.mktemp("fidelity")
    backbone = create_backbone("effnet-lite0")
    cache = FeatureCache(root / "cache" / "features", backbone)
    source, source_manifest = _build(root, "tiny-source", "textures", ["brick", "gravel"], cache)
    target, target_manifest = _build(root, "tiny-target", "medical", ["histology"], cache)
    return {"source": source, "manifest": source_manifest, "target": target, "target_manifest": target_manifest,
            "cache": cache, "backbone": backbone}


# -- initialisation ------------------------------------------------------------------------

def test_proxies_are_not_collapsed_after_residual_mining_at_initialisation(data):
    manifest, source, cache, grid = data["manifest"], data["source"], data["cache"], data["backbone"].grid
    normal_row = manifest[manifest["label"] == 0].iloc[0]
    abnormal_row = manifest[manifest["label"] == 1].iloc[0]
    normal, abnormal = cache.load([normal_row["image_sha256"]]), cache.load([abnormal_row["image_sha256"]])
    mask = torch.from_numpy(load_mask(source / abnormal_row["mask_path"], 256))[None]
    refs = prepare_references(normal, abnormal, mask, grid)
    for seed in (0, 1):
        method = create_method("nagl", data["backbone"].dim, seed=seed)
        keys, values, allowed = _abnormal_tokens(refs, method.position(grid))
        with torch.no_grad():
            proxies = method.head.residual_proxies(keys[None], values[None], allowed[None])[0]
        unit = F.normalize(proxies, dim=-1)
        cosine = (unit @ unit.T)[~torch.eye(len(unit), dtype=torch.bool)]
        assert cosine.max() < 0.99, f"seed {seed}: the 25 proxies collapsed (max pairwise cosine {cosine.max():.4f})"


def test_attention_initialisation_is_xavier_uniform_with_zero_biases():
    dim = 64
    method = create_method("nagl", dim, seed=3)
    layer = method.head.rm_cross
    bound = math.sqrt(6.0 / (dim + 3 * dim))  # one xavier draw over the stacked (3C, C) projection
    for projection in (layer.q, layer.k, layer.v):
        assert projection.weight.abs().max() <= bound and projection.weight.abs().max() > 0.9 * bound
        assert torch.equal(projection.bias, torch.zeros(dim))
    assert torch.equal(layer.out.bias, torch.zeros(dim))
    assert 0.8 < float(method.head.proxies.detach().std()) < 1.2  # N(0, 1)


# -- loss forms ----------------------------------------------------------------------------

def test_paper_image_loss_is_the_two_class_softmax_cross_entropy_of_the_logits():
    t, labels = torch.tensor([0.2, 0.9]), torch.tensor([0.0, 1.0])
    # label 0, logits [0.8, 0.2]; label 1, logits [0.1, 0.9]
    expected = (-math.log(math.exp(0.8) / (math.exp(0.8) + math.exp(0.2)))
                - math.log(math.exp(0.9) / (math.exp(0.1) + math.exp(0.9)))) / 2
    assert float(image_loss(t, labels, "paper")) == pytest.approx(expected, rel=1e-6)
    assert float(image_loss(t, labels, "embedded")) == pytest.approx(-(math.log(0.8) + math.log(0.9)) / 2, rel=1e-6)


def test_sigmoid_focal_loss_equals_hand_computed_values():
    logits, target = torch.tensor([0.3, 0.7]), torch.tensor([1.0, 0.0])
    p1, p2 = 1 / (1 + math.exp(-0.3)), 1 / (1 + math.exp(-0.7))
    expected = (0.25 * (1 - p1) ** 2 * -math.log(p1) + 0.75 * p2 ** 2 * -math.log(1 - p2)) / 2
    assert float(sigmoid_focal_loss(logits, target, 0.25, 2.0)) == pytest.approx(expected, rel=1e-6)


def test_paper_pixel_loss_is_sigmoid_focal_plus_channel_softmax_dice_summed():
    s_n, s_a = [0.9, 0.2], [0.1, 0.6]
    maps = torch.tensor([[[s_n], [s_a]]]).transpose(2, 3)  # (1, 2, 2, 1): two pixels
    mask = [0.0, 1.0]
    target = torch.tensor([[[[1 - m] for m in mask], [[m] for m in mask]]])
    sig = [[1 / (1 + math.exp(-v)) for v in channel] for channel in (s_n, s_a)]
    truth = [[1 - m for m in mask], mask]
    focal = []
    for c in range(2):
        for i in range(2):
            p, y = sig[c][i], truth[c][i]
            p_t = p if y else 1 - p
            focal.append((0.25 if y else 0.75) * (1 - p_t) ** 2 * -math.log(p_t))
    soft = [[math.exp(s_n[i]) / (math.exp(s_n[i]) + math.exp(s_a[i])) for i in range(2)]]
    soft.append([1 - v for v in soft[0]])
    dice = sum(1 - (2 * sum(soft[c][i] * truth[c][i] for i in range(2)) + 1) / (sum(soft[c]) + sum(truth[c]) + 1)
               for c in range(2))
    assert float(pixel_loss(maps, target, "paper", 0.25, 2.0)) == pytest.approx(sum(focal) / 4 + dice, rel=1e-6)
    # the embedded form averages its dice over the channels and takes the maps as probabilities
    assert float(dice_loss(maps, target)) == pytest.approx(float(dice_loss(maps, target, channels="sum")) / 2)


def test_nagl_rejects_an_unknown_loss_form():
    with pytest.raises(NaglError, match="loss_form"):
        create_method("nagl", 16, loss_form="mean-squared")


# -- episodes: match_defect_type --------------------------------------------------------------

@pytest.mark.parametrize("match", [True, False])
def test_match_defect_type_gives_references_of_the_same_or_another_type(data, match):
    manifest = data["manifest"]
    spec = BatchSpec((1,), (1,), mask_size=256, abnormal_query_rate=1.0, match_defect_type=match)
    pool, _, _ = split_source(manifest, spec, 0.0, 0, "tiny-source")
    rng = np.random.default_rng(0)
    for _ in range(40):
        episode = draw_episode(pool, rng, spec)
        query_type = manifest.at[episode.query, "defect_type"]
        reference_types = {manifest.at[row, "defect_type"] for row in episode.abnormal}
        assert reference_types == {episode.defect}
        assert (query_type == episode.defect) is match
        assert episode.query not in episode.abnormal


# -- nagl-cal -------------------------------------------------------------------------------

def _train_cal(data, **settings):
    return train_on_source(data["source"], data["cache"].load, backbone_identity="effnet-lite0@test",
                           method="nagl-cal", seed=0, grid=data["backbone"].grid, progress=False,
                           overrides=dict(epochs=1, episodes=4, batch=2, select="best", val_fraction=0.3,
                                          val_episodes=12, milestones=[]), **settings)


def test_nagl_cal_calibrates_on_the_source_only_and_keeps_its_weight_through_save_and_load(data, tmp_path):
    opened: list[str] = []
    recording = [True]

    def audit(event, args):
        if recording[0] and event == "open" and isinstance(args[0], str | Path):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed; this one stops recording below
    try:
        result = _train_cal(data, out_dir=tmp_path / "ckpt")
    finally:
        recording[0] = False
    target_shas = set(data["target_manifest"]["image_sha256"])
    source_shas = set(data["manifest"]["image_sha256"])
    assert not [p for p in opened if str(data["target"]) in p or Path(p).stem in target_shas]
    assert any(Path(p).stem in source_shas for p in opened)  # the hook saw the source's feature files

    calibration = result.metadata["calibration"]
    weight = result.method.config["abnormal_weight"]
    # calibrated on the held-out source episodes: the selection's reference draws over the held-out images
    assert calibration["abnormal_weight"] == weight
    assert calibration["n_episodes"] == result.metadata["training"]["n_selection_episodes"] > 12
    assert calibration["val_auroc"][str(weight)] == max(calibration["val_auroc"].values())

    restored = load_method(tmp_path / "ckpt")
    assert restored.name == "nagl-cal" and restored.config["abnormal_weight"] == weight
    features = data["cache"].load(list(data["manifest"]["image_sha256"][:4]))
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 10:30, 10:30] = True
    grid = data["backbone"].grid
    assert torch.equal(restored.score(features[:2], features[2:3], features[3:4], masks, grid),
                       result.method.score(features[:2], features[2:3], features[3:4], masks, grid))


def test_nagl_cal_merge_uses_its_weight_and_its_calibration_needs_a_validation_split(data):
    method = create_method("nagl-cal", 16, abnormal_weight=0.25)
    s_n, s_a = torch.tensor([0.9, 0.5]), torch.tensor([0.4, 0.8])
    assert torch.allclose(method.merge(s_n, s_a), torch.tensor([0.2, 0.7]))
    with pytest.raises(NaglError, match="validation"):
        train_on_source(data["source"], data["cache"].load, backbone_identity="effnet-lite0@test",
                        method="nagl-cal", seed=0, grid=data["backbone"].grid, progress=False,
                        overrides=dict(epochs=1, episodes=2, batch=2, select="last", val_fraction=0.0,
                                       val_episodes=0, milestones=[]))
    with pytest.raises(NaglError, match="abnormal_weight"):
        create_method("nagl-cal", 16, abnormal_weight=-1)
