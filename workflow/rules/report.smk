rule report:
    input:
        evaluations=expand(results("eval/{variant}/{task}.json"), variant=VARIANTS, task=EVAL_TASKS),
        profile=results("profile"),
        model=results("models/dense"),
        mcts=mcts_stats_for_report,
        depth_trend=depth_trend_targets(),
    output:
        report=results("report/report.md"),
        table=results("report/table.csv"),
        pareto=results("report/pareto.png"),
        equal_depth=results("report/equal_depth.csv"),
    log:
        logs("report.log"),
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.report),
        mcts=lambda wildcards, input: f"--mcts-stats {input.mcts}" if input.mcts else "",
        depth_trend=lambda wildcards, input: f"--depth-trend {input.depth_trend}" if input.depth_trend else "",
        common=common_flags(),
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m radial report --evaluations {input.evaluations} --profile {input.profile} --base-model {input.model}"
        " {params.mcts} {params.depth_trend} --out-dir {params.out_dir} {params.common} > {log} 2>&1"


# With wandb.mode online and an entity: a wandb Report of this run (tables, Pareto plot, curves).
rule wandb_report:
    input:
        report=results("report/report.md"),
    output:
        results("report/wandb_report.txt"),
    log:
        logs("wandb_report.log"),
    params:
        entity=cli_flags({"entity": wandb_entity()}),
        run_name=cli_flags({"run_name": config["run_name"]}),
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m radial wandb-report {params.entity} {params.run_name} > {output} 2> {log}"
