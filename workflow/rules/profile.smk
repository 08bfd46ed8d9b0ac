rule profile:
    input:
        model="results/models/dense",
        data=f"results/data/{config['profile']['task']}",
    output:
        directory("results/profile"),
    log:
        "logs/profile.log",
    benchmark:
        "benchmarks/profile.tsv"
    params:
        split=config["profile"]["split"],
        flags=section_flags("profile", exclude=["task", "split"]),
        common=common_flags(),
    resources:
        gpu=gpus("auto"),  # the profile stage runs on a GPU when one is visible
    conda:
        "../../envs/eval.yaml"
    shell:
        "python -m radial profile --model {input.model} --data {input.data}/{params.split}.jsonl --out {output}"
        " {params.flags} {params.common} > {log} 2>&1"
