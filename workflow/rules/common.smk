# Shared definitions: the validated config, the matrix, output paths.
import sys

from snakemake.utils import validate

from nagl.config import is_trainable, run_datasets, validate_config, write_effective_config

validate(config, schema="../schemas/config.schema.yaml")
config = validate_config(dict(config), origin="snakemake config")

PY = sys.executable
RESULTS = config["results"]
BACKBONE = config["backbone"]
REPORT = config["report"]
DB = f"{RESULTS}/benchmark.duckdb"
# Every step reads the same validated config; rewritten only when it changes.
RUN_CONFIG = write_effective_config(config)

TRAINABLE = [m for m in config["methods"] if is_trainable(m)]
TRAINING_FREE = [m for m in config["methods"] if not is_trainable(m)]
DATASETS = run_datasets(config)

wildcard_constraints:
    dataset="[a-z0-9][a-z0-9_-]*",
    target="[a-z0-9][a-z0-9_-]*",
    method="[a-z0-9][a-z0-9_-]*",
    source="[a-z0-9][a-z0-9_-]*|-",


def evaluation_jobs():
    """One evaluation job per (method, source, target); '-' is the training-free source."""
    jobs = []
    for target in config["targets"]:
        for method in TRAINABLE:
            for source in config["sources"]:
                jobs.append(f"{RESULTS}/jobs/{method}/{BACKBONE}/{source}/{target}.json")
        for method in TRAINING_FREE:
            jobs.append(f"{RESULTS}/jobs/{method}/{BACKBONE}/-/{target}.json")
    return jobs
