# The single writer of the database, then the report.


rule ingest:
    input:
        jobs=evaluation_jobs(),
        manifests=expand("datasets/{dataset}/manifest.parquet", dataset=DATASETS),
    output:
        DB,
    resources:
        dvc=1,  # reads dvc.lock for the datasets' content hashes
    log:
        f"{RESULTS}/logs/ingest.log",
    benchmark:
        f"{RESULTS}/benchmarks/ingest.tsv"
    shell:
        "{PY} -m nagl step ingest --config {RUN_CONFIG} --out {output} {input.jobs} > {log} 2>&1"


rule report:
    input:
        DB,
    output:
        REPORT,
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    shell:
        "{PY} -m nagl report --db {input} --out {output} > {log} 2>&1"
