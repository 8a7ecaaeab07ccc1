# One job per (method, source, training seed, target): every category x shot
# setting x seed of the target. Each cell is written to its own folder (run.json last), so a job
# that is interrupted resumes without recomputing finished cells.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        job_pattern(),
    params:
        shots=RUN.as_dict()["shots"],
        seeds=list(RUN.seeds),
        eval_resolution=RUN.eval_resolution,
    threads: 1
    log:
        log_pattern("evaluate", "{method}-{source}-{train_seed}-{target}"),
    benchmark:
        benchmark_pattern("evaluate", "{method}-{source}-{train_seed}-{target}"),
    shell:
        "{PY} -m nagl step evaluate --method {wildcards.method} --source {wildcards.source} "
        "--train-seed {wildcards.train_seed} "
        "--target {wildcards.target} --config {RUN_CONFIG} --threads {threads} --out {output} "
        "> {log} 2>&1"
