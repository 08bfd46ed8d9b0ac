# Dr.LLM routers trained on the MCTS labels, base model frozen, on the DeepSpeed harness
# (radial.training). Checkpoints go to results/train/routers/checkpoints/, deliberately not a
# declared output: a killed job keeps them, and its re-run resumes from the last one.
# routers.gpus: 0 trains on CPU in one process, 1 on one GPU, N > 1 on N GPUs through the
# `deepspeed` launcher (train_launcher in common.smk).
ROUTERS_TRAIN_KEYS = [
    "steps",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup_steps",
    "weight_decay",
    "zero_stage",
    "checkpoint_every",
    "eval_every",
    "bottleneck",
    "windows",
    "focal_gamma",
    "class_beta",
    "val_fraction",
    "max_length",
]


rule routers:
    input:
        model="results/models/dense",
        labels="results/mcts/labels.jsonl",
        data=expand("results/data/{task}", task=config["mcts"]["tasks"]),
    output:
        directory("results/models/routers"),
    log:
        "logs/routers.log",
    benchmark:
        "benchmarks/routers.tsv"
    params:
        launcher=train_launcher(config["routers"]["gpus"]),
        checkpoints="results/train/routers/checkpoints",
        flags=cli_flags({key: config["routers"][key] for key in ROUTERS_TRAIN_KEYS}),
        correct_only="--correct-only" if config["routers"]["correct_only"] else "",
        common=common_flags(),
    threads: workflow.cores
    resources:
        gpu=config["routers"]["gpus"],
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.launcher} routers --model {input.model} --labels {input.labels} --data-dir results/data"
        " --out {output} --checkpoint-dir {params.checkpoints} --threads {threads}"
        " {params.correct_only} {params.flags} {params.common} > {log} 2>&1"
