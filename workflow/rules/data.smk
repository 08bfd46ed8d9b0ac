rule data:
    output:
        directory("results/data/{task}"),
    log:
        "logs/data/{task}.log",
    benchmark:
        "benchmarks/data/{task}.tsv"
    params:
        flags=data_flags,
        common=common_flags(),
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m radial data --task {wildcards.task} --out {output} {params.flags} {params.common} > {log} 2>&1"
