# The single writer of the database, then the report.


rule ingest:
    input:
        jobs=evaluation_jobs(),
        manifests=run_manifests(),
    output:
        DB,
    resources:
        dvc=1,  # reads dvc.lock for the datasets' content hashes
    log:
        f"{RESULTS}/logs/ingest.log",
    shell:
        "{PY} -m nagl step ingest --config {RUN_CONFIG} --out {output} {input.jobs} > {log} 2>&1"


rule report:
    input:
        DB,
    output:
        REPORT,
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "{PY} -m nagl report --db {input} --out {output} > {log} 2>&1"
