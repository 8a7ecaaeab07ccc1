# One job per (method, source, training seed), over its targets: every target x category x
# shot setting x seed (RunConfig.evaluation_groups), so a process's start-up is paid once for
# all of them. Each cell is written to its own folder (run.json last), so a job that is
# interrupted resumes without recomputing finished cells.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        job_pattern(),
    params:
        targets=evaluation_targets,
        shots=RUN.as_dict()["shots"],
        seeds=list(RUN.seeds),
        eval_resolution=RUN.eval_resolution,
    threads: 1
    log:
        log_pattern("evaluate", "{method}-{source}-{train_seed}"),
    benchmark:
        benchmark_pattern("evaluate", "{method}-{source}-{train_seed}"),
    shell:
        "{PY} -m nagl step evaluate --method {wildcards.method} --source {wildcards.source} "
        "--train-seed {wildcards.train_seed} "
        "{params.targets:q} --config {RUN_CONFIG} --threads {threads} --out {output} "
        "> {log} 2>&1"
