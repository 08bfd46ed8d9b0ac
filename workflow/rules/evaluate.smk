# One job per variant evaluates every task in one process, the model loaded once (radial evaluate
# takes several tasks and writes one JSON each). A knob variant (routers-b1, radial-b-0.5) is its
# trained model evaluated at another skip bias.
rule evaluate:
    input:
        model=variant_model,
        reference=results("models/dense"),
        data=expand("results/data/{task}", task=RADIAL_EVAL_TASKS),
    output:
        expand(results("eval/{{variant}}/{task}.json"), task=EVAL_TASKS),
    log:
        logs("evaluate/{variant}.log"),
    benchmark:
        benchmarks("evaluate/{variant}.tsv")
    params:
        tasks=" ".join(map(shlex.quote, EVAL_TASKS)),
        out=lambda wildcards: shlex.quote(results(f"eval/{wildcards.variant}/{{task}}.json")),
        knob=knob_flags,
        task_flags=eval_task_flags(),
        # the evaluate section's other keys pick the jobs (variants, tasks, timing), not the stage's flags
        flags=section_flags(
            "evaluate",
            exclude=["variants", "tasks", "include_path", "limit", "limit_per_task", "num_fewshot", "skip_biases"],
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
        "OMP_NUM_THREADS={threads} python -m radial evaluate --model {input.model} --variant {wildcards.variant}"
        " --task {params.tasks} --data-dir results/data --out {params.out} --reference-model {input.reference}"
        " {params.knob} {params.task_flags} {params.flags} {params.common} > {log} 2>&1"
