# Patch features of every image of the run's datasets, computed once into the feature
# cache (keyed by backbone identity, preprocessing and image content) and reused
# by training and every evaluation. One job for all datasets: the interpreter, torch
# and the backbone load once (about 4 s a process on 2 cores, as long as extracting
# a small dataset). Adding or changing a dataset reruns the job, which computes only
# the images not cached yet and rewrites every dataset's stamp; downstream jobs take
# the stamps as ancient() inputs and follow their datasets' manifests instead
# (common.smk, features_ready), so nothing downstream of the other datasets reruns.


rule extract_features:
    input:
        run_manifests(),
    output:
        stamps=[feature_stamp_pattern(dataset) for dataset in DATASETS],
        summary=features_job_pattern(),
    params:
        datasets=DATASETS,
        image_size=RUN.image_size,
        methods=list(RUN.methods),  # their levels are cached (see below)
    threads: 2
    log:
        log_pattern("features", BACKBONE),
    benchmark:
        benchmark_pattern("extract_features", BACKBONE),
    shell:
        "{PY} -m nagl step features {params.datasets:q} --config {RUN_CONFIG} "
        "--threads {threads} --out {output.summary} > {log} 2>&1"
# The step also caches the named levels the configured methods read (the union over
# the methods, from their classes and the backbone's level groups); see
# docs/architecture.md, "Feature cache".
