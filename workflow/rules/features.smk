# Patch features of every image of a dataset, computed once into the feature
# cache (keyed by backbone identity, preprocessing and image content) and reused
# by training and every evaluation.


rule extract_features:
    input:
        manifest_pattern(),
    output:
        feature_stamp_pattern(),
    params:
        image_size=RUN.image_size,
    threads: 2
    log:
        log_pattern("features", "{dataset}"),
    benchmark:
        benchmark_pattern("extract_features", "{dataset}"),
    shell:
        "{PY} -m nagl step features {wildcards.dataset} --config {RUN_CONFIG} "
        "--threads {threads} --out {output} > {log} 2>&1"
# The step also caches the named levels the configured methods read (the union over
# the methods, from their classes and the backbone's level groups); see
# docs/architecture.md, "Feature cache".
