rule profile:
    input:
        model=results("models/dense"),
        data=f"results/data/{config['profile']['task']}",
    output:
        directory(results("profile")),
    log:
        logs("profile.log"),
    benchmark:
        benchmarks("profile.tsv")
    params:
        calibration=calibration_file,
        flags=section_flags("profile", exclude=["task", "split", "models"]),
        common=common_flags(),
    resources:
        gpu=gpus("auto"),  # the profile stage runs on a GPU when one is visible
    conda:
        "../../envs/eval.yaml"
    shell:
        "python -m radial profile --model {input.model} --data {params.calibration} --out {output}"
        " {params.flags} {params.common} > {log} 2>&1"


# The depth trend (profile.models): more models, profiled on the same calibration text.
rule sweep_model:
    input:
        sweep_model_inputs,
    output:
        directory("results/sweep/models/{name}"),
    log:
        "logs/sweep/{name}/base_model.log",
    benchmark:
        "benchmarks/sweep/{name}/base_model.tsv"
    params:
        flags=sweep_model_flags,
        common=common_flags(),
    threads: workflow.cores
    resources:
        gpu=0,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m radial base-model --out {output} --threads {threads} {params.flags} {params.common} > {log} 2>&1"


rule sweep_profile:
    input:
        model="results/sweep/models/{name}",
        data=f"results/data/{config['profile']['task']}",
    output:
        directory("results/sweep/profiles/{name}"),
    log:
        "logs/sweep/{name}/profile.log",
    params:
        calibration=calibration_file,
        flags=section_flags("profile", exclude=["task", "split", "models"]),
        common=common_flags(),
    resources:
        gpu=gpus("auto"),
    conda:
        "../../envs/eval.yaml"
    shell:
        "python -m radial profile --model {input.model} --data {params.calibration} --out {output}"
        " {params.flags} {params.common} > {log} 2>&1"


rule depth_trend:
    input:
        expand("results/sweep/profiles/{name}", name=SWEEP_MODELS),
    output:
        directory("results/sweep/depth_trend"),
    log:
        "logs/sweep/depth_trend.log",
    params:
        common=common_flags(),
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m radial depth-trend --profiles {input} --out {output} {params.common} > {log} 2>&1"
