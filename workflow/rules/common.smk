import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # radial itself, also when not pip-installed
from radial.config import describe_validation_error, find_validation_error


try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as err:
    validation_error = find_validation_error(err)
    if validation_error is None:
        raise
    raise WorkflowError(describe_validation_error(validation_error)) from None


TASKS = ["arc_easy", "arc_challenge", "gsm8k", "mmlu", "synthetic"]
BENCHMARKS = ["arc_easy", "arc_challenge", "gsm8k", "mmlu"]
VARIANTS = config["evaluate"]["variants"]
EVAL_TASKS = config["evaluate"]["tasks"]
PROJECT_DIR = Path(workflow.basedir)


wildcard_constraints:
    task="|".join(TASKS),
    variant=r"\w[\w.-]*",


def project_path(path):
    """Config paths are relative to the directory holding the Snakefile."""
    return str((PROJECT_DIR / path).resolve()) if path and not os.path.isabs(path) else path


def cli_flags(options):
    """{'hidden_size': 128} -> '--hidden-size 128' (config keys map one-to-one to stage flags)."""
    flags = []
    for key, value in options.items():
        if value is None:
            continue
        flags.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(flags)


def common_flags():
    return f"--seed {config['seed']} --run-name {config['run_name']} --wandb-mode {config['wandb']['mode']}"


def data_flags(wildcards):
    if wildcards.task == "synthetic":
        synthetic = config["data"]["synthetic"]
        return cli_flags(
            {"synthetic_train": synthetic["train"], "synthetic_test": synthetic["test"], "levels": synthetic["levels"]}
        )
    local_dir = project_path(config["data"]["local_dir"])
    return cli_flags({"local_dir": local_dir, "hub_timeout": config["data"]["hub_timeout"]})


def base_model_inputs(wildcards):
    if config["model"]["name_or_path"]:
        return []
    return expand("results/data/{task}", task=TASKS)


def base_model_flags(wildcards):
    name_or_path = config["model"]["name_or_path"]
    if name_or_path:
        local = project_path(name_or_path)
        return cli_flags({"name_or_path": local if os.path.exists(local) else name_or_path})
    return cli_flags({"data_dir": "results/data", **config["model"]["embedded"]})


def variant_model(wildcards):
    return {"dense": "results/models/dense"}[wildcards.variant]




# Jobs run `python -m radial` from this checkout inside whichever environment runs them (the
# installed one by default, envs/*.yaml with --sdm conda). Snakemake's default prefix is kept.
shell.prefix(f"set -euo pipefail; export PYTHONPATH={PROJECT_DIR / 'src'}:${{{{PYTHONPATH:-}}}}; ")
