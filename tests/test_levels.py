"""Multi-level features (issue 9): backbone levels, the per-level feature cache, and the
harness hooks multi-level methods use, exercised with toy methods registered here
(like tests/test_contracts.py does) on real effnet-lite0 features of small embedded datasets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nagl.config import validate_config, write_effective_config
from nagl.data.images import load_rgb
from nagl.errors import NaglError
from nagl.methods import METHODS, Method, TrainableMethod, create_method, feature_levels, list_methods, method_class
from nagl.methods.base import normal_scores
from nagl.models.backbones import EMBED, backbone_shapes, create_backbone
from nagl.models.cache import FeatureCache, cache_summary
from nagl.training import schedule as schedules
from nagl.training.batch import BatchSpec, EpisodeBatch
from nagl.training.schedule import Schedule, register_profile, schedule_for

SIZE = 64  # effnet-lite0 at 64 px: default grid 8x8; stride4/8/16 grids 16/8/4


# -- toy methods -------------------------------------------------------------------------

def _nearest_distance(query: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """``(Q, G)``: 1 - sim of each query patch to its nearest normal patch."""
    return 1.0 - normal_scores(query.float(), normal.reshape(-1, normal.shape[-1]).float())


def _level_map(query: dict, normal: dict, grids: dict, names) -> torch.Tensor:
    """Mean over levels of the nearest-normal distance, each upsampled to the first level's grid."""
    first = tuple(grids[names[0]])
    maps = []
    for name in names:
        h, w = grids[name]
        distance = _nearest_distance(query[name], normal[name]).reshape(-1, 1, h, w)
        maps.append(F.interpolate(distance, size=first, mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(maps).mean(dim=0)


class ToyPyramid(Method):
    """Normal-only toy on the pyramid levels + embedding; image score = max of the pixel map."""

    name = "toy-pyramid"
    trainable = False
    level_group = "pyramid"
    needs_embed = True
    uses_abnormal_refs = False
    image_scores_need_pixels = True
    categories_seen: list[str | None] = []
    pixel_shapes: list[tuple[int, ...]] = []

    def __init__(self, dim: int, levels: dict, embed_dim: int | None):
        super().__init__(dim, levels=levels, embed_dim=embed_dim)

    @torch.no_grad()
    def score(self, query, normal=None, abnormal=None, abnormal_masks=None, grid=None, *, category=None):
        assert set(query) == {*self.config["levels"], EMBED}
        assert abnormal is None or all(v.shape[0] == 0 for v in abnormal.values())
        ToyPyramid.categories_seen.append(category)
        names = list(self.config["levels"])
        embed = 1 - F.cosine_similarity(query[EMBED], normal[EMBED].mean(dim=0, keepdim=True), dim=-1)
        return _level_map(query, normal, grid, names) + embed[:, None, None]

    def image_scores(self, patch_maps, pixel_maps):
        ToyPyramid.pixel_shapes.append(tuple(pixel_maps.shape))
        return pixel_maps.flatten(1).amax(dim=1)


class ToyPatch(Method):
    """Toy on the same-grid patch levels that returns its own image scores (offset by 100, to be seen)."""

    name = "toy-patch"
    trainable = False
    level_group = "patch"

    def __init__(self, dim: int, levels: dict, embed_dim: int | None):
        super().__init__(dim, levels=levels, embed_dim=embed_dim)

    @torch.no_grad()
    def score(self, query, normal=None, abnormal=None, abnormal_masks=None, grid=None, *, category=None):
        maps = _level_map(query, normal, grid, list(self.config["levels"]))
        return maps, 100.0 + maps.flatten(1).mean(dim=1)


class ToyTrained(TrainableMethod):
    """Trainable normal-only toy: balanced batches, a first normal-only epoch, a linear head on
    the embedding residual; records what the loop hands it."""

    name = "toy-trained"
    level_group = "patch"
    needs_embed = True
    uses_abnormal_refs = False
    record: dict[str, list] = {}

    def __init__(self, dim: int, levels: dict, embed_dim: int | None, seed: int = 0):
        super().__init__(dim, levels=levels, embed_dim=embed_dim, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(embed_dim, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, embed_dim, generator=generator) * 0.01)
            self.head.bias.zero_()

    def _image_logits(self, query_embed, normal_embed):
        return self.head(query_embed - normal_embed).squeeze(-1)

    @torch.no_grad()
    def score(self, query, normal=None, abnormal=None, abnormal_masks=None, grid=None, *, category=None):
        maps = _level_map(query, normal, grid, list(self.config["levels"]))
        mean = normal[EMBED].mean(dim=0, keepdim=True).expand_as(query[EMBED])
        return maps, torch.sigmoid(self._image_logits(query[EMBED], mean))

    def batch_spec(self, normal_shots, abnormal_shots) -> BatchSpec:
        return BatchSpec(tuple(normal_shots), (0,), level_group="patch", needs_embed=True, balanced=True,
                         normal_only_epochs=1, calibration_images=5)

    def loss(self, batch: EpisodeBatch):
        query = batch.query_levels()
        normal = torch.stack([batch.normal_levels(i)[EMBED].mean(dim=0) for i in range(len(batch))])
        logits = self._image_logits(query[EMBED], normal)
        return F.binary_cross_entropy_with_logits(logits, batch.labels()), torch.sigmoid(logits).detach()

    def training_step(self, batch, optimisers):
        record = ToyTrained.record
        record.setdefault("labels", []).append(batch.labels().tolist())
        record.setdefault("self_reference", []).append(any(e.query in e.normal for e in batch.episodes))
        record.setdefault("categories", []).append(batch.categories() == [e.category for e in batch.episodes])
        record.setdefault("query_shapes", []).append({k: tuple(v.shape) for k, v in batch.query_levels().items()})
        record.setdefault("optimisers", []).append(len(optimisers))
        return super().training_step(batch, optimisers)

    def calibrate(self, batches):
        episodes = [e for batch in batches for e in batch.episodes]
        ToyTrained.record["calibration"] = [(e.label, e.query in e.normal, len(e.normal), e.abnormal)
                                            for e in episodes]
        ToyTrained.record["calibration_after_epoch"] = len(ToyTrained.record["epochs"])

    def start_epoch(self, epoch, epochs):
        ToyTrained.record.setdefault("epochs", []).append((epoch, epochs))

    def trainable_module(self):
        return self.head

    def state_dict(self):
        return dict(self.head.state_dict())

    def load_state_dict(self, state):
        self.head.load_state_dict(state)


TOYS = (ToyPyramid, ToyPatch, ToyTrained)


@pytest.fixture
def toys(monkeypatch):
    for cls in TOYS:
        monkeypatch.setitem(METHODS.entries, cls.name, cls)
    monkeypatch.setattr(ToyPyramid, "categories_seen", [])
    monkeypatch.setattr(ToyPyramid, "pixel_shapes", [])
    monkeypatch.setattr(ToyTrained, "record", {})
    return TOYS


# -- data -----------------------------------------------------------------------------

REGISTRY = """
datasets:
  lv-source:
    kind: embedded
    domain: industrial-texture
    preset: textures
    categories: [brick, gravel]
    counts: {train_good: 6, test_good: 3, test_anomalous: 8}
  lv-target:
    kind: embedded
    domain: industrial-object
    preset: objects
    categories: [coins]
    counts: {train_good: 4, test_good: 5, test_anomalous: 6}
"""


@pytest.fixture
def mini(project, toys):
    from nagl.data.prepare import prepare_dataset

    root = project(REGISTRY)
    for name in ("lv-source", "lv-target"):
        prepare_dataset(name, version=False)
    return root


def _config(methods, **changes):
    raw = {"backbone": "effnet-lite0", "image_size": SIZE, "eval_resolution": 32, "methods": list(methods),
           "sources": ["lv-source"], "targets": ["lv-target"],
           "shots": {"k_normal": [1, 2], "k_abnormal": [0, 1]}, "seeds": [0], "training": {"profile": "smoke"}}
    raw.update(changes)
    return validate_config(raw)


def _scores(cells) -> dict[str, pd.DataFrame]:
    return {Path(c).name: pd.read_parquet(Path(c) / "scores.parquet") for c in cells}


def _manifest(name):
    from nagl.data.layout import read_manifest
    from nagl.data.prepare import dataset_path

    root = dataset_path(name)
    manifest = read_manifest(root)
    return [root / p for p in manifest["image_path"]], list(manifest["image_sha256"])


# -- backbone -------------------------------------------------------------------------------

def test_effnet_publishes_its_levels_and_extracts_them_in_one_pass():
    backbone = create_backbone("effnet-lite0", SIZE)
    assert backbone.levels == {"grid-fine": ((8, 8), 40), "grid-coarse": ((8, 8), 112), "stride4": ((16, 16), 24),
                               "stride8": ((8, 8), 40), "stride16": ((4, 4), 112)}
    assert backbone.level_groups == {"patch": ("grid-fine", "grid-coarse"),
                                     "pyramid": ("stride4", "stride8", "stride16")}
    assert backbone.embed_dim == 1280
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    out = backbone.extract_levels(x, ["stride4", "stride8", "stride16", "grid-fine", "grid-coarse", "embed", "default"])
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "stride4": (3, 256, 24), "stride8": (3, 64, 40), "stride16": (3, 16, 112), "grid-fine": (3, 64, 40),
        "grid-coarse": (3, 64, 112), "embed": (3, 1280), "default": (3, 64, 152)}
    default = backbone(x)
    assert torch.equal(out["default"], default)  # the single-grid path is unchanged, bit for bit
    assert torch.equal(torch.cat([out["grid-fine"], out["grid-coarse"]], dim=-1), default)
    # the smoothed stride-8 part of the default grid is not the raw stride-8 level
    assert not torch.allclose(out["grid-fine"], out["stride8"])
    # the embedding is the ImageNet pre-logits of the full timm model with the same weights
    assert out["embed"].min() >= 0  # after ReLU6 and averaging
    with pytest.raises(NaglError, match="no level"):
        backbone.extract_levels(x, ["block6"])
    assert backbone.parameter_count() == sum(p.numel() for p in backbone.body.parameters())
    assert backbone.parameter_count(["embed"]) > backbone.parameter_count()


def test_a_method_asking_for_a_group_the_backbone_lacks_fails_clearly(toys):
    assert feature_levels(["nagl", "knn-normal", "toy-patch", "toy-pyramid"], backbone_shapes("effnet-lite0")) == (
        "grid-fine", "grid-coarse", "stride4", "stride8", "stride16", "embed")
    with pytest.raises(NaglError, match="tiny-dinov2.*no level group 'pyramid'"):
        ToyPyramid.feature_levels(backbone_shapes("tiny-dinov2"))


def test_registered_methods_keep_the_single_grid_path():
    backbone = backbone_shapes("effnet-lite0")
    for name in ("nagl", "knn-normal", "knn-naive"):
        cls = method_class(name)
        assert cls.level_group is None and not cls.needs_embed and not cls.image_scores_need_pixels
        assert cls.uses_abnormal_refs == (name != "knn-normal")  # knn-normal ignores abnormal references
        assert cls.config_for_backbone(backbone) == {} and cls.feature_levels(backbone) == ()
    for name in list_methods():  # every method's default image score is the shared top-1 % mean
        method = create_method(name, 8, **method_class(name).config_for_backbone(backbone))
        maps = torch.rand(2, 10, 10, generator=torch.Generator().manual_seed(1))
        if type(method).image_scores is Method.image_scores:
            assert torch.equal(method.image_scores(maps, None), maps.flatten(1).max(dim=1).values)


def test_clip_levels_are_the_raw_residual_stream_and_the_projected_class_token():
    backbone = create_backbone("tiny-clip", seed=4)  # 3 blocks, width 64, embed 32: random init, seeded
    assert backbone.level_groups == {"patch": ("block0", "block1", "block2")}
    assert backbone.levels["block1"] == ((4, 4), 64) and backbone.embed_dim == 32
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    out = backbone.extract_levels(x, ["block1", "block2", "embed", "default"])
    visual = backbone.visual
    tokens = visual._embeds(x)
    stream = []
    for block in visual.transformer.resblocks:
        tokens = block(tokens)
        stream.append(tokens)
    torch.testing.assert_close(out["block1"], stream[1][:, 1:])  # class token dropped, no LayerNorm
    torch.testing.assert_close(out["block2"], stream[2][:, 1:])
    torch.testing.assert_close(out["embed"], visual.ln_post(stream[2][:, 0]) @ visual.proj)
    assert torch.equal(out["default"], backbone(x))  # the normalised (0, 1) concatenation, unchanged
    assert torch.equal(backbone.extract_levels(x, ["embed"])["embed"], out["embed"])
    for name, blocks, embed in (("clip-vit-b-16-plus-240", (6, 8, 10), 640),
                                ("clip-vit-b-16-plus-240-e32", (6, 8, 10), 640),
                                ("clip-vit-l-14-336", (13, 17, 21), 768)):
        shapes = backbone_shapes(name)
        assert shapes.level_groups["patch"] == tuple(f"block{b}" for b in blocks) and shapes.embed_dim == embed


def test_wide_resnet_levels_and_its_weights_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from nagl.errors import MissingDataError
    from nagl.models.weights import env_var

    shapes = backbone_shapes("wide-resnet50-2")
    assert shapes.levels["layer1"] == ((56, 56), 256) and shapes.levels["layer2"] == ((28, 28), 512)
    assert shapes.levels["layer3"] == ((14, 14), 1024) and shapes.embed_dim is None
    assert shapes.level_groups["pyramid"] == ("layer1", "layer2", "layer3")

    monkeypatch.delenv(env_var("wide-resnet50-2"), raising=False)
    monkeypatch.setenv("NAGL_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(MissingDataError, match=r"wide-resnet50-2.*weights/wide-resnet50-2\.safetensors.*"
                                               r"nagl weights fetch wide-resnet50-2"):
        create_backbone("wide-resnet50-2")

    random = create_backbone("wide-resnet50-2", image_size=64, random_init=True, seed=1)
    checkpoint = tmp_path / "wrn.safetensors"
    save_file({k: v.contiguous() for k, v in random.body.state_dict().items()}, str(checkpoint))
    loaded = create_backbone("wide-resnet50-2", image_size=64, weights=checkpoint)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = loaded.extract_levels(x, ["layer1", "layer2", "layer3", "default"])
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "layer1": (1, 256, 256), "layer2": (1, 64, 512), "layer3": (1, 16, 1024), "default": (1, 64, 1536)}
    assert torch.equal(out["default"], random(x)) and torch.equal(out["layer3"], random.extract_levels(x, ["layer3"])["layer3"])
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(3, 3, 1, 1)}, str(wrong))
    with pytest.raises(NaglError, match="does not fit backbone 'wide-resnet50-2'"):
        create_backbone("wide-resnet50-2", image_size=64, weights=wrong)


# -- feature cache ----------------------------------------------------------------------------

def test_cache_stores_levels_per_image_in_one_pass_and_slices_the_default_file(mini, tmp_path, monkeypatch):
    paths, shas = _manifest("lv-target")
    backbone = create_backbone("effnet-lite0", SIZE)
    plain = FeatureCache(tmp_path / "plain", backbone)
    assert plain.ensure(paths, shas, progress=False) == len(shas)

    cache = FeatureCache(tmp_path / "levels", backbone)
    passes = []
    original = backbone.extract_levels

    def spy(x, names):
        passes.append((x.shape[0], tuple(names)))
        return original(x, names)

    monkeypatch.setattr(backbone, "extract_levels", spy)
    levels = ("grid-fine", "grid-coarse", "stride4", "embed")
    assert cache.ensure(paths, shas, progress=False, batch_size=8, levels=levels) == len(shas)
    assert sum(n for n, _ in passes) == len(shas)  # one pass per image, all levels at once
    assert all(set(names) == {"default", "stride4", "embed"} for _, names in passes)
    folder = cache.path(shas[0]).parent
    assert sorted(p.name[65:] for p in folder.glob(f"{shas[0]}*")) == ["embed.npy", "npy", "stride4.npy"]
    for sha in shas:  # the default grid written by the multi-level pass equals the single-grid one
        assert np.array_equal(np.load(cache.path(sha)), np.load(plain.path(sha)))

    passes.clear()
    assert cache.ensure(paths, shas, progress=False, levels=levels) == 0 and not passes
    assert cache.ensure(paths, shas, progress=False, levels=(*levels, "stride16")) == len(shas)
    assert {names for _, names in passes} == {("stride16",)}  # only what is missing

    loaded = cache.load_levels(shas[:3], ["grid-coarse", "stride16", "embed"])
    direct = original(torch.stack([backbone.preprocess(load_rgb(p)) for p in paths[:3]]),
                      ["grid-coarse", "stride16", "embed"])
    for name, tensor in loaded.items():
        assert tensor.shape == direct[name].shape
        assert torch.equal(tensor, direct[name].half().float())
    assert torch.equal(loaded["grid-coarse"], plain.load(shas[:3])[:, :, 40:])
    assert cache_summary(tmp_path / "levels")[0]["images"] == len(shas)
    with pytest.raises(NaglError, match="levels stride8.*FeatureCache.ensure"):
        cache.load_levels(shas[:1], ["stride8"])


# -- evaluation ----------------------------------------------------------------------------------

def _evaluate(config, method, source="-"):
    from nagl.evaluate import evaluate_job

    return evaluate_job(config, method, source, "lv-target", None if source == "-" else 0)


def test_features_step_caches_the_union_of_the_methods_levels(mini):
    from nagl.cli.run import step_features
    from nagl.paths import feature_stamp, features_job

    config = _config(["knn-normal", "toy-pyramid", "toy-patch"])
    stamp = feature_stamp(config.results, config.backbone, "lv-target")
    step_features(["lv-target"], config=write_effective_config(config),
                  out=features_job(config.results, config.backbone), threads=1)
    assert json.loads(Path(stamp).read_text())["levels"] == [
        "stride4", "stride8", "stride16", "embed", "grid-fine", "grid-coarse"]
    from nagl.evaluate import feature_cache

    cache = feature_cache(create_backbone("effnet-lite0", SIZE))
    _, shas = _manifest("lv-target")
    assert not cache.missing(shas, ["stride4", "stride8", "stride16", "embed", "grid-fine"])
    assert not list(cache.directory.rglob("*.grid-fine.npy"))


def test_harness_dispatches_levels_to_multi_level_methods(mini, monkeypatch):
    import nagl.evaluate as evaluate

    config = _config(["toy-pyramid", "toy-patch", "knn-normal"])
    pyramid = _evaluate(config, "toy-pyramid")
    # normal-only: only the k_abnormal = 0 cells
    assert sorted(Path(c).name for c in pyramid) == ["n1a0s0", "n2a0s0"]
    assert set(ToyPyramid.categories_seen) == {"coins"}
    patch = _evaluate(config, "toy-patch")
    assert sorted(Path(c).name for c in patch) == ["n1a0s0", "n1a1s0", "n2a0s0", "n2a1s0"]
    assert all((frame["score"] > 100).all() for frame in _scores(patch).values())  # its own image scores

    # the harness made the pixel maps (eval_resolution) before asking for the image scores
    queries = len(_scores(pyramid)["n1a0s0"])
    assert ToyPyramid.pixel_shapes == [(queries, 32, 32)] * 2

    # a batch of queries gets exactly what each query gets alone
    monkeypatch.setattr(evaluate, "QUERY_BATCH", 1)
    for cells, name in ((pyramid, "toy-pyramid"), (patch, "toy-patch")):
        batched = _scores(cells)
        for cell in cells:
            (Path(cell) / "run.json").unlink()
        alone = _scores(_evaluate(config, name))
        for key, frame in batched.items():
            np.testing.assert_allclose(alone[key]["score"], frame["score"], rtol=0, atol=1e-6)


def test_normal_only_methods_need_a_k_abnormal_zero_setting(mini):
    # refused when the config loads (nagl.config), before any job runs
    with pytest.raises(NaglError, match="toy-pyramid.*k_abnormal = 0"):
        _config(["toy-pyramid"], shots={"k_normal": [0, 1], "k_abnormal": [1]})


# -- training ------------------------------------------------------------------------------------

def test_training_serves_levels_balanced_batches_and_records_shapes(mini, monkeypatch):
    from nagl.methods import load_method
    from nagl.paths import model_dir
    from nagl.training.loop import train_from_config

    tiny = Schedule(profile="embedded", epochs=3, episodes=8, batch=4, lr=1e-2, weight_decay=0.0)
    monkeypatch.setitem(schedules.METHOD_PROFILES, ("toy-trained", "embedded"), tiny)
    assert schedule_for("embedded", method="toy-trained").episodes == 8
    assert schedule_for("embedded").episodes == schedules.PROFILES["embedded"].episodes  # nagl: the generic one
    config = _config(["toy-trained"], training={"profile": "embedded"})
    folder = model_dir(config.results, "toy-trained", "effnet-lite0", "lv-source", 0)
    result = train_from_config(config, "toy-trained", "lv-source", 0, folder)
    assert result.schedule == tiny.__class__(**{**tiny.__dict__, "normal_shots": (1, 2), "abnormal_shots": (1,)})

    record = ToyTrained.record
    assert record["epochs"] == [(1, 3), (2, 3), (3, 3)]
    labels = record["labels"]
    assert len(labels) == 6 and all(len(b) == 4 for b in labels)
    assert all(sum(b) == 0 for b in labels[:2])  # epoch 1: normal queries only
    assert all(sum(b) == 2 for b in labels[2:])  # then exactly half abnormal
    assert not any(record["self_reference"]) and all(record["categories"])
    assert record["query_shapes"][0] == {"grid-fine": (4, 64, 40), "grid-coarse": (4, 64, 112), "embed": (4, 1280)}
    assert set(record["optimisers"]) == {1}
    # calibration after the last epoch: 5 normal queries with normal references of their category, never themselves
    assert record["calibration_after_epoch"] == 3
    assert len(record["calibration"]) == 5
    assert all(c[0] == 0 and not c[1] and c[2] in (1, 2) and c[3] == () for c in record["calibration"])

    info = json.loads((folder / "model.json").read_text())
    assert info["config"]["levels"] == {"grid-fine": [8, 8, 40], "grid-coarse": [8, 8, 112]}
    assert info["config"]["embed_dim"] == 1280
    assert info["params_backbone"] == create_backbone("effnet-lite0", SIZE).parameter_count(["embed"])
    restored = load_method(folder)
    assert torch.equal(restored.head.weight, result.method.head.weight)

    cells = _evaluate(config, "toy-trained", "lv-source")
    assert sorted(Path(c).name for c in cells) == ["n1a0s0", "n2a0s0"]
    assert all(((f["score"] > 0) & (f["score"] < 1)).all() for f in _scores(cells).values())

    # the checkpoint refuses a backbone whose levels have other shapes
    other = _config(["toy-trained"], training={"profile": "embedded"}, image_size=96)
    with pytest.raises(NaglError, match=r"toy-trained.*levels.*retrain"):
        _evaluate(other, "toy-trained", "lv-source")


def test_register_profile_checks_its_schedule(monkeypatch):
    monkeypatch.setattr(schedules, "METHOD_PROFILES", {})
    good = Schedule(profile="paper", epochs=2, episodes=4, batch=2, lr=1e-3, weight_decay=0.0)
    register_profile("toy-trained", "paper", good)
    assert schedule_for("paper", method="toy-trained") == good
    assert schedule_for("paper", method="nagl") == schedules.PROFILES["paper"]
    assert "paper" in schedules.list_profiles("toy-trained")
    with pytest.raises(ValueError, match="registered as 'embedded'"):
        register_profile("toy-trained", "embedded", good)
    with pytest.raises(NaglError, match="unknown training profile 'fast' for method 'toy-trained'"):
        schedule_for("fast", method="toy-trained")
