# Radial distillation: the dense model (teacher) into a token-routed student of its own layers,
# on the DeepSpeed harness (radial.training), trained on the same text as the fine-tuned baselines.
# Checkpoints go to results/<model>/train/distill/checkpoints/ (not a declared output: a killed job resumes).
# distill.gpus: 0 = CPU, 1 = one GPU, N > 1 = N GPUs through the `deepspeed` launcher.


rule distill:
    input:
        model=results("models/dense"),
        data=expand("results/data/{task}", task=TASKS),
    output:
        directory(results("models/radial")),
    log:
        logs("distill.log"),
    benchmark:
        benchmarks("distill.tsv")
    params:
        launcher=train_launcher(config["distill"]["gpus"]),
        checkpoints=results("train/distill/checkpoints"),
        flags=section_flags("distill", exclude=["gpus", "reuse_layers", "max_depth"]),
        common=common_flags(),
    threads: workflow.cores
    resources:
        gpu=config["distill"]["gpus"],
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.launcher} distill --model {input.model} --data-dir results/data --out {output}"
        " --checkpoint-dir {params.checkpoints} --threads {threads}"
        " {params.flags} {params.common} > {log} 2>&1"


# Radial routing with reuse (variant radial-reuse): the same distillation, but a token may run a
# layer a second time right after the first (distill.reuse_layers), up to distill.max_depth runs.
rule distill_reuse:
    input:
        model=results("models/dense"),
        data=expand("results/data/{task}", task=TASKS),
    output:
        directory(results("models/radial-reuse")),
    log:
        logs("distill_reuse.log"),
    benchmark:
        benchmarks("distill_reuse.tsv")
    params:
        launcher=train_launcher(config["distill"]["gpus"]),
        checkpoints=results("train/distill-reuse/checkpoints"),
        flags=section_flags("distill", exclude=["gpus"]),
        common=common_flags(),
    threads: workflow.cores
    resources:
        gpu=config["distill"]["gpus"],
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.launcher} distill --reuse --model {input.model} --data-dir results/data --out {output}"
        " --checkpoint-dir {params.checkpoints} --threads {threads}"
        " {params.flags} {params.common} > {log} 2>&1"
