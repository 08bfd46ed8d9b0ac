# Dr.LLM routers trained on the MCTS labels, base model frozen, on the DeepSpeed harness
# (radial.training). Checkpoints go to results/<model>/train/routers/checkpoints/, deliberately not a
# declared output: a killed job keeps them, and its re-run resumes from the last one.
# routers.gpus: 0 trains on CPU in one process, 1 on one GPU, N > 1 on N GPUs through the
# `deepspeed` launcher (train_launcher in common.smk).


rule routers:
    input:
        model=results("models/dense"),
        labels=results("mcts/labels.jsonl"),
        data=expand("results/data/{task}", task=config["mcts"]["tasks"]),
    output:
        directory(results("models/routers")),
    log:
        logs("routers.log"),
    benchmark:
        benchmarks("routers.tsv")
    params:
        launcher=train_launcher(config["routers"]["gpus"]),
        checkpoints=results("train/routers/checkpoints"),
        flags=section_flags("routers", exclude=["gpus"]),
        common=common_flags(),
    threads: workflow.cores
    resources:
        gpu=config["routers"]["gpus"],
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.launcher} routers --model {input.model} --labels {input.labels} --data-dir results/data"
        " --out {output} --checkpoint-dir {params.checkpoints} --threads {threads}"
        " {params.flags} {params.common} > {log} 2>&1"
