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
