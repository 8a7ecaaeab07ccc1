"""Union sources (leave-one-domain-out): the config, training on several datasets, provenance, the workflow.

Real data: three small embedded datasets. `uni-a` and `uni-b` are both textures with the
category `brick`, so their files have the same relative paths but different pixels: a mask
read from the wrong dataset's folder is a different mask.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import duckdb
import numpy as np
import pytest
import yaml
from conftest import make_project
from PIL import Image

from nagl import paths
from nagl.config import validate_config
from nagl.data import embedded, layout
from nagl.data.images import load_mask
from nagl.data.prepare import dataset_content_hash
from nagl.data.registry import get_spec
from nagl.data.unions import source_content_hash, union_content_hash, union_manifest
from nagl.errors import NaglError
from nagl.evaluate import evaluate_job
from nagl.io import read_json
from nagl.methods import create_method
from nagl.models.cache import FeatureCache
from nagl.results.ingest import ingest
from nagl.training.episodes import FeatureStore, draw_episode, split_source
from nagl.training.loop import train_from_config, train_source

COUNTS = "{train_good: 6, test_good: 3, test_anomalous: 8}"
REGISTRY = f"""
datasets:
  uni-a: {{kind: embedded, domain: industrial-texture, preset: textures, categories: [brick], counts: {COUNTS}}}
  uni-b: {{kind: embedded, domain: industrial-texture, preset: textures, categories: [brick], counts: {COUNTS}}}
  uni-c: {{kind: embedded, domain: medical-microscopy, preset: medical, categories: [microscopy], counts: {COUNTS}}}
  uni-d: {{kind: embedded, domain: industrial-objects, preset: objects, categories: [screw], counts: {COUNTS}}}
"""
BUILT = ("uni-a", "uni-b", "uni-c")  # uni-d is only named (a target of the dry run)
CONFIG = {
    "backbone": "effnet-lite0",
    "image_size": 64,
    "eval_resolution": 32,
    "methods": ["nagl", "knn-naive"],
    "sources": ["uni-a", "uni-b", "uni-c"],
    "targets": ["uni-a", "uni-c", "uni-d"],
    "union_sources": "leave-one-out",
    "shots": {"k_normal": [1], "k_abnormal": [1]},
    "seeds": [0],
    "training": {"profile": "smoke", "seeds": [0]},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A project whose registry holds the four datasets; three of them are prepared."""
    tmp = tmp_path_factory.mktemp("unions")
    root = make_project(tmp / "project", REGISTRY)
    patch = pytest.MonkeyPatch()
    patch.setenv("NAGL_HOME", str(root))
    patch.setenv("NAGL_CACHE", str(tmp / "cache"))
    patch.delenv("NAGL_DATASETS", raising=False)
    patch.delenv("NAGL_RESULTS", raising=False)
    patch.chdir(root)
    for name in BUILT:
        folder = root / "datasets" / name
        embedded.build(get_spec(name), folder)
        layout.write_manifest(folder, name)
    yield root
    patch.undo()


def test_union_for_each_target_never_includes_the_target(workspace):
    config = validate_config(CONFIG)
    unions = {union.name: union for union in config.unions}
    assert {name: (u.datasets, u.targets) for name, u in unions.items()} == {
        "all-but-uni-a": (("uni-b", "uni-c"), ("uni-a",)),
        "all-but-uni-c": (("uni-a", "uni-b"), ("uni-c",)),
        "all-sources": (("uni-a", "uni-b", "uni-c"), ("uni-d",)),  # uni-d is a target only
    }
    assert config.training_sources() == ["uni-a", "uni-b", "uni-c", *unions]
    for source in config.training_sources():
        for target in config.source_targets(source):
            if source in unions:
                assert target not in config.source_datasets(source)
    assert config.source_targets("uni-b") == config.targets  # a dataset source: every target, in-domain flagged
    assert validate_config(config.as_dict()) == config
    assert validate_config({**CONFIG, "union_sources": "none"}).unions == ()


def test_explicit_unions_and_their_errors(workspace):
    explicit = {"name": "a-and-b", "datasets": ["uni-a", "uni-b"]}
    config = validate_config({**CONFIG, "union_sources": "none", "sources": ["uni-c", explicit]})
    assert config.sources == ("uni-c",) and config.source_datasets("a-and-b") == ("uni-a", "uni-b")
    assert config.source_targets("a-and-b") == ("uni-c", "uni-d")
    assert config.datasets() == ["uni-a", "uni-b", "uni-c", "uni-d"]
    assert validate_config(config.as_dict()) == config
    cases = [
        ({"name": "uni-d", "datasets": ["uni-a", "uni-b"]}, "has the name of a dataset"),
        ({"name": "all-sources", "datasets": ["uni-a", "uni-b"]}, "named twice"),
        ({"name": "ab", "datasets": ["uni-a", "mvtec-missing"]}, "'mvtec-missing' is not in config/datasets.yaml"),
        ({"name": "ab", "datasets": ["uni-a"]}, "sources"),  # a union has at least two datasets (schema)
    ]
    for union, message in cases:
        with pytest.raises(NaglError, match=message):
            validate_config({**CONFIG, "sources": [*CONFIG["sources"], union]})
    with pytest.raises(NaglError, match="contains every target"):
        validate_config({**CONFIG, "targets": ["uni-a", "uni-b"],
                         "sources": ["uni-c", {"name": "ab", "datasets": ["uni-a", "uni-b"]}]})


def test_union_episodes_draw_from_every_member_and_masks_come_from_its_folder(workspace):
    folders = {name: workspace / "datasets" / name for name in ("uni-a", "uni-b")}
    items = union_manifest(folders)
    assert set(items["category"]) == {"uni-a/brick", "uni-b/brick"}
    spec = create_method("nagl", 8).batch_spec((1, 2), (1,))
    pool, _, skipped = split_source(items, spec, 0.0, 0, "ab")
    assert not skipped
    rng = np.random.default_rng(0)
    drawn = [draw_episode(pool, rng, spec) for _ in range(40)]
    for episode in drawn:  # every image of an episode is of the episode's member dataset
        rows = [episode.query, *episode.normal, *episode.abnormal]
        assert {items.at[r, "category"] for r in rows} == {episode.category}
    assert {e.category for e in drawn} == {"uni-a/brick", "uni-b/brick"}

    store = FeatureStore(items, folders, lambda shas: np.zeros((len(shas), 4, 8), np.float32), None, 32)
    for name, other in (("uni-a", "uni-b"), ("uni-b", "uni-a")):
        row = int(items.index[(items["dataset"] == name) & items["mask_path"].notna()][0])
        relative = items.at[row, "mask_path"]
        own, foreign = load_mask(folders[name] / relative, 32), load_mask(folders[other] / relative, 32)
        assert not np.array_equal(own, foreign)  # same path, different mask: the folder matters
        assert np.array_equal(store.mask(row).numpy(), own)
    with pytest.raises(NaglError, match="uni-b have no folder"):
        FeatureStore(items, {"uni-a": folders["uni-a"]}, lambda shas: np.zeros((len(shas), 4, 8)), None)


def test_training_a_union_reads_every_member_and_never_the_target(workspace, monkeypatch):
    config = validate_config(CONFIG)
    requested: set[str] = set()
    load = FeatureCache.load

    def recording(self, shas):
        requested.update(shas)
        return load(self, shas)

    monkeypatch.setattr(FeatureCache, "load", recording)
    out = workspace / "scratch" / "all-but-uni-c"
    train_source("nagl", "all-but-uni-c", datasets=config.source_datasets("all-but-uni-c"), image_size=64,
                 profile="smoke", overrides={"episodes": 16, "batch": 4}, out_dir=out, progress=False)
    info = read_json(out / paths.MODEL_FILE)

    shas = {name: set(layout.read_manifest(workspace / "datasets" / name)["image_sha256"]) for name in BUILT}
    assert requested & shas["uni-a"] and requested & shas["uni-b"] and not requested & shas["uni-c"]
    assert info["source"] == "all-but-uni-c" and info["source_datasets"] == ["uni-a", "uni-b"]
    assert "uni-c" not in info["source_datasets"]
    assert info["training"]["train_categories"] == ["uni-a/brick", "uni-b/brick"]
    members = {m["dataset"]: m["content_hash"] for m in info["source_members"]}
    assert members == {name: dataset_content_hash(name) for name in ("uni-a", "uni-b")}
    assert info["source_dataset_hash"] == union_content_hash(members)
    assert info["source_dir"] is None and {m["dir"] for m in info["source_members"]} == {
        str(workspace / "datasets" / name) for name in ("uni-a", "uni-b")}


def test_union_cells_store_source_datasets_and_are_cross_domain(workspace):
    config = validate_config(CONFIG)
    train_from_config(config, "nagl", "all-but-uni-c", 0,
                      paths.model_dir(config.results, "nagl", config.backbone, "all-but-uni-c", 0))
    cells = evaluate_job(config, "nagl", "all-but-uni-c", "uni-c", 0)
    run = read_json(os.path.join(cells[0], "run.json"))
    assert run["source"] == "all-but-uni-c" and run["source_datasets"] == ["uni-a", "uni-b"]
    assert run["in_domain"] is False
    assert run["source_dataset_hash"] == source_content_hash(["uni-a", "uni-b"])[0]
    free = evaluate_job(config, "knn-naive", "-", "uni-c")
    assert read_json(os.path.join(free[0], "run.json"))["source_datasets"] is None

    db = workspace / "results" / "union.duckdb"
    ingest(workspace / "results", db, [], {}, cell_dirs=[*cells, *free])
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT method, source, source_datasets, in_domain FROM runs ORDER BY method").fetchall()
    assert rows == [("knn-naive", "-", None, False), ("nagl", "all-but-uni-c", ["uni-a", "uni-b"], False)]


def test_union_hash_changes_when_a_member_changes(workspace, tmp_path, monkeypatch):
    copy = tmp_path / "datasets"
    for name in ("uni-a", "uni-b"):
        shutil.copytree(workspace / "datasets" / name, copy / name)
    monkeypatch.setenv("NAGL_DATASETS", str(copy))
    before, members = source_content_hash(["uni-a", "uni-b"])
    assert before.startswith("union:") and before not in members.values()
    assert source_content_hash(["uni-a"])[0] == members["uni-a"]  # a single dataset keeps its own hash
    image = copy / "uni-b" / layout.read_manifest(copy / "uni-b")["image_path"].iloc[0]
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    layout.write_manifest(copy / "uni-b", "uni-b")
    after, changed = source_content_hash(["uni-a", "uni-b"])
    assert changed["uni-a"] == members["uni-a"] and changed["uni-b"] != members["uni-b"]
    assert after != before


def test_dry_run_of_a_tiny_config_has_the_union_sources(workspace):
    path = workspace / "config" / "unions.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    done = subprocess.run([sys.executable, "-m", "nagl", "run", "--config", str(path), "--dry-run"],
                          cwd=workspace, capture_output=True, text=True,
                          env={**os.environ, "NAGL_HOME": str(workspace)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr

    # One evaluation job per (method, source, training seed); its inputs are its targets' manifests.
    evaluate_inputs = {}
    for block in out.split("rule ")[1:]:
        if block.startswith("evaluate:"):
            output = block.split("output: ")[1].split("\n")[0]
            evaluate_inputs[output] = block.split("input: ")[1].split("\n")[0]

    def evaluated(source, target):
        job = str(paths.job_file("results", "nagl", "effnet-lite0", source, 0))
        return str(paths.dataset_manifest(target)) in evaluate_inputs[job]

    for source, target in (("all-but-uni-a", "uni-a"), ("all-but-uni-c", "uni-c"), ("all-sources", "uni-d"),
                           ("uni-a", "uni-a"), ("uni-b", "uni-d")):
        assert evaluated(source, target)
    for source, target in (("all-but-uni-a", "uni-c"), ("all-but-uni-a", "uni-d"), ("all-sources", "uni-a")):
        assert not evaluated(source, target)
    train_blocks = [block for block in out.split("rule ") if block.startswith("train:")]
    inputs = {line.split("models/nagl/effnet-lite0/")[1].split("/")[0]: block.split("input: ")[1].split("\n")[0]
              for block in train_blocks for line in block.splitlines() if line.strip().startswith("output:")}
    assert set(inputs) == {"uni-a", "uni-b", "uni-c", "all-but-uni-a", "all-but-uni-c", "all-sources"}
    # A train job reads the manifests and the feature stamps of every member, and nothing else.
    def member_inputs(*names):
        return sorted([str(paths.dataset_manifest(n)) for n in names]
                      + [str(paths.feature_stamp("results", "effnet-lite0", n)) for n in names])

    assert sorted(inputs["all-sources"].split(", ")) == member_inputs("uni-a", "uni-b", "uni-c")
    assert sorted(inputs["all-but-uni-a"].split(", ")) == member_inputs("uni-b", "uni-c")
    assert sorted(inputs["uni-b"].split(", ")) == member_inputs("uni-b")
