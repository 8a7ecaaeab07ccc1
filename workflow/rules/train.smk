# Trainable methods are trained once per (method, backbone, source) on the
# source domain only; the checkpoint is chosen on a validation split of the source.


rule train:
    input:
        features=f"{RESULTS}/features/{BACKBONE}/{{source}}.json",
    output:
        f"{RESULTS}/models/{{method}}/{BACKBONE}/{{source}}/model.json",
    params:
        training=config["training"],
        image_size=config["image_size"],
        k_normal=config["shots"]["k_normal"],
    threads: 2
    log:
        f"{RESULTS}/logs/train/{{method}}-{{source}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{method}}-{{source}}.tsv"
    shell:
        "{PY} -m nagl step train --method {wildcards.method} --source {wildcards.source} "
        "--config {RUN_CONFIG} --threads {threads} --out {output} > {log} 2>&1"
