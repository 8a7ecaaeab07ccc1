# Shared definitions: the validated config, the matrix, and every path (through
# nagl.paths, as the Python steps build them; rules never spell a path out).
import sys

from snakemake.utils import validate

from nagl import paths
from nagl.config import validate_config, write_effective_config

# nagl's own check first: it names renamed settings (training.seed -> training.seeds).
RUN = validate_config(dict(config), origin="snakemake config")
validate(config, schema="../schemas/config.schema.yaml")

PY = sys.executable
RESULTS = RUN.results
BACKBONE = RUN.backbone
REPORT = RUN.report
DB = str(paths.database(RESULTS))
# Every step reads the same validated config; rewritten only when it changes.
RUN_CONFIG = write_effective_config(RUN)

TRAINABLE = RUN.trainable_methods
TRAINING_FREE = RUN.training_free_methods
DATASETS = RUN.datasets()

wildcard_constraints:
    dataset="[a-z0-9][a-z0-9_-]*",
    target="[a-z0-9][a-z0-9_-]*",
    method="[a-z0-9][a-z0-9_-]*",
    source="[a-z0-9][a-z0-9_-]*|-",
    train_seed="[0-9]+|-",


# Path patterns of the rules' outputs (wildcards in braces).
def manifest_pattern(dataset="{dataset}"):
    return str(paths.dataset_manifest(dataset))


def feature_stamp_pattern(dataset="{dataset}"):
    return str(paths.feature_stamp(RESULTS, BACKBONE, dataset))


def features_job_pattern():
    return str(paths.features_job(RESULTS, BACKBONE))


def model_pattern(method="{method}", source="{source}", train_seed="{train_seed}"):
    return str(paths.model_file(RESULTS, method, BACKBONE, source, train_seed))


def job_pattern(method="{method}", source="{source}", train_seed="{train_seed}"):
    return str(paths.job_file(RESULTS, method, BACKBONE, source, train_seed))


def log_pattern(step, name):
    return str(paths.log_file(RESULTS, step, name))


def benchmark_pattern(rule, name):
    return str(paths.benchmark_file(RESULTS, rule, name))


# Input functions.
def evaluation_targets(wildcards):
    """The targets of one evaluation job (method, source, training seed)."""
    seed = None if wildcards.train_seed == "-" else int(wildcards.train_seed)
    return RUN.evaluation_groups()[(wildcards.method, wildcards.source, seed)]


def features_ready(datasets):
    """The datasets' feature stamps as inputs that order a job after the features job but
    never make it rerun: the one features job rewrites every stamp (unchanged) when any
    dataset is added or changed. What the features depend on reaches the job through the
    datasets' manifests (listed beside), the rule's params and the backbone in the paths."""
    return [ancient(feature_stamp_pattern(dataset)) for dataset in datasets]


def evaluate_inputs(wildcards):
    targets = evaluation_targets(wildcards)
    inputs = {
        "manifests": [manifest_pattern(target) for target in targets],
        "features": features_ready(targets),
    }
    if wildcards.source != "-":
        inputs["model"] = model_pattern(wildcards.method, wildcards.source, wildcards.train_seed)
    return inputs


def train_inputs(wildcards):
    """The manifests and features of every dataset of the source (several for a union source)."""
    datasets = RUN.source_datasets(wildcards.source)
    return {"manifests": [manifest_pattern(dataset) for dataset in datasets], "features": features_ready(datasets)}


def evaluation_jobs():
    """One evaluation job per (method, source, training seed), over its targets
    (RunConfig.evaluation_groups: training-free methods have the source '-' and no training
    seed; a union source is evaluated only on the targets it leaves out). The evaluator reads
    RunConfig.evaluation_jobs to find which job computes an alias's cell."""
    return [job_pattern(method, source, train_seed) for method, source, train_seed in RUN.evaluation_groups()]


def run_manifests():
    return [manifest_pattern(dataset) for dataset in DATASETS]
