"""No work done twice: aliased cells, the nested shot settings' shared search, AUPRO without churn."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch

from nagl.config import validate_config
from nagl.methods import create_method
from nagl.methods.base import nested_normal_side, normal_scores
from nagl.metrics import aupro, pixel_metrics
from nagl.results.aliases import NORMAL_ONLY_WITHOUT_ABNORMAL, canonical_cells, is_normal_knn_cell

GRID = (6, 5)
DIM = 16


def _features(generator: torch.Generator, count: int) -> torch.Tensor:
    return torch.randn(count, GRID[0] * GRID[1], DIM, generator=generator)


def _nagl_with_random_head(seed: int = 3):
    method = create_method("nagl", dim=DIM, proxies=4, heads=2, seed=seed)
    with torch.no_grad():
        for parameter in method.head.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return method


def _method(name: str):
    return _nagl_with_random_head() if name == "nagl" else create_method(name, dim=DIM)


def test_nested_shots_share_one_search_with_identical_numbers():
    generator = torch.Generator().manual_seed(0)
    query, normal = _features(generator, 11), _features(generator, 4)  # 11: a last, partial chunk
    shared = {k: side.s_n for k, side in nested_normal_side(query, normal, [1, 2, 4], chunk=8).items()}
    for k in (1, 2, 4):
        direct = normal_scores(query, normal[:k].reshape(-1, DIM), chunk=8)
        assert torch.equal(shared[k], direct)
    assert not torch.equal(shared[1], shared[4])  # more references do change s_n
    # Direct: the best cosine over the whole bank, as a plain matrix product gives it.
    cos = torch.nn.functional.normalize(query, dim=-1) @ torch.nn.functional.normalize(normal, dim=-1).reshape(-1, DIM).T
    assert torch.allclose(shared[4], (1 + cos.amax(dim=-1)) / 2, atol=1e-6)


@pytest.mark.parametrize("method", sorted(NORMAL_ONLY_WITHOUT_ABNORMAL))
def test_every_aliased_method_computes_the_canonical_map(method):
    """What the aliases claim: with k_abnormal = 0 the map is 1 - s_n, exactly as the evaluator's
    shared search gives it; with an abnormal reference a method that uses it computes another map."""
    generator = torch.Generator().manual_seed(1)
    query, normal, abnormal = _features(generator, 9), _features(generator, 2), _features(generator, 1)
    masks = torch.zeros(1, 24, 24, dtype=torch.bool)
    masks[0, 4:12, 6:14] = True
    canonical = 1.0 - nested_normal_side(query, normal, [2], chunk=8)[2].s_n.reshape(-1, *GRID)
    scorer = _method(method)
    with torch.no_grad():
        plain = scorer.score(query, normal, abnormal[:0], masks[:0], GRID)
        assert torch.equal(plain, canonical)
        with_abnormal = scorer.score(query, normal, abnormal, masks, GRID)
    uses_abnormal = type(scorer).uses_abnormal_refs
    assert torch.equal(with_abnormal, canonical) == (not uses_abnormal)
    assert is_normal_knn_cell(method, 2, 0) and not is_normal_knn_cell(method, 2, 1)
    assert not is_normal_knn_cell(method, 0, 1)  # no normal reference: the bank comes from the abnormal ones


def test_canonical_cell_is_training_free_and_the_same_for_every_alias():
    from nagl.evaluate import CellKey

    def key(method, source, kn, ka, train_seed=None):
        return CellKey(method, "b", source, "t", "c", kn, ka, 0, train_seed)

    keys = [key("nagl", s, kn, ka, t) for s in ("s1", "s2") for t in (0, 1) for kn in (1, 2) for ka in (0, 1)]
    keys += [key("knn-normal", "-", kn, 0) for kn in (1, 2)]  # it ignores abnormal references: k_abnormal 0 only
    keys += [key("knn-naive", "-", kn, ka) for kn in (1, 2) for ka in (0, 1)]
    canonical = canonical_cells(keys, trainable=["nagl"])
    for kn in (1, 2):
        target = key("knn-normal", "-", kn, 0)
        aliases = {k for k, of in canonical.items() if of == target and k != target}
        assert aliases == {key("nagl", s, kn, 0, t) for s in ("s1", "s2") for t in (0, 1)} | {key("knn-naive", "-", kn, 0)}
    computed = [k for k, of in canonical.items() if of == k]
    assert set(computed) == set([key("knn-normal", "-", kn, 0) for kn in (1, 2)]
                                      + [key("nagl", s, kn, 1, t) for s in ("s1", "s2") for t in (0, 1) for kn in (1, 2)]
                                      + [key("knn-naive", "-", kn, 1) for kn in (1, 2)])
    # Without a training-free member, the first trainable cell in job order computes.
    only_nagl = canonical_cells([k for k in keys if k.method == "nagl"], trainable=["nagl"])
    assert only_nagl[key("nagl", "s2", 1, 0, 1)] == key("nagl", "s1", 1, 0, 0)


MINI_REGISTRY = """
datasets:
  mini-texture:
    kind: embedded
    domain: industrial-texture
    preset: textures
    categories: [brick]
    counts: {train_good: 4, test_good: 3, test_anomalous: 4}
"""


def test_mini_matrix_computes_each_cell_once_and_stores_every_alias(project):
    from nagl.cli.run import step_evaluate, step_features
    from nagl.config import write_effective_config
    from nagl.data.layout import read_manifest
    from nagl.data.prepare import dataset_path, prepare_dataset
    from nagl.evaluate import Evaluator
    from nagl.io import read_json
    from nagl.methods.base import anomaly_maps, image_scores
    from nagl.metrics import image_metrics
    from nagl.paths import database, features_job, job_file, model_dir
    from nagl.protocol import draw_reference_split
    from nagl.results.ingest import ingest_run

    root = project(MINI_REGISTRY)
    config = validate_config({
        "backbone": "effnet-lite0", "image_size": 64, "eval_resolution": 32,
        "methods": ["nagl", "knn-normal", "knn-naive"], "sources": ["mini-texture"], "targets": ["mini-texture"],
        "shots": {"k_normal": [1, 2], "k_abnormal": [0, 1]}, "seeds": [0], "training": {"profile": "smoke", "seeds": [0]}})
    prepare_dataset("mini-texture", version=False)
    run_config = write_effective_config(config)
    step_features(["mini-texture"], config=run_config, out=features_job(config.results, config.backbone), threads=1)
    backbone_dim = Evaluator(config, "knn-normal", "-", "mini-texture", root / config.results).backbone.dim
    # Any head will do: the aliases hold for every weight; an untrained checkpoint saves training here.
    nagl = create_method("nagl", dim=backbone_dim, proxies=4, seed=5)
    total, trainable = nagl.parameter_counts()
    nagl.save(model_dir(config.results, "nagl", config.backbone, "mini-texture", 0),
              {"backbone": config.backbone, "source": "mini-texture", "training_profile": "untrained",
               "params_total": total, "params_trainable": trainable, "source_dataset_hash": None,
               "train_seconds": 1.0, "source_datasets": ["mini-texture"], "train_seed": 0})

    jobs = []
    for (method, source, train_seed), targets in config.evaluation_groups().items():
        job = job_file(config.results, method, config.backbone, source, train_seed)
        step_evaluate(targets=targets, method=method, source=source, config=run_config, out=job, threads=1,
                      train_seed="-" if train_seed is None else str(train_seed))
        jobs.append(job)
    computed = [cell for job in jobs for cell in read_json(job)["computed"]]
    aliased = [cell for job in jobs for cell in read_json(job)["aliases"]]
    # knn-normal (k_abnormal 0 only: it ignores abnormal references) computes (1,0) and (2,0); nagl and
    # knn-naive compute their k_abnormal = 1 cells, their k_abnormal = 0 cells are aliases.
    assert sorted(cell.split("/cells/")[1] for cell in computed) == sorted(
        f"{method}/effnet-lite0/{source}/{train_seed}/mini-texture/brick/n{kn}a{ka}s0"
        for method, source, train_seed, ka in (("knn-normal", "-", "-", 0), ("nagl", "mini-texture", "0", 1),
                                               ("knn-naive", "-", "-", 1))
        for kn in (1, 2))
    assert len(aliased) == 4 and not set(aliased) & set(computed)
    # ingest still sees every cell
    assert sorted(len(json.loads(job.read_text())["cells"]) for job in jobs) == [2, 4, 4]
    for cell in aliased:
        assert sorted(p.name for p in (root / cell).iterdir()) == ["run.json"]  # nothing scored, nothing stored
        assert read_json(root / cell / "run.json")["alias_of"]

    ingest_run(config.as_dict(), jobs, database(config.results))
    with duckdb.connect(str(root / database(config.results)), read_only=True) as con:
        assert con.execute("SELECT COUNT(*), COUNT(alias_of) FROM runs").fetchone() == (10, 4)
        assert con.execute("SELECT COUNT(DISTINCT (method, k_normal, k_abnormal)) FROM runs").fetchone() == (10,)
        assert con.execute("SELECT COUNT(DISTINCT run_id) FROM scores").fetchone() == (6,)  # stored once
        pairs = con.execute("""
            SELECT a.method, a.k_normal, a.k_abnormal, c.method, c.k_normal, c.k_abnormal,
                   list(am.value ORDER BY am.level, am.metric) = list(cm.value ORDER BY cm.level, cm.metric),
                   a.eval_seconds = c.eval_seconds
            FROM runs a JOIN runs c ON c.run_id = a.alias_of
            JOIN metrics am ON am.run_id = a.run_id
            JOIN metrics cm ON cm.run_id = c.run_id AND cm.level = am.level AND cm.metric = am.metric
            GROUP BY ALL""").fetchall()
        assert len(pairs) == 4 and all(row[6] and row[7] for row in pairs)
        assert all(row[3] == "knn-normal" and row[5] == 0 and row[1] == row[4] for row in pairs)
        # Every method keeps its gallery at the largest setting, the alias's copied from the computed cell.
        galleries = con.execute("""
            SELECT r.method, r.k_normal, r.k_abnormal, r.alias_of IS NOT NULL, list(g.map_png ORDER BY g.image_path)
            FROM gallery g JOIN runs r USING (run_id) GROUP BY ALL ORDER BY ALL""").fetchall()
        at_largest = {row[0]: row for row in galleries if (row[1], row[2]) == (2, 1)}
        assert sorted(at_largest) == ["knn-naive", "nagl"] and not any(row[3] for row in at_largest.values())
        knn_normal = [row for row in galleries if row[0] == "knn-normal"]
        assert [(row[1], row[2], row[3]) for row in knn_normal] == [(2, 0, False)]
        nagl_alias = dict(con.execute("""
            SELECT m.level || '.' || m.metric, m.value FROM runs r JOIN metrics m USING (run_id)
            WHERE r.method = 'nagl' AND r.k_normal = 2 AND r.k_abnormal = 0""").fetchall())

    # The alias's numbers are what NAGL itself computes for that cell.
    manifest = read_manifest(dataset_path("mini-texture"))
    split = draw_reference_split(manifest, "mini-texture", "brick", 0, 2, 1)
    evaluator = Evaluator(config, "nagl", "mini-texture", "mini-texture", root / config.results, 0)
    query, normal = evaluator._features(split.queries), evaluator._features(split.normal)
    with torch.no_grad():
        direct = evaluator.method.score(query, normal[:2], None, None, evaluator.backbone.grid)
    image = image_metrics(split.queries["label"].to_numpy(), image_scores(direct).numpy().astype(np.float64))
    pixel = pixel_metrics(evaluator._masks(split.queries, 32), anomaly_maps(direct, 32).numpy())
    assert nagl_alias == {f"{level}.{name}": value for level, values in (("image", image), ("pixel", pixel))
                          for name, value in values.items()}

    # A rerun finds every cell (computed or alias) finished and scores nothing.
    again = Evaluator(config, "knn-normal", "-", "mini-texture", root / config.results)
    again._evaluate_split = lambda *args: pytest.fail("a finished cell was scored again")
    again._write_aliases = lambda split, keys, *args: keys and pytest.fail("a finished alias was written again")
    again.run()


def _aupro_per_threshold(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """The definition, one threshold at a time (slow; small inputs only)."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    regions, count = ndimage.label(masks, structure=structure)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append(np.count_nonzero(above & ~masks) / np.count_nonzero(~masks))
        pros.append(np.mean([np.count_nonzero(above[regions == r]) / np.count_nonzero(regions == r)
                             for r in range(1, count + 1)]))
    x, y = np.array(fprs), np.array(pros)
    keep = x <= fpr_limit
    area = np.trapezoid(y[keep], x[keep])
    last = np.flatnonzero(keep)[-1]
    if last + 1 < x.size and x[last] < fpr_limit:
        y_limit = np.interp(fpr_limit, x[last:last + 2], y[last:last + 2])
        area += (fpr_limit - x[last]) * (y[last] + y_limit) / 2
    return area / fpr_limit


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aupro_equals_the_per_threshold_definition(dtype):
    rng = np.random.default_rng(7)
    masks = np.zeros((3, 12, 10), bool)
    masks[0, 2:5, 3:7] = True
    masks[0, 8:11, 1:3] = True
    masks[2, 5:9, 4:9] = True
    maps = (rng.random(masks.shape) + 0.6 * masks).astype(dtype)
    maps[1, :4] = maps[1, 0, 0]  # a tie group spanning normal pixels
    maps[0, 2:4, 3:5] = maps[1, 0, 0]  # ... and region pixels
    for limit in (0.05, 0.3, 1.0):
        assert aupro(masks, maps, limit) == pytest.approx(_aupro_per_threshold(masks, maps, limit), abs=1e-12)


def test_shared_normal_side_gives_the_maps_each_method_computes_alone():
    """Evaluation computes the normal-side work of a split once (Method.normal_side), for every
    k_normal, and hands each batch its part, for the clean cell and its reference-use checks:
    the maps equal those the method computes alone."""
    generator = torch.Generator().manual_seed(5)
    query, normal, abnormal = _features(generator, 11), _features(generator, 4), _features(generator, 1)
    masks = torch.zeros((1, 30, 30), dtype=torch.bool)
    masks[0, 5:15, 5:15] = True
    for name in ("nagl", "knn-naive", "knn-normal"):
        method = _method(name)
        sides = method.normal_side(query, normal, [1, 2, 4])
        for k in (1, 2, 4):
            references = abnormal if method.uses_abnormal_refs else None
            alone = method.score(query, normal[:k], references, masks if references is not None else None, GRID)
            for begin in (0, 8):  # a full batch and the last, partial one
                shared = method.score(query[begin:begin + 8], normal[:k], references,
                                      masks if references is not None else None, GRID,
                                      normal_side=sides[k].rows(begin, begin + 8))
                assert torch.allclose(shared, alone[begin:begin + 8], atol=1e-6), (name, k, begin)
