# The benchmark workflow: prepare datasets -> features -> train -> evaluate ->
# ingest -> report. Run it with `nagl run` or `snakemake --cores all`; choose
# another config with `--configfile config/paper.yaml`. The rules live in
# workflow/rules/; the steps they run are `nagl` commands.

import os
import sys

configfile: "config/config.yaml"

# Measurement (benchmarks/matrix.py): with NAGL_JOB_TIMES set, every job runs under
# workflow/scripts/jobtime.py, which writes its exact resource usage into that folder.
if os.environ.get("NAGL_JOB_TIMES"):
    shell.prefix(f"set -euo pipefail; {sys.executable} workflow/scripts/jobtime.py {os.environ['NAGL_JOB_TIMES']} ")


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/results.smk"


rule all:
    input:
        DB_STAMP,  # the database and the report (see workflow/rules/results.smk)
        REPORT_STAMP,
    default_target: True
