# Trainable methods are trained once per (method, backbone, source) on the
# source domain only; the checkpoint is chosen on a validation split of the source.
# A union source (docs/protocol.md) needs the features of each of its datasets.


rule train:
    input:
        features=train_inputs,
    output:
        model_pattern(),
    params:
        training=RUN.training.as_dict(),
        image_size=RUN.image_size,
        k_normal=list(RUN.shots.k_normal),
    threads: 2
    log:
        log_pattern("train", "{method}-{source}"),
    benchmark:
        benchmark_pattern("train", "{method}-{source}"),
    shell:
        "{PY} -m nagl step train --method {wildcards.method} --source {wildcards.source} "
        "--config {RUN_CONFIG} --threads {threads} --out {output} > {log} 2>&1"
