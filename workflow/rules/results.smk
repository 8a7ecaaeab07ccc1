# The single writer of the database, then the report.
#
# Each rule's output is a stamp (nagl.io.stamp_path), not the database or the
# report: Snakemake deletes a job's outputs before the job runs, and a reader
# must always find the old or the new file. The step replaces its product by a
# rename, then writes the stamp.
from nagl.io import forget_stamp_without_product, stamp_path

DB_STAMP = str(stamp_path(DB))
REPORT_STAMP = str(stamp_path(REPORT))
for _product in (DB, REPORT):
    forget_stamp_without_product(_product)  # a deleted database or report is rebuilt


rule ingest:
    input:
        jobs=evaluation_jobs(),
        manifests=run_manifests(),
    output:
        DB_STAMP,
    resources:
        dvc=1,  # reads dvc.lock for the datasets' content hashes
    log:
        log_pattern("ingest", "ingest"),
    benchmark:
        benchmark_pattern("ingest", "ingest")
    shell:
        "{PY} -m nagl step ingest --config {RUN_CONFIG} --out {DB} --stamp {output} {input.jobs} > {log} 2>&1"


rule report:
    input:
        DB_STAMP,
    output:
        REPORT_STAMP,
    log:
        log_pattern("report", "report"),
    benchmark:
        benchmark_pattern("report", "report")
    shell:
        "{PY} -m nagl step report --db {DB} --out {REPORT} --stamp {output} > {log} 2>&1"
