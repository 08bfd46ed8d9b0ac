# MCTS layer-path labels (Dr.LLM supervision), scattered over `mcts.shards` shards and gathered.
# A shard checkpoints into results/<model>/mcts/progress/ (deliberately not a declared output, so a killed
# shard keeps its progress and resumes); its declared output is written once it is complete.
# `snakemake --set-scatter mcts=N` overrides the number of shards.


scattergather:
    mcts=config["mcts"]["shards"],


rule mcts_shard:
    input:
        model=results("models/dense"),
        data=expand("results/data/{task}", task=config["mcts"]["tasks"]),
    output:
        results("mcts/shards/{scatteritem}.jsonl"),
    log:
        logs("mcts/{scatteritem}.log"),
    benchmark:
        benchmarks("mcts/{scatteritem}.tsv")
    params:
        shard=mcts_shard_flags,
        progress=results("mcts/progress/{scatteritem}.jsonl"),
        flags=section_flags("mcts", exclude=["shards", "improved_share"]),
        common=common_flags(),
    threads: 1
    resources:
        gpu=gpus(config["mcts"]["device"]),
    conda:
        "../../envs/eval.yaml"
    shell:
        "python -m radial mcts search --model {input.model} --data-dir results/data"
        " {params.shard} --progress {params.progress} --out {output}"
        " --threads {threads} {params.flags} {params.common} > {log} 2>&1"


rule mcts:
    input:
        gather.mcts(results("mcts/shards/{scatteritem}.jsonl")),
    output:
        labels=results("mcts/labels.jsonl"),
        stats=results("mcts/stats.json"),
        plot=results("mcts/layers_saved.png"),
    log:
        logs("mcts/gather.log"),
    benchmark:
        benchmarks("mcts/gather.tsv")
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.labels),
        label_set=cli_flags({"improved_share": config["mcts"]["improved_share"]}),
        common=common_flags(),
    conda:
        "../../envs/eval.yaml"
    shell:
        "python -m radial mcts gather {input} --out-dir {params.out_dir} {params.label_set} {params.common} > {log} 2>&1"
