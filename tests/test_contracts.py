"""Contract tests over the registries: every registered method, backbone and dataset
kind is exercised here, so one added later is tested without editing this file.

The last test registers a toy training-free method from this module and runs it
through a miniature matrix (prepare -> features -> evaluate -> ingest): adding a
method needs nothing outside its own file.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nagl.config import validate_config
from nagl.data import layout
from nagl.data.builders import builder_for
from nagl.data.registry import BUILDERS, DatasetSpec, load_registry
from nagl.errors import NaglError
from nagl.methods import METHODS, Method, TrainableMethod, create_method, list_methods, load_method
from nagl.methods.base import infer_grid, prepare_references
from nagl.models.backbones import BACKBONES, backbone_info, create_backbone, list_backbones
from nagl.training.batch import BatchSpec, Episode, EpisodeBatch

GRID = (4, 4)
DIM = 16


def _features(rng: np.random.Generator, count: int) -> torch.Tensor:
    return torch.from_numpy(rng.normal(size=(count, GRID[0] * GRID[1], DIM)).astype(np.float32))


# -- methods --------------------------------------------------------------------------

# Methods on the single default grid (tensors); multi-level methods (dicts of levels) below.
SINGLE_GRID = [m for m in list_methods() if METHODS.get(m).level_group is None]
MULTI_LEVEL = [m for m in list_methods() if METHODS.get(m).level_group is not None]


@pytest.mark.parametrize("name", SINGLE_GRID)
def test_every_method_scores_an_off_distribution_patch_above_a_normal_copy(name):
    method = create_method(name, DIM)
    rng = np.random.default_rng(0)
    normal = _features(rng, 2)
    query = normal[:1].repeat(2, 1, 1).clone()
    query[1, 5] = torch.from_numpy(rng.normal(size=DIM).astype(np.float32)) * 10  # one odd patch
    maps = method.score(query, normal, None, None, GRID)
    assert maps.shape == (2, *GRID) and torch.isfinite(maps).all()
    assert maps[1].max() > maps[0].max()
    assert int(maps[1].flatten().argmax()) == 5

    abnormal = _features(rng, 1)
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, :8, :8] = True
    with_abnormal = method.score(query, normal, abnormal, masks, GRID)
    assert with_abnormal.shape == (2, *GRID) and torch.isfinite(with_abnormal).all()


@pytest.mark.parametrize("name", SINGLE_GRID)
def test_every_method_round_trips_through_a_checkpoint(name, tmp_path):
    method = create_method(name, DIM)
    method.save(tmp_path / "ckpt", {"note": "contract"})
    restored = load_method(tmp_path / "ckpt")
    assert type(restored) is type(method) and restored.config_hash() == method.config_hash()
    rng = np.random.default_rng(1)
    query, normal, abnormal = _features(rng, 2), _features(rng, 2), _features(rng, 1)
    assert torch.equal(restored.score(query, normal, abnormal, None, GRID), method.score(query, normal, abnormal, None, GRID))


class SyntheticStore:
    """Features and masks by row for a hand-made batch (the Features protocol)."""

    grid = GRID

    def __init__(self, rows: int, mask_size: int):
        rng = np.random.default_rng(2)
        self._features = _features(rng, rows)
        self._masks = torch.zeros(rows, mask_size, mask_size, dtype=torch.bool)
        self._masks[rows // 2:, : mask_size // 2, : mask_size // 2] = True  # rows in the second half are abnormal

    def features(self, rows):
        return self._features[list(rows)]

    def mask(self, row):
        return self._masks[row]


def _level_features(backbone, names, count: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {n: ((backbone.embed_dim,) if n == "embed" else (backbone.levels[n][0][0] * backbone.levels[n][0][1],
                                                             backbone.levels[n][1])) for n in names}
    return {n: torch.randn(count, *shape, generator=generator) for n, shape in shapes.items()}


@pytest.mark.parametrize("name", MULTI_LEVEL)
def test_every_multi_level_method_round_trips_through_a_checkpoint_and_scores_a_batch_as_its_items(name, tmp_path):
    from nagl.models.backbones import backbone_shapes

    cls = METHODS.get(name)
    backbone = backbone_shapes("effnet-lite0", 64)
    names = cls.feature_levels(backbone)
    method = create_method(name, backbone.dim, **cls.config_for_backbone(backbone), seed=0)
    method.save(tmp_path / "ckpt", {"note": "contract"})
    restored = load_method(tmp_path / "ckpt")
    assert type(restored) is type(method) and restored.config_hash() == method.config_hash()
    query, normal = _level_features(backbone, names, 3, 1), _level_features(backbone, names, 2, 2)
    grids = {n: backbone.levels[n][0] for n in names if n != "embed"}

    def maps(model, rows):
        out = model.score({n: t[rows] for n, t in query.items()}, normal, None, None, grids, category="c")
        return out[0] if isinstance(out, tuple) else out

    together = maps(method, slice(0, 3))
    assert torch.isfinite(together).all() and torch.equal(maps(restored, slice(0, 3)), together)
    alone = torch.cat([maps(method, slice(i, i + 1)) for i in range(3)])
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [m for m in SINGLE_GRID if METHODS.get(m).trainable])
def test_every_trainable_method_follows_the_training_contract(name):
    method = create_method(name, DIM, seed=0)
    assert isinstance(method, TrainableMethod)
    spec = method.batch_spec((1, 2), (1,))
    assert isinstance(spec, BatchSpec) and spec.normal_shots == (1, 2) and spec.abnormal_shots == (1,)
    store = SyntheticStore(8, spec.mask_size or 32)
    batch = EpisodeBatch([Episode("c", 5, 1, (0, 1), (6,), "d"), Episode("c", 2, 0, (0,), (7,), "d")], store)
    module = method.trainable_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loss, scores = method.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and scores.shape == (2,)
    optimiser = torch.optim.SGD(module.parameters(), lr=0.1)
    loss.backward()
    optimiser.step()
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert isinstance(method.training_settings(), dict)


# -- backbones ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_describes_itself_and_rejects_a_size_it_cannot_take(name):
    info = backbone_info(name)
    assert info["dim"] > 0 and info["grid"][0] * info["grid"][1] > 0 and info["image_size"] > 0
    with pytest.raises(NaglError, match=name):
        backbone_info(name, info["image_size"] + 1)


@pytest.mark.parametrize("name", [b for b in list_backbones() if BACKBONES.get(b).weights is None])
def test_every_backbone_without_a_weights_file_extracts_its_declared_shape(name):
    backbone = create_backbone(name)
    image = np.random.default_rng(3).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    features = backbone(backbone.preprocess(image)[None])
    assert features.shape == (1, backbone.grid[0] * backbone.grid[1], backbone.dim)
    assert features.dtype == torch.float32 and torch.isfinite(features).all()


# -- dataset kinds ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", BUILDERS.names())
def test_every_dataset_kind_builds_or_fails_clearly_on_a_bare_entry(kind, tmp_path, downloads):
    # A bare entry (no options, no archive placed): a kind whose data ships with a package
    # (elpv-package, sklearn-digits, embedded) builds the canonical layout; any other kind
    # fails with a NaglError naming the dataset.
    spec = DatasetSpec("contract-probe", kind, "test", {})
    out = tmp_path / "out"
    out.mkdir()
    try:
        builder_for(kind)(spec, out)
    except NaglError as error:
        assert "contract-probe" in str(error)
        return
    folders = {(category, split, kind_) for category, split, kind_, folder in layout.image_folders(out)
               if any(folder.iterdir())}
    assert folders, f"{kind}: built nothing"
    for category in layout.categories(out):
        assert {(category, "train", "good"), (category, "test", "good")} <= folders, (kind, category)
        assert any(c == category and s == "test" and d != "good" for c, s, d in folders), (kind, category)


def test_every_registered_dataset_has_a_known_kind():
    for name, spec in load_registry().items():
        assert spec.kind in BUILDERS, f"{name}: kind {spec.kind!r} has no builder"


# -- a method added from outside runs through the matrix ------------------------------

class MeanDistance(Method):
    """Toy training-free method: ``S`` = cosine distance to the mean normal patch."""

    name = "toy-mean-distance"
    trainable = False

    def __init__(self, dim: int):
        super().__init__(dim)

    @torch.no_grad()
    def score(self, query, normal=None, abnormal=None, abnormal_masks=None, grid=None):
        h, w = grid = infer_grid(query.shape[1], grid)
        refs = prepare_references(normal, abnormal, abnormal_masks, grid)
        centre = F.normalize(refs.bank.mean(dim=0), dim=0)
        return (1 - F.normalize(query.float(), dim=-1) @ centre).reshape(-1, h, w)


MINI_REGISTRY = """
datasets:
  mini-texture:
    kind: embedded
    domain: industrial-texture
    preset: textures
    categories: [brick]
    counts: {train_good: 4, test_good: 3, test_anomalous: 4}
"""


def test_a_method_registered_from_a_test_module_runs_through_a_miniature_matrix(project, monkeypatch):
    from nagl.cli.run import step_features
    from nagl.config import write_effective_config
    from nagl.data.prepare import prepare_dataset
    from nagl.evaluate import evaluate_job
    from nagl.io import atomic_write_json
    from nagl.paths import database, features_job, job_file
    from nagl.results.ingest import ingest_run

    root = project(MINI_REGISTRY)
    monkeypatch.setitem(METHODS.entries, MeanDistance.name, MeanDistance)
    raw = {"backbone": "effnet-lite0", "image_size": 64, "eval_resolution": 32,
           "methods": [MeanDistance.name, "knn-normal"], "sources": [], "targets": ["mini-texture"],
           "shots": {"k_normal": [1, 2], "k_abnormal": [0]}, "seeds": [0], "training": {"profile": "smoke"}}
    with pytest.raises(NaglError, match="unknown method 'toy-mean-distance'"):
        with monkeypatch.context() as unregistered:
            unregistered.delitem(METHODS.entries, MeanDistance.name)
            validate_config(raw)
    config = validate_config(raw)

    prepare_dataset("mini-texture", version=False)
    run_config = write_effective_config(config)
    step_features(["mini-texture"], config=run_config, out=features_job(config.results, config.backbone), threads=1)
    jobs = []
    for method in config.methods:
        cells = evaluate_job(config, method, "-", "mini-texture")
        job = job_file(config.results, method, config.backbone, "-", None)
        atomic_write_json(job, {"cells": cells})
        jobs.append(job)
    ingest_run(config.as_dict(), jobs, database(config.results))

    with duckdb.connect(str(root / database(config.results)), read_only=True) as con:
        rows = con.execute("SELECT r.method, r.k_normal, m.value FROM runs r JOIN metrics m USING (run_id) "
                           "WHERE m.level = 'image' AND m.metric = 'auroc' "
                           "ORDER BY r.method, r.k_normal").fetchall()
    toy = [r for r in rows if r[0] == MeanDistance.name]
    assert [r[1] for r in toy] == [1, 2] and len(rows) == 4
    assert all(0.0 <= r[2] <= 1.0 for r in toy)
