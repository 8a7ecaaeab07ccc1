"""The results layer: cell files, ingest into DuckDB, the leaderboard views, read-only queries, `nagl query`."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import shutil
import statistics
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from nagl.errors import NaglError
from nagl.io import atomic_write_json, read_json
from nagl.protocol import MANIFEST_COLUMNS, draw_reference_split
from nagl.results.cell import write_cell
from nagl.results.ingest import ingest
from nagl.results.query import query
from nagl.results.schema import cell_dir

# Targets and their categories; target C has no masks (its pixel metrics are NULL).
TARGETS = {"A": ["x", "y"], "B": ["x"], "C": ["z"]}
WITH_MASKS = {"A", "B"}
SEEDS = (0, 1)
# Image AUROC of nagl per (source, target); categories and seeds add offsets.
NAGL_AUROC = {
    ("A", "A"): 0.88,  # in-domain: must stay out of the leaderboard
    ("A", "B"): 0.70,
    ("A", "C"): 0.60,
    ("B", "A"): 0.80,
    ("B", "B"): 0.87,  # in-domain
    ("B", "C"): 0.65,
}
CATEGORY_OFFSET = {"x": 0.0, "y": 0.1, "z": 0.0}
KNN_AUROC = {"A": 0.55, "B": 0.5, "C": 0.45}
DATASETS = [
    {"name": n, "domain": "industrial", "content_hash": f"md5-{n}", "n_categories": len(c), "n_images": 13 * len(c),
     "n_anomalous": 3 * len(c), "has_masks": n in WITH_MASKS, "anomaly": "defect", "licence": None}
    for n, c in TARGETS.items()
]
PROVENANCE = {"git_commit": "abc123", "version.nagl": "0.1.0"}


def manifest(target: str) -> pd.DataFrame:
    rows = []
    for category in TARGETS[target]:
        for split, defect, count in (("train", "good", 4), ("test", "good", 3), ("test", "scratch", 3)):
            for i in range(count):
                label = int(defect != "good")
                rows.append({
                    "dataset": target, "category": category, "split": split, "label": label, "defect_type": defect,
                    "image_path": f"{category}/{split}/{defect}/{i:03d}.png",
                    "mask_path": f"{category}/ground_truth/{defect}/{i:03d}_mask.png" if label and target in WITH_MASKS else None,
                    "image_sha256": hashlib.sha256(f"{target}{category}{split}{defect}{i}".encode()).hexdigest(),
                    "width": 16, "height": 16,
                })
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def run_row(method, source, target, category, seed, split, k_normal=1, k_abnormal=0):
    queries = split.queries
    key = f"{method}|{source}|{target}|{category}|{k_normal}|{k_abnormal}|{seed}"
    return {
        "run_id": hashlib.sha256(key.encode()).hexdigest()[:20],
        "method": method, "backbone": "bb", "backbone_identity": "bb@32:0123", "source": source,
        "target": target, "category": category, "k_normal": k_normal, "k_abnormal": k_abnormal, "seed": seed,
        "train_seed": None if source == "-" else 0,
        "source_datasets": None if source == "-" else [source],
        "in_domain": source == target, "image_size": 32, "eval_resolution": 16,
        "n_queries": len(queries), "n_anomalous_queries": int(queries["label"].sum()),
        "n_pseudo_masks": 0 if target in WITH_MASKS else k_abnormal,
        "alias_of": None,
        "config_hash": "cfg", "method_config_hash": "mcfg",
        "checkpoint_hash": None if source == "-" else "ckpt", "source_dataset_hash": None if source == "-" else f"md5-{source}",
        "target_dataset_hash": f"md5-{target}", "split_hash": split.hash, "git_commit": None,
        "nagl_version": "0.1.0", "torch_version": "2.0", "python_version": "3.11",
        "train_seconds": None if source == "-" else 12.5, "eval_seconds": 0.5, "images_per_second": 20.0,
        "created_at": "2025-06-01T12:00:00+00:00",
        "protocol": "clean",
    }


@functools.cache
def reference_split(target, category, seed):
    return draw_reference_split(manifest(target), target, category, seed, max_k_normal=2, max_k_abnormal=1)


def write_example(results: Path, method, source, target, category, seed, auroc, gallery=False):
    split = reference_split(target, category, seed)
    run = run_row(method, source, target, category, seed, split)
    queries = split.queries
    labels = queries["label"].to_numpy()
    scores = pd.DataFrame({"image_path": queries["image_path"], "defect_type": queries["defect_type"],
                           "label": labels, "score": np.linspace(0, 1, len(queries))})
    pixel = ({"auroc": auroc - 0.05, "ap": 0.3, "f1max": 0.4, "aupro": auroc - 0.1} if target in WITH_MASKS
             else {"auroc": None, "ap": None, "f1max": None, "aupro": None})
    metrics = {"image": {"auroc": auroc, "ap": 0.5, "f1max": 0.6}, "pixel": pixel}
    gallery_df = None
    if gallery:
        gallery_df = pd.DataFrame({"image_path": queries["image_path"][:2], "label": labels[:2],
                                   "image_png": [b"img0", b"img1"], "mask_png": [None, b"m"],
                                   "map_png": [b"map0", b"map1"]})
    folder = cell_dir(results, run)
    write_cell(folder, run, metrics, scores, split.to_json(), gallery_df)
    return folder


def build_results(results: Path) -> int:
    """Every nagl (trained on A and B) and knn (training-free) cell; returns the cell count."""
    count = 0
    for (source, target), base in NAGL_AUROC.items():
        for category in TARGETS[target]:
            for seed in SEEDS:
                value = base + CATEGORY_OFFSET[category] + 0.02 * seed
                write_example(results, "nagl", source, target, category, seed, value,
                              gallery=(source, target, category, seed) == ("A", "B", "x", 0))
                count += 1
    for target, base in KNN_AUROC.items():
        for category in TARGETS[target]:
            for seed in SEEDS:
                write_example(results, "knn", "-", target, category, seed, base + 0.01 * seed)
                count += 1
    for method, source in (("nagl", "A"), ("nagl", "B"), ("knn", "-")):
        atomic_write_json(results / "models" / method / "bb" / source / "model.json", {
            "method": method, "backbone": "bb", "source": source, "train_seed": None if source == "-" else 0,
            "checkpoint_hash": None if source == "-" else "ckpt", "training_profile": None if source == "-" else "quick",
            "params_total": 1000, "params_trainable": 0 if source == "-" else 100,
            "train_seconds": None if source == "-" else 12.5, "source_dataset_hash": None if source == "-" else f"md5-{source}",
            "config": {"lr": 0.001},  # extra keys are ignored
        })
    return count


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    n_cells = build_results(results)
    db = results / "benchmark.duckdb"
    summary = ingest(results, db, DATASETS, PROVENANCE)
    return results, db, n_cells, summary


@pytest.fixture
def results_copy(built, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(built[0], results)
    return results


def fetch(db, sql):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# ------------------------------------------------------------------ ingest --


def test_ingest_counts_rows(built):
    _, db, n_cells, summary = built
    assert n_cells == 24
    n_splits = sum(len(c) for c in TARGETS.values()) * len(SEEDS)
    assert summary == {"db": str(db), "runs": 24, "metrics": 24 * 7, "scores": 24 * 5, "reference_splits": n_splits,
                       "models": 3, "datasets": 3, "gallery": 2, "reference_checks": 0, "provenance": 2, "unfinished": 0,
                       "aliases": 0}
    counts = {t: fetch(db, f"SELECT count(*) FROM {t}")[0][0]
              for t in ("runs", "metrics", "scores", "reference_splits", "models", "datasets", "gallery", "provenance")}
    assert counts == {"runs": 24, "metrics": 168, "scores": 120, "reference_splits": n_splits * 3,
                      "models": 3, "datasets": 3, "gallery": 2, "provenance": 2}
    # One split per (target, category, seed), shared by every method and source: deduplicated.
    assert fetch(db, "SELECT count(DISTINCT split_hash) FROM runs")[0][0] == n_splits
    assert fetch(db, "SELECT role, count(*) FROM reference_splits GROUP BY role ORDER BY role") == [
        ("abnormal", n_splits), ("normal", 2 * n_splits)]
    assert fetch(db, "SELECT count(*) FROM runs WHERE in_domain") == [(6,)]
    assert fetch(db, "SELECT typeof(created_at), min(created_at)::VARCHAR FROM runs GROUP BY 1") == [
        ("TIMESTAMP", "2025-06-01 12:00:00")]
    assert fetch(db, "SELECT value FROM provenance WHERE key = 'git_commit'") == [("abc123",)]
    assert fetch(db, "SELECT mask_png FROM gallery ORDER BY image_path") in ([(None,), (b"m",)], [(b"m",), (None,)])
    assert fetch(db, "SELECT count(*) FROM models WHERE train_seconds IS NULL") == [(1,)]


def test_leaderboard_excludes_in_domain_and_matches_hand_computation(built):
    db = built[1]
    rows = fetch(db, "SELECT mean, std, n_seeds, n_targets, n_categories FROM leaderboard "
                     "WHERE method = 'nagl' AND level = 'image' AND metric = 'auroc'")
    # Per seed s: target A (from B) (0.80 + 0.90)/2, target B (from A) 0.70, target C mean(0.60, 0.65); + 0.02 s.
    per_seed = [((0.85 + 0.70 + 0.625) / 3) + 0.02 * s for s in SEEDS]
    assert per_seed[0] == pytest.approx(0.725)
    (mean, std, n_seeds, n_targets, n_categories), = rows
    assert mean == pytest.approx(statistics.mean(per_seed)) and mean == pytest.approx(0.735)
    assert std == pytest.approx(statistics.stdev(per_seed))
    assert (n_seeds, n_targets, n_categories) == (2, 3, 4)
    # Pixel metrics exist for A and B only: the mean is over two targets and three categories.
    (pmean, pn_targets, pn_categories), = fetch(db, "SELECT mean, n_targets, n_categories FROM leaderboard "
                                                    "WHERE method = 'nagl' AND level = 'pixel' AND metric = 'aupro'")
    assert pmean == pytest.approx(statistics.mean([(0.75 + 0.60) / 2 + 0.02 * s for s in SEEDS]))
    assert (pn_targets, pn_categories) == (2, 3)
    # The in-domain pair is still in pair_summary, flagged.
    assert fetch(db, "SELECT in_domain, round(mean, 6) FROM pair_summary WHERE method = 'nagl' AND source = 'B' "
                     "AND target = 'B' AND level = 'image' AND metric = 'auroc'") == [(True, 0.88)]


def test_null_pixel_metrics_stay_null(built):
    db = built[1]
    assert fetch(db, "SELECT count(*), count(value) FROM cell_metrics WHERE target = 'C' AND level = 'pixel'") == [(24, 0)]
    assert fetch(db, "SELECT count(*) FROM metrics WHERE value = 0") == [(0,)]
    (mean, n_seeds), = fetch(db, "SELECT mean, n_seeds FROM pair_summary WHERE method = 'knn' AND target = 'C' "
                                 "AND level = 'pixel' AND metric = 'aupro'")
    assert mean is None and n_seeds == 0


def test_reingest_is_idempotent_and_leaves_no_temporary_files(built, tmp_path):
    results, db, _, summary = built
    before = {t: fetch(db, f"SELECT * FROM {t} ORDER BY ALL") for t in ("runs", "metrics", "scores", "reference_splits")}
    again = ingest(results, db, DATASETS, PROVENANCE)
    assert again == summary
    after = {t: fetch(db, f"SELECT * FROM {t} ORDER BY ALL") for t in before}
    assert after == before
    assert sorted(p.name for p in db.parent.iterdir() if p.is_file()) == ["benchmark.duckdb"]


def test_only_listed_cells_are_ingested(built, tmp_path):
    results = built[0]
    folders = sorted(p.parent for p in (results / "cells" / "knn").rglob("run.json"))
    summary = ingest(results, tmp_path / "knn.duckdb", DATASETS, PROVENANCE, cell_dirs=[str(f) for f in folders])
    assert summary["runs"] == 8
    assert fetch(tmp_path / "knn.duckdb", "SELECT DISTINCT method FROM runs") == [("knn",)]


def test_unfinished_cell_is_skipped(results_copy, tmp_path):
    unfinished = next((results_copy / "cells" / "knn").rglob("run.json"))
    unfinished.unlink()
    summary = ingest(results_copy, tmp_path / "db.duckdb", DATASETS, PROVENANCE)
    assert summary["runs"] == 23 and summary["unfinished"] == 1
    assert summary["scores"] == 23 * 5


def test_malformed_cell_fails_naming_the_file_and_keeps_the_old_database(results_copy, built, tmp_path):
    db = tmp_path / "benchmark.duckdb"
    shutil.copy(built[1], db)
    folder = next((results_copy / "cells" / "nagl").rglob("run.json")).parent
    (folder / "metrics.json").write_text("{broken")
    with pytest.raises(NaglError, match=str(folder / "metrics.json")):
        ingest(results_copy, db, DATASETS, PROVENANCE)
    assert fetch(db, "SELECT count(*) FROM runs") == [(24,)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["benchmark.duckdb"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "scores.parquet").write_bytes(b"not parquet"), "scores.parquet"),
        (lambda f: (f / "split.json").unlink(), "split.json is missing"),
        (lambda f: atomic_write_json(f / "run.json", {k: v for k, v in read_json(f / "run.json").items() if k != "seed"}),
         "missing seed"),
        (lambda f: atomic_write_json(f / "run.json", {**read_json(f / "run.json"), "k_normal": "one"}),
         "`k_normal` must be an integer"),
        (lambda f: atomic_write_json(f / "run.json", {**read_json(f / "run.json"), "n_queries": 99}),
         "run.json records 99 queries"),
        (lambda f: atomic_write_json(f / "run.json", {**read_json(f / "run.json"), "split_hash": "0" * 64}),
         "split_hash"),
        (lambda f: atomic_write_json(f / "metrics.json", {"image": {"auroc": 1.5, "ap": 0.1, "f1max": 0.1},
                                                          "pixel": read_json(f / "metrics.json")["pixel"]}),
         "must be a number in"),
        (lambda f: shutil.copytree(f, f.with_name("n9a9s9")), "moved or copied"),
    ],
)
def test_damaged_cells_raise_naglerror(results_copy, tmp_path, damage, message):
    folder = sorted((results_copy / "cells" / "nagl").rglob("run.json"))[0].parent
    damage(folder)
    with pytest.raises(NaglError, match=message):
        ingest(results_copy, tmp_path / "db.duckdb", DATASETS, PROVENANCE)
    assert not (tmp_path / "db.duckdb").exists()


def test_bad_model_dataset_and_provenance_rows(results_copy, tmp_path):
    db = tmp_path / "db.duckdb"
    with pytest.raises(NaglError, match="datasets row 0: unknown keys colour"):
        ingest(results_copy, db, [{**DATASETS[0], "colour": "red"}], PROVENANCE)
    with pytest.raises(NaglError, match="listed twice"):
        ingest(results_copy, db, [DATASETS[0], DATASETS[0]], PROVENANCE)
    with pytest.raises(NaglError, match="provenance"):
        ingest(results_copy, db, DATASETS, {"seeds": 3})
    model = results_copy / "models" / "knn" / "bb" / "-" / "model.json"
    atomic_write_json(model, {k: v for k, v in read_json(model).items() if k != "params_total"})
    with pytest.raises(NaglError, match=rf"{model}: missing params_total"):
        ingest(results_copy, db, DATASETS, PROVENANCE)


# -------------------------------------------------------------- write_cell --


def test_write_cell_checks_before_writing_and_rewrites_cleanly(tmp_path):
    results = tmp_path / "results"
    folder = write_example(results, "nagl", "A", "B", "x", 0, 0.7, gallery=True)
    assert sorted(p.name for p in folder.iterdir()) == ["gallery.parquet", "metrics.json", "run.json",
                                                        "scores.parquet", "split.json"]
    first_run = read_json(folder / "run.json")
    assert first_run["created_at"] == "2025-06-01T12:00:00+00:00" and first_run["git_commit"] is None

    split = draw_reference_split(manifest("B"), "B", "x", 0, 2, 1)
    run = run_row("nagl", "A", "B", "x", 0, split)
    scores = pd.DataFrame({"image_path": split.queries["image_path"], "defect_type": split.queries["defect_type"],
                           "label": split.queries["label"], "score": 0.5})
    metrics = {"image": {"auroc": 0.5, "ap": 0.5, "f1max": 0.5},
               "pixel": {"auroc": None, "ap": None, "f1max": None, "aupro": None}}
    with pytest.raises(NaglError, match="run.json: missing eval_seconds"):
        write_cell(folder, {k: v for k, v in run.items() if k != "eval_seconds"}, metrics, scores, split.to_json())
    other = draw_reference_split(manifest("B"), "B", "x", 1, 2, 1)
    with pytest.raises(NaglError, match="split_hash"):
        write_cell(folder, run, metrics, scores, other.to_json())
    with pytest.raises(NaglError, match="in_domain"):
        write_cell(folder, {**run, "in_domain": True}, metrics, scores, split.to_json())
    with pytest.raises(NaglError, match="must be written to results/cells/nagl/bb/A/0/B/x/n1a0s0"):
        write_cell(folder.with_name("n2a0s0"), run, metrics, scores, split.to_json())
    with pytest.raises(NaglError, match="`score` has null values"):
        write_cell(folder, run, metrics, scores.assign(score=np.nan), split.to_json())
    assert read_json(folder / "run.json") == first_run  # failed checks touched nothing

    write_cell(folder, {**run, "eval_seconds": np.float64(2.0), "k_normal": np.int64(1)}, metrics, scores,
               split.to_json())
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "run.json", "scores.parquet", "split.json"]
    assert read_json(folder / "run.json")["eval_seconds"] == 2.0
    assert read_json(folder / "metrics.json")["pixel"]["aupro"] is None


# ------------------------------------------------------------------- query --


def test_query_reads(built):
    db = built[1]
    frame = query(db, "SELECT method, count(*) AS n FROM runs GROUP BY method ORDER BY method")
    assert frame.to_dict(orient="list") == {"method": ["knn", "nagl"], "n": [8, 16]}
    assert len(query(db, "WITH t AS (SELECT * FROM leaderboard) SELECT * FROM t")) > 0
    assert "runs" in set(query(db, "SHOW TABLES")["name"])
    assert "split_hash" in set(query(db, "DESCRIBE runs")["column_name"])
    assert "run_id" in set(query(db, "PRAGMA table_info('runs')")["name"])
    assert len(query(db, "EXPLAIN SELECT * FROM runs")) > 0


@pytest.mark.parametrize("sql", [
    "INSERT INTO provenance VALUES ('a', 'b')",
    "CREATE TABLE t (a INTEGER)",
    "DROP TABLE runs",
    "COPY runs TO 'out.csv'",
    "ATTACH 'other.duckdb' AS other",
    "UPDATE runs SET seed = 5",
    "DELETE FROM runs",
    "SELECT 1; DROP TABLE runs",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO 'out.csv'",
    "SET threads = 4",
])
def test_query_refuses_anything_but_a_read(built, sql, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NaglError, match="nagl query is read-only"):
        query(built[1], sql)
    assert fetch(built[1], "SELECT count(*) FROM runs") == [(24,)]
    assert list(tmp_path.iterdir()) == []


def test_query_errors_are_clear(built, tmp_path):
    with pytest.raises(NaglError, match="run `nagl run` first"):
        query(tmp_path / "missing.duckdb", "SELECT 1")
    with pytest.raises(NaglError, match="the query failed"):
        query(built[1], "SELECT no_such_column FROM runs")
    with pytest.raises(NaglError, match="exactly one statement"):
        query(built[1], "SELECT 1; SELECT 2")
    with pytest.raises(NaglError, match="cannot parse"):
        query(built[1], "SELEKT 1")


# --------------------------------------------------------------------- CLI --


def test_cli_query_formats(built):
    from nagl.cli.main import _app

    db = str(built[1])
    sql = ("SELECT target, level, metric, value FROM cell_metrics WHERE method = 'knn' AND category = 'z' "
           "AND seed = 0 AND metric = 'auroc' ORDER BY level")
    runner = CliRunner()

    result = runner.invoke(_app, ["query", sql, "--db", db, "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert rows == [{"target": "C", "level": "image", "metric": "auroc", "value": "0.45"},
                    {"target": "C", "level": "pixel", "metric": "auroc", "value": ""}]

    result = runner.invoke(_app, ["query", sql, "--db", db, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"target": "C", "level": "image", "metric": "auroc", "value": 0.45},
                                         {"target": "C", "level": "pixel", "metric": "auroc", "value": None}]

    result = runner.invoke(_app, ["query", sql, "--db", db])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("target" in line and "value" in line for line in lines)
    assert any("image" in line and "0.45" in line for line in lines)
    assert any("pixel" in line and "NULL" in line for line in lines)
    assert "2 rows" in result.output

    result = runner.invoke(_app, ["query", "SELECT image_png FROM gallery WHERE image_png = 'img0'::BLOB",
                                  "--db", db, "--format", "json"])
    assert json.loads(result.output) == [{"image_png": "aW1nMA=="}]  # base64 of b"img0"

    result = runner.invoke(_app, ["query", "DROP TABLE runs", "--db", db])
    assert result.exit_code != 0
    assert isinstance(result.exception, NaglError) and "read-only" in str(result.exception)
