# Datasets: build (or restore from DVC), validate and version with DVC.
# Adding a dataset is an entry in config/datasets.yaml; it joins the matrix when
# a config names it as a source or target.


rule prepare_dataset:
    output:
        manifest_pattern(),
    resources:
        dvc=1,  # DVC commands never run at the same time
    log:
        log_pattern("prepare", "{dataset}"),
    benchmark:
        benchmark_pattern("prepare_dataset", "{dataset}"),
    shell:
        "{PY} -m nagl datasets prepare {wildcards.dataset} > {log} 2>&1"
