# Patch features of every image of a dataset, computed once into the feature
# cache (keyed by backbone identity, preprocessing and image content) and reused
# by training and every evaluation.


rule extract_features:
    input:
        "datasets/{dataset}/manifest.parquet",
    output:
        f"{RESULTS}/features/{BACKBONE}/{{dataset}}.json",
    params:
        image_size=config["image_size"],
    threads: 2
    log:
        f"{RESULTS}/logs/features/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/extract_features/{{dataset}}.tsv"
    shell:
        "{PY} -m nagl step features {wildcards.dataset} --config {RUN_CONFIG} "
        "--threads {threads} --out {output} > {log} 2>&1"
