rule report:
    input:
        evaluations=expand("results/eval/{variant}/{task}.json", variant=VARIANTS, task=EVAL_TASKS),
        profile="results/profile",
        model="results/models/dense",
    output:
        report="results/report/report.md",
        table="results/report/table.csv",
        pareto="results/report/pareto.png",
        equal_depth="results/report/equal_depth.csv",
    log:
        "logs/report.log",
    params:
        common=common_flags(),
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m radial report --evaluations {input.evaluations} --profile {input.profile} --base-model {input.model}"
        " --out-dir results/report {params.common} > {log} 2>&1"
