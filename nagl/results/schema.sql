-- The results database (results/benchmark.duckdb). One row of `runs` per
-- evaluation cell: (method, backbone, source, train_seed, target, category,
-- k_normal, k_abnormal, seed). Training-free methods use source '-' and a NULL
-- train_seed.
-- Pixel metrics of a dataset without masks are stored as NULL, never 0.

CREATE TABLE runs (
    run_id              VARCHAR PRIMARY KEY,  -- hash of the cell key and the config hash
    alias_of            VARCHAR,              -- run_id of the cell that computed this one's maps (same computation:
                                              -- nagl.results.aliases); its metrics are copied, its scores and maps
                                              -- stored once under alias_of; NULL: computed in this cell
    method              VARCHAR NOT NULL,
    backbone            VARCHAR NOT NULL,
    backbone_identity   VARCHAR NOT NULL,     -- name@size:weights-sha256[:16]
    source              VARCHAR NOT NULL,     -- '-' for training-free methods
    target              VARCHAR NOT NULL,
    category            VARCHAR NOT NULL,
    k_normal            INTEGER NOT NULL,
    k_abnormal          INTEGER NOT NULL,
    seed                INTEGER NOT NULL,     -- reference-draw seed
    train_seed          INTEGER,              -- training seed of the checkpoint; NULL for training-free methods
    protocol            VARCHAR NOT NULL CHECK (protocol IN ('clean', 'reference-code')),
                                              -- 'reference-code': the public code's leaking protocol, never in headlines
    in_domain           BOOLEAN NOT NULL,     -- target is one of source_datasets: kept, left out of cross-domain means
    image_size          INTEGER NOT NULL,
    eval_resolution     INTEGER NOT NULL,     -- pixel metrics are computed at this size
    n_queries           INTEGER NOT NULL,
    n_anomalous_queries INTEGER NOT NULL,
    n_pseudo_masks      INTEGER NOT NULL,     -- abnormal references without a usable mask (pseudo-mask, nagl-method.md)
    config_hash         VARCHAR NOT NULL,     -- hash of the settings that determine the cell (backbone, sizes, training)
    method_config_hash  VARCHAR NOT NULL,     -- hash of the method's own settings
    checkpoint_hash     VARCHAR,              -- NULL for training-free methods
    source_dataset_hash VARCHAR,              -- DVC content hash (a union source: a hash over its datasets' hashes); NULL for source '-'
    source_datasets     VARCHAR[],            -- the datasets the source is made of ([source], several for a union); NULL for '-'
    target_dataset_hash VARCHAR NOT NULL,     -- DVC content hash
    split_hash          VARCHAR NOT NULL,     -- hash of the reference split (paths + sha256)
    git_commit          VARCHAR,              -- NULL outside a git checkout
    nagl_version        VARCHAR NOT NULL,
    torch_version       VARCHAR NOT NULL,
    python_version      VARCHAR NOT NULL,
    train_seconds       DOUBLE,               -- NULL for training-free methods
    eval_seconds        DOUBLE NOT NULL,
    images_per_second   DOUBLE NOT NULL,      -- queries scored per second (head, cached features)
    created_at          TIMESTAMP NOT NULL
);

CREATE TABLE metrics (
    run_id  VARCHAR NOT NULL REFERENCES runs (run_id),
    level   VARCHAR NOT NULL CHECK (level IN ('image', 'pixel')),
    metric  VARCHAR NOT NULL CHECK (metric IN ('auroc', 'ap', 'f1max', 'aupro')),
    value   DOUBLE,                            -- NULL: not defined (no masks)
    PRIMARY KEY (run_id, level, metric)
);

CREATE TABLE scores (
    run_id      VARCHAR NOT NULL REFERENCES runs (run_id),
    image_path  VARCHAR NOT NULL,              -- relative to the dataset folder
    defect_type VARCHAR NOT NULL,              -- 'good' for normal images
    label       INTEGER NOT NULL CHECK (label IN (0, 1)),
    score       DOUBLE NOT NULL
);

CREATE TABLE reference_splits (
    split_hash   VARCHAR NOT NULL,
    target       VARCHAR NOT NULL,
    category     VARCHAR NOT NULL,
    seed         INTEGER NOT NULL,
    role         VARCHAR NOT NULL CHECK (role IN ('normal', 'abnormal')),
    position     INTEGER NOT NULL,             -- the first k of a role serve the k-shot setting
    image_path   VARCHAR NOT NULL,
    image_sha256 VARCHAR NOT NULL,
    mask_path    VARCHAR,
    PRIMARY KEY (split_hash, role, position)
);

-- One row per trained checkpoint (and one per training-free method, with
-- NULL training fields), for the efficiency table.
CREATE TABLE models (
    method              VARCHAR NOT NULL,
    backbone            VARCHAR NOT NULL,
    source              VARCHAR NOT NULL,      -- '-' for training-free methods
    train_seed          INTEGER,               -- NULL for training-free methods
    checkpoint_hash     VARCHAR,
    training_profile    VARCHAR,
    params_total        BIGINT NOT NULL,       -- backbone + head
    params_trainable    BIGINT NOT NULL,
    train_seconds       DOUBLE,
    source_dataset_hash VARCHAR,
    UNIQUE (method, backbone, source, train_seed)
);

CREATE TABLE datasets (
    name           VARCHAR PRIMARY KEY,
    domain         VARCHAR NOT NULL,
    content_hash   VARCHAR NOT NULL,           -- DVC content hash of datasets/<name>
    n_categories   INTEGER NOT NULL,
    n_images       INTEGER NOT NULL,
    n_anomalous    INTEGER NOT NULL,
    has_masks      BOOLEAN NOT NULL,           -- some image has a pixel mask (else pixel metrics are NULL)
    anomaly        VARCHAR NOT NULL CHECK (anomaly IN ('defect', 'semantic')),
    licence        VARCHAR                     -- as stated in config/datasets.yaml; NULL: not stated
);

-- A few queries per target with their ground truth and each method's map, as
-- small PNGs, for the report's gallery.
CREATE TABLE gallery (
    run_id      VARCHAR NOT NULL REFERENCES runs (run_id),
    image_path  VARCHAR NOT NULL,
    label       INTEGER NOT NULL,
    image_png   BLOB NOT NULL,
    mask_png    BLOB,                           -- NULL where the dataset has no masks
    map_png     BLOB NOT NULL
);

-- The reference-use check (docs/protocol.md): a clean cell with k_abnormal > 0
-- of a method that takes abnormal references, re-scored with its abnormal
-- references swapped ('other-category-anomaly': anomalies of another category of
-- the target; 'normal-pseudo-mask': normal target images with a centre-square
-- pseudo-mask). Same normal references and queries as the cell.
CREATE TABLE reference_checks (
    run_id      VARCHAR NOT NULL REFERENCES runs (run_id),
    variant     VARCHAR NOT NULL CHECK (variant IN ('other-category-anomaly', 'normal-pseudo-mask')),
    image_auroc DOUBLE NOT NULL,
    pixel_auroc DOUBLE,                         -- NULL where the target has no masks
    PRIMARY KEY (run_id, variant)
);

-- Key/value provenance of the whole run: config (YAML text), package versions,
-- git commit, ingest date.
CREATE TABLE provenance (
    key   VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);

-- ---------------------------------------------------------------- views --

-- One row per cell and metric, with the cell's key: clean-protocol cells only, so
-- every view below (and the leaderboard) never sees a reference-code cell.
CREATE VIEW cell_metrics AS
SELECT r.method, r.backbone, r.source, r.target, r.category, r.k_normal, r.k_abnormal,
       r.seed, r.train_seed, r.in_domain, m.level, m.metric, m.value, r.run_id
FROM runs r JOIN metrics m USING (run_id)
WHERE r.protocol = 'clean';

-- Macro-average over the categories of a target, per seed (and training seed).
CREATE VIEW target_means AS
SELECT method, backbone, source, target, k_normal, k_abnormal, seed, in_domain, level, metric,
       AVG(value) AS value,
       COUNT(value) AS n_categories
FROM cell_metrics
GROUP BY ALL;

-- Mean and standard deviation over seeds of the category macro-average, per
-- (source, target) pair: the heatmap cells. A trained method's value at a seed is
-- first averaged over its training seeds (their spread: nagl/report/main_table.py).
CREATE VIEW pair_summary AS
WITH per_seed AS (
    SELECT method, backbone, source, target, k_normal, k_abnormal, seed, in_domain, level, metric,
           AVG(value) AS value, MAX(n_categories) AS n_categories
    FROM target_means
    GROUP BY ALL
)
SELECT method, backbone, source, target, k_normal, k_abnormal, in_domain, level, metric,
       AVG(value) AS mean,
       STDDEV_SAMP(value) AS std,
       COUNT(value) AS n_seeds,
       MAX(n_categories) AS n_categories
FROM per_seed
GROUP BY ALL;

-- Cross-domain value per seed: for each target, the mean over its cross-domain
-- sources (and training seeds); then the mean over targets. In-domain cells are left out.
CREATE VIEW cross_domain_seed AS
WITH per_target AS (
    SELECT method, backbone, target, k_normal, k_abnormal, seed, level, metric,
           AVG(value) AS value, MAX(n_categories) AS n_categories
    FROM target_means
    WHERE NOT in_domain
    GROUP BY ALL
)
SELECT method, backbone, k_normal, k_abnormal, seed, level, metric,
       AVG(value) AS value,
       COUNT(value) AS n_targets,
       SUM(CASE WHEN value IS NULL THEN 0 ELSE n_categories END) AS n_categories
FROM per_target
GROUP BY ALL;

-- The leaderboard: cross-domain mean +- std over seeds, with the counts behind it.
CREATE VIEW leaderboard AS
SELECT method, backbone, k_normal, k_abnormal, level, metric,
       AVG(value) AS mean,
       STDDEV_SAMP(value) AS std,
       COUNT(value) AS n_seeds,
       MAX(n_targets) AS n_targets,
       MAX(n_categories) AS n_categories
FROM cross_domain_seed
GROUP BY ALL;
