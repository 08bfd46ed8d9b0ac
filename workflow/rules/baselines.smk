# Baselines the routed models are compared with. Every variant is a model folder under
# results/<model>/models/<variant> that the evaluate rule picks up (variant_model in common.smk); the sweep
# lists in config key `baselines` expand to these wildcards (radial.variants).
# SoFT and DLO fine-tune on the DeepSpeed harness: they run on a GPU when evaluation does.
FINETUNE_FLAGS = section_flags("baselines.finetune")
FINETUNE_DATA = expand("results/data/{task}", task=TASKS)


rule shortgpt:
    input:
        model=results("models/dense"),
        profile=results("profile"),
    output:
        directory(results("models/shortgpt-k{k}")),
    log:
        logs("baselines/shortgpt-k{k}.log"),
    benchmark:
        benchmarks("baselines/shortgpt-k{k}.tsv")
    wildcard_constraints:
        k=r"\d+",
    params:
        common=common_flags(),
    conda:
        "../../envs/eval.yaml"
    shell:
        "python -m radial shortgpt --model {input.model} --profile {input.profile} --k {wildcards.k} --out {output}"
        " {params.common} > {log} 2>&1"


rule soft:
    input:
        model=results("models/dense"),
        data=FINETUNE_DATA,
    output:
        directory(results("models/soft")),
    log:
        logs("baselines/soft.log"),
    benchmark:
        benchmarks("baselines/soft.tsv")
    params:
        exits=lambda wildcards: " ".join(map(str, soft_exits(config))),
        flags=FINETUNE_FLAGS,
        common=common_flags(),
    threads: workflow.cores
    resources:
        gpu=gpus(config["evaluate"]["device"]),
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m radial soft --model {input.model} --data-dir results/data --exits {params.exits} --out {output}"
        " --threads {threads} {params.flags} {params.common} > {log} 2>&1"


rule soft_exit:
    input:
        results("models/soft"),
    output:
        directory(results("models/soft-exit{depth}")),
    log:
        logs("baselines/soft-exit{depth}.log"),
    benchmark:
        benchmarks("baselines/soft-exit{depth}.tsv")
    wildcard_constraints:
        depth=r"\d+",
    params:
        common=common_flags(),
    conda:
        "../../envs/eval.yaml"
    shell:
        "python -m radial soft-exit --model {input} --depth {wildcards.depth} --out {output} {params.common} > {log} 2>&1"


rule soft_confidence_exit:
    input:
        results("models/soft"),
    output:
        directory(results("models/soft-conf{threshold}")),
    log:
        logs("baselines/soft-conf{threshold}.log"),
    benchmark:
        benchmarks("baselines/soft-conf{threshold}.tsv")
    wildcard_constraints:
        threshold=r"\d+(\.\d+)?",
    params:
        common=common_flags(),
    conda:
        "../../envs/eval.yaml"
    shell:
        "python -m radial soft-exit --model {input} --threshold {wildcards.threshold} --out {output}"
        " {params.common} > {log} 2>&1"


rule dlo:
    input:
        model=results("models/dense"),
        data=FINETUNE_DATA,
    output:
        directory(results("models/dlo-c{capacity}")),
    log:
        logs("baselines/dlo-c{capacity}.log"),
    benchmark:
        benchmarks("baselines/dlo-c{capacity}.tsv")
    wildcard_constraints:
        capacity=r"0?\.\d+",
    params:
        dlo_flags=section_flags("baselines.dlo", exclude=["capacity"]),  # capacity: the wildcard
        flags=FINETUNE_FLAGS,
        common=common_flags(),
    threads: workflow.cores
    resources:
        gpu=gpus(config["evaluate"]["device"]),
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m radial dlo --model {input.model} --data-dir results/data --capacity {wildcards.capacity}"
        " {params.dlo_flags} --out {output} --threads {threads} {params.flags}"
        " {params.common} > {log} 2>&1"
