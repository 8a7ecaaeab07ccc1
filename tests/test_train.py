"""Episodic training on a source domain, on REAL features of a small embedded dataset."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from nagl.data import embedded, layout
from nagl.data.registry import DatasetSpec
from nagl.errors import NaglError
from nagl.io import sha256_file
from nagl.methods import create_method, load_method
from nagl.models.backbones import create_backbone
from nagl.models.cache import FeatureCache
from nagl.training.batch import BatchSpec
from nagl.training.episodes import POOLED, FeatureStore, draw_episode, split_source
from nagl.training.loop import train_on_source, validation_score
from nagl.training.schedule import schedule_for

SOURCE = "tiny-textures"
COUNTS = {"train_good": 6, "test_good": 3, "test_anomalous": 12}  # 3 images per defect type


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A two-category embedded texture dataset, its manifest and cached effnet-lite0 features."""
    root = tmp_path_factory.mktemp("train")
    dataset = root / "datasets" / SOURCE
    spec = DatasetSpec(SOURCE, "embedded", "industrial-texture",
                       {"preset": "textures", "categories": ["brick", "gravel"], "counts": COUNTS})
    embedded.build(spec, dataset)
    manifest = layout.write_manifest(dataset, SOURCE)
    backbone = create_backbone("effnet-lite0")
    cache = FeatureCache(root / "cache" / "features", backbone)
    cache.ensure([dataset / p for p in manifest["image_path"]], list(manifest["image_sha256"]), progress=False)
    return {"root": root, "dir": dataset, "manifest": manifest, "cache": cache, "backbone": backbone}


def tiny(**changes):
    settings = dict(epochs=1, episodes=4, batch=2, select="last", val_fraction=0.0, val_episodes=0,
                    milestones=[])
    settings.update(changes)
    return settings


def nagl_spec(normal_shots=(1, 2, 4), abnormal_shots=(1,)) -> BatchSpec:
    """The batch spec NAGL asks for (masks at 256 px, half the queries abnormal)."""
    return create_method("nagl", 152).batch_spec(tuple(normal_shots), tuple(abnormal_shots))


def test_profiles():
    paper = schedule_for("paper")
    assert (paper.lr, paper.weight_decay, paper.epochs, paper.episodes, paper.batch) == (1e-5, 0.01, 20, 500, 8)
    assert paper.milestones == (10, 15) and paper.gamma == 0.1 and paper.select == "last"
    embedded_profile = schedule_for("embedded")
    assert embedded_profile.select == "auroc" and embedded_profile.val_fraction > 0
    assert embedded_profile.val_references > 0
    assert schedule_for("embedded", normal_shots=[2]).normal_shots == (2,)
    with pytest.raises(NaglError, match="unknown training profile 'fast'"):
        schedule_for("fast")
    with pytest.raises(NaglError, match="unknown training setting"):
        schedule_for("paper", learning_rate=1)
    with pytest.raises(NaglError, match="select='best' needs"):
        schedule_for("paper", select="best")
    with pytest.raises(NaglError, match="select='auroc' needs"):
        schedule_for("paper", select="auroc")
    with pytest.raises(NaglError, match="select must be one of last, best, auroc"):
        schedule_for("paper", select="loss")


def test_validation_split_is_source_only_disjoint_and_seeded(source):
    config = schedule_for("embedded")
    spec = nagl_spec()
    train, val, skipped = split_source(source["manifest"], spec, config.val_fraction, seed=0, dataset=SOURCE)
    assert skipped == [] and train.categories() == ["brick", "gravel"]
    for category in train.categories():
        assert not set(train.normals[category]) & set(val.normals[category])
        assert len(train.normals[category]) >= max(config.normal_shots) + 1
        for defect, kept in train.anomalies[category].items():
            assert len(kept) >= 2
            assert not set(kept) & set(val.anomalies.get(category, {}).get(defect, []))
    assert sum(len(v) for v in val.normals.values()) > 0
    again, _, _ = split_source(source["manifest"], spec, config.val_fraction, seed=0, dataset=SOURCE)
    assert again.normals == train.normals and again.anomalies == train.anomalies


def test_defect_types_too_small_are_pooled():
    rows = [("c", "train", 0, "good", f"c/train/good/{i}.png", None) for i in range(5)]
    rows += [("c", "test", 1, d, f"c/test/{d}/0.png", f"c/ground_truth/{d}/0_mask.png") for d in ("hole", "stain")]
    rows += [("c", "test", 1, "dent", "c/test/dent/0.png", None), ("d", "train", 0, "good", "d/train/good/0.png", None)]
    manifest = pd.DataFrame(rows, columns=["category", "split", "label", "defect_type", "image_path", "mask_path"])
    train, _, skipped = split_source(manifest, nagl_spec(normal_shots=[2]), 0.0, seed=0)
    assert train.anomalies["c"] == {POOLED: [5, 6]}  # one masked image per type: pooled; no mask: unused
    assert skipped == ["d"]  # a category without anomalies cannot form an episode
    episode = draw_episode(train, np.random.default_rng(0), nagl_spec(normal_shots=[2]))
    assert episode.category == "c" and len(episode.normal) == 2 and episode.defect == POOLED


def test_episodes_follow_the_rules(source):
    spec = nagl_spec()
    manifest = source["manifest"]
    train, val, _ = split_source(manifest, spec, schedule_for("embedded").val_fraction, seed=0, dataset=SOURCE)
    held_out = {i for c in val.normals for i in val.normals[c]}
    held_out |= {i for c in val.anomalies for d in val.anomalies[c] for i in val.anomalies[c][d]}
    rng = np.random.default_rng(0)
    episodes = [draw_episode(train, rng, spec) for _ in range(200)]
    assert 70 < sum(e.label for e in episodes) < 130
    assert {len(e.normal) for e in episodes} == {1, 2, 4}
    for e in episodes:
        rows = manifest.iloc[[e.query, *e.normal, *e.abnormal]]
        assert e.query not in e.normal + e.abnormal
        assert set(rows["category"]) == {e.category}
        assert (manifest.loc[list(e.normal), "label"] == 0).all()
        assert set(manifest.loc[list(e.abnormal), "defect_type"]) == {e.defect}
        assert manifest.loc[list(e.abnormal), "mask_path"].notna().all()
        assert manifest.at[e.query, "label"] == e.label
        if e.label:
            assert manifest.at[e.query, "defect_type"] == e.defect
        assert not {e.query, *e.normal, *e.abnormal} & held_out


def test_training_lowers_the_loss_on_real_features(source):
    settings = dict(epochs=4, episodes=24, batch=6, lr=1e-3, milestones=[], select="best",
                    val_fraction=0.2, val_episodes=8)
    result = train_on_source(source["dir"], source["cache"].load, backbone_identity=source["backbone"].identity,
                             seed=0, grid=source["backbone"].grid, overrides=settings, progress=False)
    schedule, spec = result.schedule, nagl_spec()
    train, _, _ = split_source(source["manifest"], spec, schedule.val_fraction, seed=0, dataset=SOURCE)
    store = FeatureStore(source["manifest"], source["dir"], source["cache"].load, None, spec.mask_size)
    fixed = [draw_episode(train, np.random.default_rng(123), spec) for _ in range(16)]
    initial = create_method("nagl", store.dim, seed=0)  # the weights training started from
    before = validation_score(initial, fixed, store, schedule.batch)["loss"]
    after = validation_score(result.method, fixed, store, schedule.batch)["loss"]
    print(f"fixed-episode loss {before:.4f} -> {after:.4f}; history {result.history}")
    assert after < before - 0.02
    first, best = result.history[0]["val_loss"], min(h["val_loss"] for h in result.history[1:])
    assert best < first
    kept = result.history[result.selected_epoch]
    assert kept["val_loss"] == best  # 'best' keeps the epoch with the lowest validation loss


def test_same_seed_same_weights_and_checkpoint(source, tmp_path):
    args = dict(backbone_identity=source["backbone"].identity, overrides=tiny(), progress=False)
    first = train_on_source(source["dir"], source["cache"].load, seed=3, out_dir=tmp_path / "a", **args)
    second = train_on_source(source["dir"], source["cache"].load, seed=3, out_dir=tmp_path / "b", **args)
    other = train_on_source(source["dir"], source["cache"].load, seed=4, **args)
    state_a, state_b = first.method.state_dict(), second.method.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert any(not torch.equal(state_a[k], other.method.state_dict()[k]) for k in state_a)
    assert (tmp_path / "a" / "weights.safetensors").read_bytes() == (tmp_path / "b" / "weights.safetensors").read_bytes()

    info = json.loads((tmp_path / "a" / "model.json").read_text())
    assert info["method"] == "nagl" and info["backbone"] == "effnet-lite0"
    assert info["backbone_identity"] == source["backbone"].identity
    assert info["source"] == SOURCE
    assert info["source_manifest_sha256"] == sha256_file(source["dir"] / "manifest.parquet")
    assert info["checkpoint_hash"] == sha256_file(tmp_path / "a" / "weights.safetensors")
    assert info["params_trainable"] == info["params_head"] == first.method.parameter_counts()[1]
    assert info["training"]["profile"] == info["training_profile"] == "embedded" and info["train_seconds"] > 0
    assert info["training"]["method"] == {"top_k": 20.0, "mask_size": 256, "focal_alpha": 0.25,
                                          "focal_gamma": 2.0, "proxies": 25, "heads": 4,
                                          "loss_form": "paper"}  # NAGL's own settings
    restored = load_method(tmp_path / "a")
    query = source["cache"].load(list(source["manifest"]["image_sha256"][:3]))
    assert torch.equal(restored.score(query[:1], query[1:2], query[2:3], None, (32, 32)),
                       first.method.score(query[:1], query[1:2], query[2:3], None, (32, 32)))


def test_loop_trains_on_chosen_categories_and_reports_every_epoch(source):
    seen = []
    result = train_on_source(source["dir"], source["cache"].load, backbone_identity=source["backbone"].identity,
                             overrides=tiny(epochs=2), categories=["gravel"], progress=False,
                             on_epoch=lambda epoch, method: seen.append((epoch, method.head.training)))
    assert result.metadata["training"]["train_categories"] == ["gravel"]
    assert seen == [(0, False), (1, False), (2, False)]  # before training and after each epoch, in eval mode


def test_training_errors(source, tmp_path):
    lookup = source["cache"].load
    identity = source["backbone"].identity
    with pytest.raises(NaglError, match="training-free"):
        train_on_source(source["dir"], lookup, backbone_identity=identity, method="knn-normal")
    no_masks = source["manifest"].assign(mask_path=None)
    folder = tmp_path / "nomasks"
    folder.mkdir()
    no_masks.to_parquet(folder / "manifest.parquet")
    with pytest.raises(NaglError, match="no category can form a training episode"):
        train_on_source(folder, lookup, backbone_identity=identity, overrides=tiny(), progress=False)
    with pytest.raises(NaglError, match="no cached features"):
        train_on_source(source["dir"], {}, backbone_identity=identity, overrides=tiny(), progress=False)


def test_train_command(source, monkeypatch):
    from nagl.cli.main import _app

    root = source["root"]
    monkeypatch.setenv("NAGL_HOME", str(root))
    monkeypatch.setenv("NAGL_DATASETS", str(root / "datasets"))
    monkeypatch.setenv("NAGL_CACHE", str(root / "cache"))
    monkeypatch.setenv("NAGL_RESULTS", str(root / "results"))
    result = CliRunner().invoke(_app, ["train", "--source", SOURCE, "--profile", "smoke", "--seed", "1",
                                       "--normal-shots", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    folder = root / "results" / "models" / "nagl" / "effnet-lite0" / SOURCE / "1"  # the training seed
    info = json.loads((folder / "model.json").read_text())
    assert info["training"]["normal_shots"] == [1] and info["training"]["profile"] == "smoke"
    assert info["params_total"] == info["params_head"] + info["params_backbone"] > info["params_head"]
    assert info["source_dataset_hash"].startswith("manifest:")
    bad = CliRunner().invoke(_app, ["train", "--source", SOURCE, "--normal-shots", "0"])
    assert isinstance(bad.exception, NaglError) and "--normal-shots" in str(bad.exception)
