# The benchmark workflow: prepare datasets -> features -> train -> evaluate ->
# ingest -> report. Run it with `nagl run` or `snakemake --cores all`; choose
# another config with `--configfile config/paper.yaml`. The rules live in
# workflow/rules/; the steps they run are `nagl` commands.

configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/results.smk"


rule all:
    input:
        DB,
        REPORT,
    default_target: True
