# radial: residual profiling, layer routing and evaluation of dynamic-depth LLMs.
# Stages live in workflow/rules/<stage>.smk; the code they run is src/radial/stages/<stage>.py
# (baselines.smk: src/radial/stages/baselines/), on the library beside it in src/radial/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base_model.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/mcts.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/routers.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        results("report/report.md"),
        results("report/table.csv"),
        results("mcts/labels.jsonl"),
        wandb_report_targets(),
        depth_trend_targets(),
    default_target: True
