"""The reference-use check (table reference_checks) and the flagged reference-code protocol (runs.protocol)."""

from __future__ import annotations

import hashlib
import io
import os

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from nagl.errors import NaglError
from nagl.protocol import (
    MANIFEST_COLUMNS,
    REFERENCE_CHECK_VARIANTS,
    draw_reference_code_split,
    draw_reference_split,
)
from nagl.reference_checks import PSEUDO_MASK_SIDE, centre_square, draw_swapped_references

# ------------------------------------------------------------ the draws, on a manifest --

TYPES = ("hole", "scratch")


def manifest(categories=("x", "y")) -> pd.DataFrame:
    """Per category: 5 train/good, 3 test/good, 3 anomalies of each of two defect types."""
    rows = []
    for category in categories:
        parts = [("train", "good", 5), ("test", "good", 3)] + [("test", defect, 3) for defect in TYPES]
        for split, defect, count in parts:
            for i in range(count):
                label = int(defect != "good")
                rows.append({
                    "dataset": "T", "category": category, "split": split, "label": label, "defect_type": defect,
                    "image_path": f"{category}/{split}/{defect}/{i:03d}.png",
                    "mask_path": f"{category}/ground_truth/{defect}/{i:03d}_mask.png" if label else None,
                    "image_sha256": hashlib.sha256(f"{category}{split}{defect}{i}".encode()).hexdigest(),
                    "width": 16, "height": 16,
                })
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_swap_variants_replace_the_abnormal_references_by_their_rule(seed):
    frame = manifest()
    split = draw_reference_split(frame, "T", "x", seed, max_k_normal=2, max_k_abnormal=2)
    variants = {v.variant: v for v in draw_swapped_references(frame, split, 2)}
    assert set(variants) == set(REFERENCE_CHECK_VARIANTS)
    clean = set(split.abnormal["image_path"])
    queries = set(split.queries["image_path"])

    other = variants["other-category-anomaly"]
    assert len(other.rows) == 2 and not other.square_mask
    assert set(other.rows["image_path"]).isdisjoint(clean)
    assert (other.rows["category"] == "y").all() and (other.rows["label"] == 1).all()
    assert (other.rows["split"] == "test").all() and other.rows["mask_path"].notna().all()

    normal = variants["normal-pseudo-mask"]
    assert len(normal.rows) == 2 and normal.square_mask
    assert (normal.rows["category"] == "x").all() and (normal.rows["label"] == 0).all()
    assert (normal.rows["split"] == "train").all()
    paths = set(normal.rows["image_path"])
    assert paths.isdisjoint(clean) and paths.isdisjoint(queries) and paths.isdisjoint(set(split.normal["image_path"]))

    # Seeded and nested: the same draw again; one reference fewer is a prefix.
    again = {v.variant: v for v in draw_swapped_references(frame, split, 1)}
    for name, variant in variants.items():
        assert list(again[name].rows["image_path"]) == list(variant.rows["image_path"])[:1]


def test_a_one_category_target_has_no_other_category_variant():
    frame = manifest(categories=("x",))
    split = draw_reference_split(frame, "T", "x", 0, max_k_normal=1, max_k_abnormal=1)
    assert [v.variant for v in draw_swapped_references(frame, split, 1)] == ["normal-pseudo-mask"]


def test_pseudo_mask_is_the_centre_square():
    mask = centre_square(64)
    rows, cols = np.nonzero(mask)
    side = round(64 * PSEUDO_MASK_SIDE)
    assert mask.sum() == side * side
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 47, 16, 47)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_code_draw_gives_anomalous_queries_references_of_their_own_type_from_the_test_set(seed):
    frame = manifest()
    code = draw_reference_code_split(frame, "T", "x", seed, max_k_normal=2, max_k_abnormal=2)
    test = frame[(frame["category"] == "x") & (frame["split"] == "test")]
    queries = code.split.queries
    # The whole test set is scored, the abnormal references included (as in the public code).
    assert set(queries["image_path"]) == set(test["image_path"])
    assert set(code.split.abnormal["image_path"]) <= set(queries["image_path"])
    assert sorted(code.by_type) == list(TYPES)
    for defect, refs in code.by_type.items():
        assert len(refs) == 2 and (refs["defect_type"] == defect).all() and (refs["split"] == "test").all()
    for (_, query), assigned in zip(queries.iterrows(), code.assigned_type, strict=True):
        if query["label"] == 1:
            assert assigned == query["defect_type"]
        else:
            assert assigned in TYPES
    # Normal references are the clean split's; the draw is seeded.
    clean = draw_reference_split(frame, "T", "x", seed, max_k_normal=2, max_k_abnormal=1)
    assert list(code.split.normal["image_path"]) == list(clean.normal["image_path"])
    again = draw_reference_code_split(frame, "T", "x", seed, max_k_normal=2, max_k_abnormal=2)
    assert again.to_json() == code.to_json() and code.to_json()["protocol"] == "reference-code"
    with pytest.raises(NaglError, match="defect type 'hole' has 3 test images"):
        draw_reference_code_split(frame, "T", "x", seed, max_k_normal=1, max_k_abnormal=4)


# ---------------------------------------------------- a miniature run with both ---------

MINI_REGISTRY = """
datasets:
  mini-texture:
    kind: embedded
    domain: industrial-texture
    preset: textures
    categories: [brick, grass]
    counts: {train_good: 4, test_good: 3, test_anomalous: 8}
"""
TARGET = "mini-texture"
METHODS = ("knn-naive", "knn-normal")  # knn-normal ignores abnormal references: no check


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """Both protocols and the checks on a 2-category embedded target; the database and a clean-only one."""
    from conftest import make_project

    from nagl.config import validate_config
    from nagl.data.prepare import prepare_dataset
    from nagl.evaluate import evaluate_job
    from nagl.paths import cells_dir
    from nagl.results.ingest import ingest

    base = tmp_path_factory.mktemp("refchecks")
    with pytest.MonkeyPatch.context() as patch:
        root = make_project(base / "project", MINI_REGISTRY)
        patch.setenv("NAGL_HOME", str(root))
        patch.setenv("NAGL_CACHE", str(base / "cache"))
        patch.chdir(root)
        config = validate_config({
            "backbone": "effnet-lite0", "image_size": 64, "eval_resolution": 32, "methods": list(METHODS),
            "sources": [], "targets": [TARGET], "shots": {"k_normal": [1], "k_abnormal": [0, 1]}, "seeds": [0],
            "training": {"profile": "smoke"}, "protocols": ["clean", "reference-code"]})
        prepare_dataset(TARGET, version=False)
        folders = [folder for method in METHODS for folder in evaluate_job(config, method, "-", TARGET)]
        results = root / config.results
        both = ingest(results, results / "both.duckdb", [], {})
        clean_folders = [f for f in folders if not f.endswith("-reference-code")]
        ingest(results, results / "clean.duckdb", [], {}, cell_dirs=clean_folders)
        yield {"root": root, "cache": base / "cache", "config": config, "folders": folders, "results": results, "summary": both,
               "cells": cells_dir(results), "evaluate": lambda m: evaluate_job(config, m, "-", TARGET)}


def fetch(db, sql):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_reference_checks_are_written_and_ingested_for_exactly_the_abnormal_reference_cells(mini_run):
    db = mini_run["results"] / "both.duckdb"
    rows = fetch(db, """
        SELECT r.method, r.protocol, r.k_abnormal, r.category, list_sort(list(c.variant))
        FROM runs r LEFT JOIN reference_checks c USING (run_id) GROUP BY ALL ORDER BY ALL""")
    with_checks = [r for r in rows if r[4] != [None]]
    assert sorted((r[0], r[1], r[2], r[3]) for r in with_checks) == [
        ("knn-naive", "clean", 1, "brick"), ("knn-naive", "clean", 1, "grass")]
    assert all(r[4] == sorted(REFERENCE_CHECK_VARIANTS) for r in with_checks)
    # Every other cell (k_abnormal = 0, knn-normal, reference-code) has none, and no file.
    # knn-naive: 2 categories x (k_abnormal 0, 1, 1 under reference-code); knn-normal (it ignores abnormal
    # references): 2 categories x k_abnormal 0 only.
    assert len(rows) == 2 * 3 + 2 * 1 and mini_run["summary"]["reference_checks"] == 4
    files = sorted(os.path.relpath(p, mini_run["cells"]) for p in mini_run["cells"].rglob("reference_checks.parquet"))
    assert files == [f"knn-naive/effnet-lite0/-/-/{TARGET}/{c}/n1a1s0/reference_checks.parquet" for c in ("brick", "grass")]
    values = fetch(db, "SELECT image_auroc, pixel_auroc FROM reference_checks")
    assert all(0.0 <= image <= 1.0 and 0.0 <= pixel <= 1.0 for image, pixel in values)


def test_stored_check_is_the_cell_scored_with_the_swapped_references(mini_run):
    """Recompute one variant by hand from the cell's split, the swapped rows and the cached features."""
    from nagl.data.images import load_mask
    from nagl.data.prepare import dataset_path
    from nagl.evaluate import feature_cache
    from nagl.methods import create_method
    from nagl.methods.base import image_scores
    from nagl.metrics import image_metrics
    from nagl.models.backbones import create_backbone
    from nagl.protocol import ReferenceSplit

    folder = mini_run["cells"] / "knn-naive" / "effnet-lite0" / "-" / "-" / TARGET / "grass" / "n1a1s0"
    split = ReferenceSplit.read(folder / "split.json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAGL_HOME", str(mini_run["root"]))
        patch.setenv("NAGL_CACHE", str(mini_run["cache"]))
        patch.chdir(mini_run["root"])
        root = dataset_path(TARGET)
        frame = pd.read_parquet(root / "manifest.parquet")
        backbone = create_backbone("effnet-lite0", 64)
        cache = feature_cache(backbone)
        stored = dict(pd.read_parquet(folder / "reference_checks.parquet")[["variant", "image_auroc"]].values)
        method = create_method("knn-naive", dim=backbone.dim)
        for variant in draw_swapped_references(frame, split, 1):
            assert variant.rows["image_path"].iloc[0] != split.abnormal["image_path"].iloc[0]
            masks = (np.stack([centre_square(64)]) if variant.square_mask
                     else np.stack([load_mask(root / variant.rows["mask_path"].iloc[0], 64)]))
            patch_map = method.score(cache.load(list(split.queries["image_sha256"])),
                                     cache.load(list(split.normal["image_sha256"])),
                                     cache.load(list(variant.rows["image_sha256"])), torch.from_numpy(masks),
                                     backbone.grid)
            scores = image_scores(patch_map).numpy().astype(np.float64)
            expected = image_metrics(split.queries["label"].to_numpy(), scores)["auroc"]
            assert stored[variant.variant] == pytest.approx(expected, abs=1e-12)


def test_reference_code_cells_are_flagged_and_never_reach_the_clean_leaderboard(mini_run):
    from nagl.report.main_table import load_main_table
    from nagl.report.queries import load

    both, clean = mini_run["results"] / "both.duckdb", mini_run["results"] / "clean.duckdb"
    protocols = fetch(both, "SELECT protocol, k_abnormal, COUNT(*) FROM runs GROUP BY ALL ORDER BY ALL")
    assert protocols == [("clean", 0, 4), ("clean", 1, 2), ("reference-code", 1, 2)]
    # The reference-code cells score the whole test set: their own references included.
    assert fetch(both, """SELECT DISTINCT c.n_queries - r.n_queries FROM runs c JOIN runs r
                          USING (method, category, k_normal, k_abnormal, seed)
                          WHERE c.protocol = 'reference-code' AND r.protocol = 'clean'""") == [(1,)]
    for view in ("leaderboard", "pair_summary", "target_means", "cell_metrics"):
        assert fetch(both, f"SELECT * FROM {view} ORDER BY ALL") == fetch(clean, f"SELECT * FROM {view} ORDER BY ALL")
    with duckdb.connect(str(both), read_only=True) as con_both, duckdb.connect(str(clean), read_only=True) as con_clean:
        assert load_main_table(con_both) == load_main_table(con_clean)
        data_both, data_clean = load(con_both), load(con_clean)
    for field in ("leaderboard", "pairs", "per_target", "per_category", "efficiency", "speed", "gallery"):
        assert getattr(data_both, field) == getattr(data_clean, field), field
    inflation = {(r["method"], r["k_abnormal"]): r for r in data_both.inflation}
    # knn-normal ignores abnormal references: it has no k_abnormal > 0 cell under either protocol.
    assert set(inflation) == {("knn-naive", 1)} and all(r["n_cells"] == 2 for r in inflation.values())
    assert data_clean.inflation == []
    # The report's leaderboard never reads a reference-code number.
    lb = fetch(both, "SELECT mean FROM leaderboard WHERE method = 'knn-naive' AND k_abnormal = 1 "
                     "AND level = 'image' AND metric = 'auroc'")
    assert lb == fetch(both, """SELECT AVG(value) FROM runs JOIN metrics USING (run_id) WHERE protocol = 'clean'
                               AND method = 'knn-naive' AND k_abnormal = 1 AND level = 'image' AND metric = 'auroc'""")


def test_report_shows_both_trust_tables_from_a_real_run(mini_run, tmp_path):
    from nagl.report.build import build_report

    html = build_report(mini_run["results"] / "both.duckdb", tmp_path / "r.html").read_text(encoding="utf-8")
    trust = html.split('<section id="trust">')[1].split("</section>")[0]
    assert "Not computed" not in trust
    checks = trust.split('id="table-reference-checks"')[1].split("</table>")[0]
    assert checks.count("<tr>") == 1 + 2  # header + knn-naive's two variants
    assert all(name in checks for name in REFERENCE_CHECK_VARIANTS) and "knn-normal" not in checks
    inflation = trust.split('id="table-inflation"')[1].split("</table>")[0]
    assert inflation.count("<tr>") == 1 + 1 and "knn-naive" in inflation and "knn-normal" not in inflation


def test_a_missing_check_file_reruns_only_its_cell(mini_run):
    cell = mini_run["cells"] / "knn-naive" / "effnet-lite0" / "-" / "-" / TARGET / "brick" / "n1a1s0"
    other = cell.parent / "n1a0s0"
    check_file = cell / "reference_checks.parquet"
    before = check_file.read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (cell / "run.json", other / "run.json")}
    check_file.unlink()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAGL_HOME", str(mini_run["root"]))
        patch.setenv("NAGL_CACHE", str(mini_run["cache"]))
        patch.chdir(mini_run["root"])
        mini_run["evaluate"]("knn-naive")
    assert pd.read_parquet(check_file).equals(pd.read_parquet(io.BytesIO(before)))
    assert (cell / "run.json").stat().st_mtime_ns != stamps[cell / "run.json"]
    assert (other / "run.json").stat().st_mtime_ns == stamps[other / "run.json"]


def test_inflation_pairs_the_same_checkpoint_when_runs_have_training_seeds():
    """With runs.train_seed, a reference-code cell is compared with the clean cell of its own training seed."""
    from nagl.report.trust import protocol_inflation

    con = duckdb.connect()
    con.execute("""CREATE TABLE runs (run_id VARCHAR, method VARCHAR, backbone VARCHAR, source VARCHAR,
        target VARCHAR, category VARCHAR, k_normal INTEGER, k_abnormal INTEGER, seed INTEGER, in_domain BOOLEAN,
        protocol VARCHAR, train_seed INTEGER)""")
    con.execute("CREATE TABLE metrics (run_id VARCHAR, level VARCHAR, metric VARCHAR, value DOUBLE)")
    cells = [("free", "-", None, 0.5, 0.7), ("trained", "s", 0, 0.5, 0.6), ("trained", "s", 1, 0.4, 0.6)]
    for method, source, train_seed, clean, leaked in cells:
        for protocol, value in (("clean", clean), ("reference-code", leaked)):
            run_id = f"{method}{train_seed}{protocol}"
            con.execute("INSERT INTO runs VALUES (?, ?, 'bb', ?, 't', 'c', 1, 1, 0, false, ?, ?)",
                        [run_id, method, source, protocol, train_seed])
            con.execute("INSERT INTO metrics VALUES (?, 'image', 'auroc', ?)", [run_id, value])
    rows = {r["method"]: r for r in protocol_inflation(con)}
    assert rows["free"]["inflation"] == pytest.approx(0.2) and rows["free"]["n_cells"] == 1
    assert rows["trained"]["inflation"] == pytest.approx(0.15) and rows["trained"]["n_cells"] == 2
    assert rows["trained"]["clean"] == pytest.approx(0.45)
