# Trainable methods are trained once per (method, backbone, source, training seed)
# on the source domain only; the checkpoint is chosen on held-out images of the
# source. The training seed sets the validation split, initial weights and episodes.
# A union source (docs/protocol.md) needs the features of each of its datasets.


rule train:
    input:
        unpack(train_inputs),
    output:
        model_pattern(),
    params:
        training={"profile": RUN.training.profile},
        image_size=RUN.image_size,
        k_normal=list(RUN.shots.k_normal),
    threads: 2  # not two 1-thread trainings side by side: 1.8 GB each, over a laptop's 4 GB budget
    log:
        log_pattern("train", "{method}-{source}-{train_seed}"),
    benchmark:
        benchmark_pattern("train", "{method}-{source}-{train_seed}"),
    shell:
        "{PY} -m nagl step train --method {wildcards.method} --source {wildcards.source} "
        "--train-seed {wildcards.train_seed} "
        "--config {RUN_CONFIG} --threads {threads} --out {output} > {log} 2>&1"
