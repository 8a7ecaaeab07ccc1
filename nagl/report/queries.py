"""Read everything the report shows from the results database, read-only.

The report reads only the DuckDB database (schema: ``nagl/results/schema.sql``).
Aggregates come from the schema's views: ``leaderboard`` (headline and shot
curves), ``pair_summary`` (heatmaps), ``target_means`` and ``cell_metrics``
(breakdowns). Every query has an ORDER BY, so the report is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from nagl.errors import NaglError
from nagl.report import trust
from nagl.report.main_table import GainRow, MainTable, load_gains, load_main_table
from nagl.report.sql import Row, clean_protocol, rows_of

# (level, metric, label): every metric the schema stores, in display order.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("image", "auroc", "Image AUROC"),
    ("image", "ap", "Image AP"),
    ("image", "f1max", "Image F1-max"),
    ("pixel", "auroc", "Pixel AUROC"),
    ("pixel", "ap", "Pixel AP"),
    ("pixel", "f1max", "Pixel F1-max"),
    ("pixel", "aupro", "AUPRO@0.3"),
)
HEADLINE_METRICS: tuple[tuple[str, str, str], ...] = (METRICS[0], METRICS[3], METRICS[6])

REQUIRED_RELATIONS = ("runs", "metrics", "models", "datasets", "gallery", "provenance",
                      "cell_metrics", "target_means", "pair_summary", "leaderboard")

@dataclass
class ReportData:
    """Everything the HTML is made from; lists are already in display order."""

    n_runs: int
    methods: list[tuple[str, str]] = field(default_factory=list)  # (method, backbone)
    shots: list[tuple[int, int]] = field(default_factory=list)  # (k_normal, k_abnormal)
    targets: list[str] = field(default_factory=list)
    n_categories: int = 0
    seeds: list[int] = field(default_factory=list)
    created: tuple[str, str] | None = None  # first and last run's created_at
    leaderboard: dict[tuple, Row] = field(default_factory=dict)
    pairs: list[Row] = field(default_factory=list)
    per_target: list[Row] = field(default_factory=list)
    per_category: list[Row] = field(default_factory=list)
    efficiency: list[Row] = field(default_factory=list)
    speed: dict[tuple, float] = field(default_factory=dict)
    gallery: list[Row] = field(default_factory=list)
    provenance: list[Row] = field(default_factory=list)
    software: list[Row] = field(default_factory=list)
    datasets: list[Row] = field(default_factory=list)
    main: MainTable | None = None
    gains: list[GainRow] = field(default_factory=list)
    reference_checks: list[Row] | None = None  # None: not computed (no such table)
    inflation: list[Row] | None = None  # None: not computed (no runs.protocol)


def open_database(db_path: Path) -> duckdb.DuckDBPyConnection:
    """Open the results database read-only, with clear errors for the usual mistakes."""
    if not db_path.is_file():
        raise NaglError(
            f"results database {db_path} does not exist: run `nagl run` first "
            f"(or pass --db with the path of an existing benchmark.duckdb)."
        )
    try:
        con = duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error as error:
        raise NaglError(
            f"cannot open {db_path} as a DuckDB results database ({error}); "
            f"rebuild it with `nagl run` or pass the right file with --db."
        ) from error
    con.execute("SET threads TO 1")  # fixed summation order: identical floats on every build
    present = {name for (name,) in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
    missing = [name for name in REQUIRED_RELATIONS if name not in present]
    if missing:
        con.close()
        raise NaglError(
            f"{db_path} is not a nagl results database: it lacks {', '.join(missing)}. "
            f"Rebuild it with `nagl run` (the ingest step writes nagl/results/schema.sql)."
        )
    return con


def load(con: duckdb.DuckDBPyConnection) -> ReportData:
    """Run every query the report needs."""
    (n_runs,) = con.execute("SELECT COUNT(*) FROM runs").fetchone()
    data = ReportData(n_runs=n_runs)
    data.provenance = rows_of(con, "SELECT key, value FROM provenance ORDER BY key")
    data.datasets = rows_of(con, "SELECT * FROM datasets ORDER BY name")
    if n_runs == 0:
        return data
    data.methods = [(r["method"], r["backbone"]) for r in rows_of(
        con, "SELECT DISTINCT method, backbone FROM runs ORDER BY method, backbone")]
    data.shots = [(r["k_normal"], r["k_abnormal"]) for r in rows_of(
        con, "SELECT DISTINCT k_normal, k_abnormal FROM runs ORDER BY k_normal, k_abnormal")]
    data.targets = [r["target"] for r in rows_of(con, "SELECT DISTINCT target FROM runs ORDER BY target")]
    data.seeds = [r["seed"] for r in rows_of(con, "SELECT DISTINCT seed FROM runs ORDER BY seed")]
    first, last = con.execute("SELECT MIN(created_at), MAX(created_at) FROM runs").fetchone()
    data.created = (str(first), str(last))
    (data.n_categories,) = con.execute(
        "SELECT COUNT(*) FROM (SELECT DISTINCT target, category FROM runs)").fetchone()
    data.leaderboard = {
        (r["method"], r["backbone"], r["k_normal"], r["k_abnormal"], r["level"], r["metric"]): r
        for r in rows_of(con, "SELECT * FROM leaderboard ORDER BY ALL")
    }
    data.pairs = rows_of(con, """
        SELECT method, backbone, source, target, k_normal, k_abnormal, in_domain, level, metric,
               mean, std, n_seeds, n_categories
        FROM pair_summary ORDER BY method, backbone, k_normal, k_abnormal, level, metric, source, target""")
    data.per_target = rows_of(con, """
        WITH per_seed AS (
            SELECT method, backbone, target, k_normal, k_abnormal, seed, level, metric,
                   AVG(value) AS value, COUNT(DISTINCT CASE WHEN value IS NOT NULL THEN source END) AS n_sources,
                   MAX(n_categories) AS n_categories
            FROM target_means WHERE NOT in_domain GROUP BY ALL)
        SELECT method, backbone, target, k_normal, k_abnormal, level, metric,
               AVG(value) AS mean, STDDEV_SAMP(value) AS std, COUNT(value) AS n_seeds,
               MAX(n_sources) AS n_sources, MAX(n_categories) AS n_categories
        FROM per_seed GROUP BY ALL
        ORDER BY method, backbone, k_normal, k_abnormal, target, level, metric""")
    data.per_category = rows_of(con, """
        WITH per_seed AS (
            SELECT method, backbone, target, category, k_normal, k_abnormal, seed, level, metric,
                   AVG(value) AS value, COUNT(DISTINCT CASE WHEN value IS NOT NULL THEN source END) AS n_sources
            FROM cell_metrics WHERE NOT in_domain GROUP BY ALL)
        SELECT method, backbone, target, category, k_normal, k_abnormal, level, metric,
               AVG(value) AS mean, STDDEV_SAMP(value) AS std, COUNT(value) AS n_seeds,
               MAX(n_sources) AS n_sources
        FROM per_seed GROUP BY ALL
        ORDER BY method, backbone, k_normal, k_abnormal, target, category, level, metric""")
    clean = clean_protocol(con)  # reference-code cells feed the trust section only
    data.efficiency = rows_of(con, f"""
        WITH model_stats AS (
            SELECT method, backbone, MIN(params_total) AS params_total_min,
                   MAX(params_total) AS params_total_max, MAX(params_trainable) AS params_trainable,
                   AVG(train_seconds) AS train_seconds, COUNT(train_seconds) AS n_trained
            FROM models GROUP BY ALL),
        run_stats AS (
            SELECT method, backbone, AVG(images_per_second) AS images_per_second,
                   SUM(eval_seconds) AS eval_seconds, COUNT(*) AS n_runs
            FROM runs r WHERE TRUE {clean} GROUP BY ALL)
        SELECT r.method, r.backbone, m.params_total_min, m.params_total_max, m.params_trainable,
               m.train_seconds, COALESCE(m.n_trained, 0) AS n_trained,
               r.images_per_second, r.eval_seconds, r.n_runs
        FROM run_stats r LEFT JOIN model_stats m USING (method, backbone)
        ORDER BY r.method, r.backbone""")
    data.speed = {
        (r["method"], r["backbone"], r["k_normal"], r["k_abnormal"]): r["images_per_second"]
        for r in rows_of(con, f"""
            SELECT method, backbone, k_normal, k_abnormal, AVG(images_per_second) AS images_per_second
            FROM runs r WHERE NOT in_domain {clean} GROUP BY ALL ORDER BY ALL""")
    }
    data.main = load_main_table(con)
    data.gains = load_gains(con, data.main)
    data.reference_checks = trust.reference_checks(con)
    data.inflation = trust.protocol_inflation(con)
    data.gallery = _gallery(con)
    data.software = rows_of(con, """
        SELECT nagl_version, torch_version, python_version, COALESCE(git_commit, '') AS git_commit,
               backbone_identity, COUNT(*) AS n_runs
        FROM runs GROUP BY ALL ORDER BY ALL""")
    return data


def _gallery(con: duckdb.DuckDBPyConnection) -> list[Row]:
    """For each (target, query, method): the map of one run, chosen deterministically.

    Preference: a cross-domain run, then the largest shot setting, the lowest
    seed, the first source in alphabetical order.
    """
    return rows_of(con, f"""
        WITH ranked AS (
            SELECT r.target, r.category, g.image_path, g.label, r.method, r.backbone, r.source,
                   r.k_normal, r.k_abnormal, r.seed, r.in_domain, r.run_id,
                   g.image_png, g.mask_png, g.map_png,
                   ROW_NUMBER() OVER (
                       PARTITION BY r.target, g.image_path, r.method, r.backbone
                       ORDER BY r.in_domain, r.k_normal DESC, r.k_abnormal DESC, r.seed,
                                r.source, r.run_id) AS preference
            FROM gallery g JOIN runs r USING (run_id) WHERE TRUE {clean_protocol(con)})
        SELECT * EXCLUDE (preference) FROM ranked WHERE preference = 1
        ORDER BY target, label DESC, image_path, method, backbone""")
