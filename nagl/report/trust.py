"""The checks that say whether a method's numbers can be trusted, where the database has them.

Two kinds, each read only when its data exists (``None`` otherwise, shown as
"not computed"):

- reference-use check: table ``reference_checks(run_id, variant, image_auroc,
  pixel_auroc)``, the same cell re-scored with altered references; compared with
  the cell's own metrics.
- protocol inflation: column ``runs.protocol`` in {'clean', 'reference-code'}; the
  same cell under both protocols, reference-code minus clean.
"""

from __future__ import annotations

import duckdb

from nagl.report.sql import Row, clean_protocol, column_names, rows_of, table_names


def reference_checks(con: duckdb.DuckDBPyConnection) -> list[Row] | None:
    """Per (method, backbone, variant): the check's mean AUROCs beside the cells' own, over cross-domain cells."""
    if "reference_checks" not in table_names(con):
        return None
    clean = clean_protocol(con)
    return rows_of(con, f"""
        WITH own AS (
            SELECT run_id,
                   MAX(CASE WHEN level = 'image' AND metric = 'auroc' THEN value END) AS image_auroc,
                   MAX(CASE WHEN level = 'pixel' AND metric = 'auroc' THEN value END) AS pixel_auroc
            FROM metrics GROUP BY run_id)
        SELECT r.method, r.backbone, c.variant,
               AVG(o.image_auroc) AS own_image_auroc, AVG(c.image_auroc) AS check_image_auroc,
               AVG(c.image_auroc - o.image_auroc) AS image_change,
               AVG(o.pixel_auroc) AS own_pixel_auroc, AVG(c.pixel_auroc) AS check_pixel_auroc,
               AVG(c.pixel_auroc - o.pixel_auroc) AS pixel_change,
               COUNT(*) AS n_cells
        FROM reference_checks c JOIN runs r USING (run_id) JOIN own o USING (run_id)
        WHERE NOT r.in_domain {clean}
        GROUP BY ALL ORDER BY r.method, r.backbone, c.variant""")


def protocol_inflation(con: duckdb.DuckDBPyConnection) -> list[Row] | None:
    """Per (method, backbone, shots): image AUROC under the reference code minus under the clean protocol."""
    columns = column_names(con, "runs")
    if "protocol" not in columns:
        return None
    # A cell's key: with training seeds (runs.train_seed, NULL for training-free methods), the same
    # checkpoint under both protocols.
    train_seed = ", train_seed" if "train_seed" in columns else ""
    return rows_of(con, f"""
        WITH cell AS (
            SELECT r.method, r.backbone, r.source, r.target, r.category, r.k_normal, r.k_abnormal, r.seed,
                   {"COALESCE(r.train_seed, -1) AS train_seed," if train_seed else ""} r.protocol, m.value
            FROM runs r JOIN metrics m USING (run_id)
            WHERE NOT r.in_domain AND m.level = 'image' AND m.metric = 'auroc'),
        paired AS (
            SELECT c.method, c.backbone, c.k_normal, c.k_abnormal, c.value AS clean, x.value AS reference_code
            FROM cell c JOIN cell x
                USING (method, backbone, source, target, category, k_normal, k_abnormal, seed{train_seed})
            WHERE c.protocol = 'clean' AND x.protocol = 'reference-code')
        SELECT method, backbone, k_normal, k_abnormal, AVG(clean) AS clean, AVG(reference_code) AS reference_code,
               AVG(reference_code - clean) AS inflation, STDDEV_SAMP(reference_code - clean) AS inflation_sd,
               COUNT(clean) AS n_cells
        FROM paired GROUP BY ALL ORDER BY ALL""")
