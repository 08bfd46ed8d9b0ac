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
        num_fewshot=lambda wildcards: config["evaluate"]["num_fewshot"][wildcards.task],
        limit=lambda wildcards: cli_flags({"limit": eval_limit(wildcards.task)}),
        flags=cli_flags(
            {
                k: config["evaluate"][k]
                for k in ("batch_size", "max_gen_toks", "device", "timing_repeats", "timing_batches", "timing_decode_steps")
            }
        ),
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
        " --data-dir results/data --num-fewshot {params.num_fewshot} --out {output} --reference-model {input.reference}"
        " {params.limit} {params.flags} {params.common} > {log} 2>&1"
