rule evaluate:
    input:
        model=variant_model,
        reference="results/models/dense",
        data="results/data/{task}",
    output:
        "results/eval/{variant}/{task}.json",
    log:
        "logs/evaluate/{variant}/{task}.log",
    benchmark:
        "benchmarks/evaluate/{variant}/{task}.tsv"
    params:
        task_flags=lambda wildcards: cli_flags(
            {"limit": eval_limit(wildcards.task), "num_fewshot": config["evaluate"]["num_fewshot"][wildcards.task]}
        ),
        # the evaluate section's other keys pick the jobs (variants, tasks, timing), not the stage's flags
        flags=section_flags("evaluate", exclude=["variants", "tasks", "limit", "limit_per_task", "num_fewshot", "timing"]),
        common=common_flags(),
    # Each job times its variant against the dense model (--reference-model) for the report's
    # speedups. "exclusive": each job takes every core, so no other job runs beside it and slows it
    # down; "shared": one core (and one torch thread) per job, jobs side by side: faster, noisier.
    threads: workflow.cores if config["evaluate"]["timing"] == "exclusive" else 1
    resources:
        gpu=gpus(config["evaluate"]["device"]),
    conda:
        "../../envs/eval.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m radial evaluate --model {input.model} --variant {wildcards.variant} --task {wildcards.task}"
        " --data-dir results/data --out {output} --reference-model {input.reference}"
        " {params.task_flags} {params.flags} {params.common} > {log} 2>&1"
