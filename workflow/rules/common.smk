import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # radial itself, also when not pip-installed
from radial.settings import SCHEMA_PATH, describe_validation_error, find_validation_error
from radial.eval_tasks import check_external_tasks
from radial.hub import check_model_source, check_results_model, model_slug
from radial.tracking import resolve_mode
from radial.utils import RadialError
from radial.variants import evaluation_variants, is_baseline_variant, knob_setting, soft_exits


try:
    validate(config, schema=str(SCHEMA_PATH))  # src/radial/resources/config.schema.yaml
except WorkflowError as err:
    validation_error = find_validation_error(err)
    if validation_error is None:
        raise
    raise WorkflowError(describe_validation_error(validation_error)) from None


TASKS = ["arc_easy", "arc_challenge", "gsm8k", "mmlu", "synthetic"]
BENCHMARKS = ["arc_easy", "arc_challenge", "gsm8k", "mmlu"]
try:
    VARIANTS = evaluation_variants(config)  # evaluate.variants families expanded over their sweeps
except RadialError as err:
    raise WorkflowError(str(err)) from None
EVAL_TASKS = config["evaluate"]["tasks"]
PROJECT_DIR = Path(workflow.basedir)
# Each model's results, logs and run-time benchmarks go under a folder of its own, named after it
# (radial.hub.model_slug), so that another model never overwrites them; results/data (the benchmark
# rows) and results/sweep (profile.models) serve every model.
MODEL_SLUG = model_slug(config["model"]["name_or_path"])


def results(path):
    """`path` under this model's results folder: results("models/dense") -> results/<model>/models/dense."""
    return f"results/{MODEL_SLUG}/{path}"


def logs(path):
    return f"logs/{MODEL_SLUG}/{path}"


def benchmarks(path):
    return f"benchmarks/{MODEL_SLUG}/{path}"


wildcard_constraints:
    task="|".join(TASKS),
    variant=r"\w[\w.-]*",
    name=r"[A-Za-z0-9][A-Za-z0-9_.-]*",


def project_path(path):
    """Config paths are relative to the directory holding the Snakefile. On a command line they are
    written relative to the working directory (unless given absolute), so that a run moved to another
    folder, with what its paths point to, keeps its params and stays complete."""
    if not path or os.path.isabs(path):
        return path
    return os.path.relpath(os.path.normpath(PROJECT_DIR / path), os.getcwd())  # links kept: they move along


def include_paths():
    """evaluate.include_path as a list of folders, relative ones under the Snakefile's directory."""
    paths = config["evaluate"].get("include_path") or []
    return [project_path(path) for path in ([paths] if isinstance(paths, str) else paths)]


# Any task besides radial's own must be known to lm-eval (its registry or evaluate.include_path)
# before anything runs; looking through lm-eval's registry takes ~10-20 s, so only then.
try:
    check_external_tasks(EVAL_TASKS, include_paths())
except RadialError as err:
    raise WorkflowError(str(err)) from None
RADIAL_EVAL_TASKS = [task for task in EVAL_TASKS if task in TASKS]  # the others need no data stage
try:
    MODEL_LAYERS = check_model_source(
        "model.name_or_path", config["model"]["name_or_path"], PROJECT_DIR, config["model"]["embedded"]["layers"]
    )
    # Two sources whose folder names coincide (../ckpt and ckpt) must not re-make each other's results.
    check_results_model(Path("results", MODEL_SLUG), config["model"]["name_or_path"], PROJECT_DIR)
except RadialError as err:
    raise WorkflowError(str(err)) from None
OLD_LAYOUT = [name for name in ("models", "profile", "mcts", "train", "eval", "report") if Path("results", name).is_dir()]
if Path("results/models/dense/radial_base.json").is_file() and MODEL_SLUG not in OLD_LAYOUT:
    print(
        f"radial: results/{{{','.join(OLD_LAYOUT)}}} hold a run from before per-model folders; this run writes "
        f"results/{MODEL_SLUG}/. To count that run as done, move it there: "
        f"mkdir -p results/{MODEL_SLUG} && mv {' '.join(f'results/{name}' for name in OLD_LAYOUT)} results/{MODEL_SLUG}/",
        file=sys.stderr,
    )
too_deep = [k for k in config["baselines"]["shortgpt"]["k"] if MODEL_LAYERS is not None and k >= MODEL_LAYERS]
if too_deep and "shortgpt" in config["evaluate"]["variants"]:
    raise WorkflowError(
        f"baselines.shortgpt.k: {too_deep[0]} would remove every layer of the model's {MODEL_LAYERS} (k < {MODEL_LAYERS})"
    )
if config["profile"]["split"] == "test":
    raise WorkflowError(
        "profile.split: 'test' is the split the variants are scored on; calibrate on another split "
        "(train, validation or dev): ShortGPT's pruned layers and the profile come from it"
    )
for key in ("limit_per_task", "num_fewshot"):
    for task in config["evaluate"][key]:
        if task not in EVAL_TASKS and task not in TASKS:  # radial's own carry schema defaults
            raise WorkflowError(f"evaluate.{key}.{task}: {task!r} is not in evaluate.tasks ({', '.join(EVAL_TASKS)})")


SWEEP_MODELS = [entry["name"] for entry in config["profile"]["models"]]
for entry in config["profile"]["models"]:
    where = f"profile.models entry {entry['name']!r}"
    if ("name_or_path" in entry) == ("embedded" in entry):
        raise WorkflowError(f"{where}: give exactly one of name_or_path (a Hub id or a folder) and embedded (a recipe)")
    unknown = sorted(set(entry.get("embedded") or {}) - set(config["model"]["embedded"]))
    if unknown:
        raise WorkflowError(
            f"{where}: unknown model.embedded key {unknown[0]!r} (known: {', '.join(sorted(config['model']['embedded']))})"
        )
    try:
        check_model_source(where, entry.get("name_or_path"), PROJECT_DIR)
    except RadialError as err:
        raise WorkflowError(str(err)) from None
if len(set(SWEEP_MODELS)) != len(SWEEP_MODELS):
    raise WorkflowError(f"profile.models: names must differ ({', '.join(SWEEP_MODELS)})")


def cli_flags(options):
    """{'hidden_size': 128, 'repeat': False} -> '--hidden-size 128 --no-repeat' (config keys map
    one-to-one to stage flags; the stages build those flags from the same schema). Values are
    shell-quoted; a list gives several values; None gives no flag (the stage's default is null too)."""
    flags = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (list, tuple)):
            flags.append(" ".join([flag, *(shlex.quote(str(item)) for item in value)]))
        else:
            flags.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(flags)


def section_flags(section, exclude=()):
    """The flags of every key of config section `section` ("distill", "baselines.finetune"), except
    the workflow's own keys named in `exclude` (e.g. gpus, which picks the launcher)."""
    options = config
    for part in section.split("."):
        options = options[part]
    return cli_flags({key: value for key, value in options.items() if key not in exclude})


def eval_limit(task):
    """evaluate.limit_per_task[task] when set, else evaluate.limit."""
    override = config["evaluate"]["limit_per_task"].get(task)
    return config["evaluate"]["limit"] if override is None else override


def wandb_entity():
    """Who owns the wandb Report of this run: config wandb.entity, else $WANDB_ENTITY (None: no Report)."""
    return config["wandb"].get("entity") or os.environ.get("WANDB_ENTITY") or None


def wandb_report_targets():
    """The wandb Report is built when runs go online and someone owns them; offline runs are synced first."""
    online = resolve_mode(config["wandb"]["mode"]) == "online"  # $WANDB_MODE overrides, as in every stage
    return [results("report/wandb_report.txt")] if online and wandb_entity() else []


def common_flags():
    return cli_flags({"seed": config["seed"], "run_name": config["run_name"], "wandb_mode": config["wandb"]["mode"]})


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


def model_source_flags(name_or_path, embedded):
    """The base-model stage's flags for a Hub id or local folder, else for the embedded recipe `embedded`."""
    if name_or_path:
        local = project_path(name_or_path)
        return cli_flags({"name_or_path": local if os.path.exists(local) else name_or_path})
    return f"--data-dir results/data {cli_flags(embedded)}"


def base_model_flags(wildcards):
    return model_source_flags(config["model"]["name_or_path"], config["model"]["embedded"])


def sweep_entry(name):
    return next(entry for entry in config["profile"]["models"] if entry["name"] == name)


def sweep_model_inputs(wildcards):
    return [] if "name_or_path" in sweep_entry(wildcards.name) else expand("results/data/{task}", task=TASKS)


def sweep_model_flags(wildcards):
    """A sweep model like the run's own (base_model_flags): a Hub id or folder, or the embedded recipe overridden."""
    entry = sweep_entry(wildcards.name)
    return model_source_flags(entry.get("name_or_path"), config["model"]["embedded"] | entry.get("embedded", {}))


def calibration_file(wildcards, input):
    """The profiled split of profile.task, shell-quoted (the split name is the user's string)."""
    return shlex.quote(f"{input.data}/{config['profile']['split']}.jsonl")


def depth_trend_targets():
    return ["results/sweep/depth_trend"] if SWEEP_MODELS else []


def variant_model(wildcards):
    if is_baseline_variant(wildcards.variant):
        return results(f"models/{wildcards.variant}")
    knob = knob_setting(wildcards.variant)  # routers-b1: the routers' folder, evaluated at another skip bias
    trained = knob[0] if knob else wildcards.variant
    return results(f"models/{trained}")


def knob_flags(wildcards):
    knob = knob_setting(wildcards.variant)
    return cli_flags({"skip_bias": knob[1]}) if knob else ""


def eval_task_flags():
    """Every evaluated task's limit and few-shot count (evaluate.limit, .limit_per_task, .num_fewshot)."""
    overrides = [f"{task}={eval_limit(task)}" for task in EVAL_TASKS if eval_limit(task) != config["evaluate"]["limit"]]
    fewshots = config["evaluate"]["num_fewshot"]  # a task not listed: radial's own default, or the task YAML's own
    fewshot = [f"{task}={fewshots[task]}" for task in EVAL_TASKS if fewshots.get(task) is not None]
    return cli_flags(
        {
            "limit": config["evaluate"]["limit"],
            "limit_per_task": overrides or None,
            "num_fewshot": fewshot or None,
            "include_path": include_paths() or None,
        }
    )


def mcts_stats_for_report(wildcards):
    """The report describes the MCTS labels when the routers trained on them are evaluated."""
    return [results("mcts/stats.json")] if "routers" in VARIANTS else []


def gpus(device):
    """GPUs a job on `device` holds: the workstation profile's `gpu` limit keeps GPU jobs from
    overlapping, and the SLURM executor turns `gpu=1` into `sbatch --gpus=1`. "auto" may pick a GPU."""
    return 0 if str(device).startswith("cpu") else 1


def train_launcher(num_gpus):
    """How a training stage starts: 0 = one CPU process (GPUs hidden, DeepSpeed's CPU accelerator),
    1 = one process on one GPU, N > 1 = the `deepspeed` launcher with one process per GPU
    (`--no_local_rank`: ranks come from the environment, not from an appended flag)."""
    if num_gpus > 1:
        return f"deepspeed --num_gpus {num_gpus} --no_local_rank --module radial"
    if num_gpus == 1:
        return "python -m radial"
    return "CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu python -m radial"


def mcts_shard_flags(wildcards):
    """Scatter item '3-of-4' -> the 0-based shard index and the shard count of `radial mcts search`."""
    index, total = wildcards.scatteritem.split("-of-")
    return f"--shard {int(index) - 1} --shards {total}"


# Jobs run `python -m radial` from this checkout inside whichever environment runs them (the
# installed one by default, envs/*.yaml with --sdm conda). Snakemake's default prefix is kept.
shell.prefix(f"set -euo pipefail; export PYTHONPATH={PROJECT_DIR / 'src'}:${{{{PYTHONPATH:-}}}}; ")
