rule base_model:
    input:
        base_model_inputs,
    output:
        directory(results("models/dense")),
    log:
        logs("base_model.log"),
    benchmark:
        benchmarks("base_model.tsv")
    params:
        flags=base_model_flags,
        common=common_flags(),
    threads: workflow.cores
    resources:
        gpu=0,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m radial base-model --out {output} --threads {threads} {params.flags} {params.common} > {log} 2>&1"
