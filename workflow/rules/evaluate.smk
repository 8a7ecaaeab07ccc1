# One job per (method, source, target): every category x shot setting x seed of
# the target. Each cell is written to its own folder (run.json last), so a job
# that is interrupted resumes without recomputing finished cells.


def evaluate_inputs(wildcards):
    inputs = {
        "manifest": f"datasets/{wildcards.target}/manifest.parquet",
        "features": f"{RESULTS}/features/{BACKBONE}/{wildcards.target}.json",
    }
    if wildcards.source != "-":
        inputs["model"] = f"{RESULTS}/models/{wildcards.method}/{BACKBONE}/{wildcards.source}/model.json"
    return inputs


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        f"{RESULTS}/jobs/{{method}}/{BACKBONE}/{{source}}/{{target}}.json",
    params:
        shots=config["shots"],
        seeds=config["seeds"],
        eval_resolution=config["eval_resolution"],
    threads: 1
    log:
        f"{RESULTS}/logs/evaluate/{{method}}-{{source}}-{{target}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{method}}-{{source}}-{{target}}.tsv"
    shell:
        "{PY} -m nagl step evaluate --method {wildcards.method} --source {wildcards.source} "
        "--target {wildcards.target} --config {RUN_CONFIG} --threads {threads} --out {output} "
        "> {log} 2>&1"
