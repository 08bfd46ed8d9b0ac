"""The config schema: every key described with a default; bad configs stop with one clear message."""

from __future__ import annotations

import subprocess
import sys

import jsonschema
import pytest
import yaml

from conftest import PROJECT_ROOT
from radial import settings
from radial.hub import model_slug
from radial.settings import describe_validation_error

SCHEMA = yaml.safe_load(settings.SCHEMA_PATH.read_text())


def _walk(schema, path=""):
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}{key}", settings.key_schema(f"{path}{key}")
        yield from _walk(sub, f"{path}{key}.")


def test_every_key_has_description_and_default():
    keys = list(_walk(SCHEMA))
    assert len(keys) > 30
    for key, sub in keys:
        assert sub.get("description"), f"{key} has no description"
        assert "default" in sub, f"{key} has no default"


@pytest.mark.parametrize("config_file", ["config.yaml", "tests/workflow/config.yaml", "configs/llama-3.2-3b.yaml", "configs/qwen2.5-3b.yaml",
                                         "configs/radial-depth-sweep.yaml", "configs/opt-family.yaml"])  # fmt: skip
def test_shipped_configs_validate(config_file):
    config = yaml.safe_load((PROJECT_ROOT / config_file).read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(config)


def _first_error(config):
    return describe_validation_error(jsonschema.Draft202012Validator(SCHEMA).iter_errors(config).__next__())


def test_unknown_key_is_named():
    message = _first_error({"evaluate": {"limt": 3}})
    assert "evaluate.limt" in message and "unknown" in message


def test_bad_value_is_named():
    message = _first_error({"model": {"embedded": {"layers": 0}}})
    assert "model.embedded.layers" in message


def test_per_task_limit_names_a_bad_value():
    valid = {"evaluate": {"limit": 3, "limit_per_task": {"arc_easy": 10, "mmlu": 2, "hellaswag": 5}}}
    assert not list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(valid))  # any lm-eval task may be evaluated
    message = _first_error({"evaluate": {"limit_per_task": {"mmlu": 0}}})
    assert "evaluate.limit_per_task.mmlu" in message
    message = _first_error({"evaluate": {"num_fewshot": {"piqa": -1}}})
    assert "evaluate.num_fewshot.piqa" in message


def _dry_run(tmp_path, config: dict, *targets: str, cores: int = 1) -> subprocess.CompletedProcess:
    """`snakemake -n -p` for `targets` under `config`: the shell commands the jobs would run, printed."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--cores", str(cores), "--configfile", str(config_file),
         "--directory", str(tmp_path), "-s", str(PROJECT_ROOT / "Snakefile"), *targets],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name_or_path, folder",
    [
        (None, "embedded"),
        ("meta-llama/Llama-3.2-3B", "meta-llama--Llama-3.2-3B"),
        ("Qwen/Qwen2.5-3B", "Qwen--Qwen2.5-3B"),
        ("../models/Llama-3.2-3B", "models--Llama-3.2-3B"),
        ("/data/ckpt/llama 3b/", "data--ckpt--llama-3b"),
        ("x$(touch pwned)", "x-touch-pwned"),
        ("./data", "model-data"),  # results/data and results/sweep serve every model
        ("embedded", "model-embedded"),
    ],
)
def test_each_model_has_a_results_folder_named_after_it(name_or_path, folder):
    assert model_slug(name_or_path) == folder


def test_two_models_plan_their_chains_in_separate_folders(tmp_path):
    """The whole chain (the schema's defaults) of a Hub model and of the embedded one: no output
    path in common but the shared benchmark rows."""
    outputs = {}
    for name_or_path in (None, "Qwen/Qwen2.5-3B"):
        result = _dry_run(tmp_path, {"model": {"name_or_path": name_or_path}})
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name_or_path] = {
            word for line in result.stdout.splitlines() if "--out " in line
            for word in [line.split("--out ", 1)[1].split()[0]]
        }  # fmt: skip
    embedded, qwen = outputs[None], outputs["Qwen/Qwen2.5-3B"]
    assert "results/embedded/models/dense" in embedded and "results/Qwen--Qwen2.5-3B/models/dense" in qwen
    assert "results/Qwen--Qwen2.5-3B/mcts/shards/1-of-2.jsonl" in qwen and "results/Qwen--Qwen2.5-3B/profile" in qwen
    shared = embedded & qwen
    assert shared and all(path.startswith("results/data/") for path in shared), shared


def test_snakemake_stops_on_unknown_key_with_one_message(tmp_path):
    result = _dry_run(tmp_path, {"evaluate": {"batch_sise": 4}})
    assert result.returncode != 0
    assert "unknown config key 'evaluate.batch_sise'" in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


def test_snakemake_stops_on_bad_value_with_one_message(tmp_path):
    result = _dry_run(tmp_path, {"evaluate": {"tasks": ["arc_easy", "no such task"]}})
    assert result.returncode != 0
    assert "invalid config key 'evaluate.tasks.1'" in result.stderr + result.stdout


def test_a_per_task_setting_for_a_task_not_evaluated_stops_the_workflow(tmp_path):
    result = _dry_run(tmp_path, {"evaluate": {"tasks": ["arc_easy"], "limit_per_task": {"arc_eassy": 3}}})
    assert result.returncode != 0
    out = result.stderr + result.stdout
    assert "evaluate.limit_per_task.arc_eassy: 'arc_eassy' is not in evaluate.tasks" in out and "Traceback" not in out


@pytest.mark.slow  # looks through lm-eval's thousands of task files (~20 s)
def test_an_unknown_task_stops_the_workflow_before_anything_runs(tmp_path):
    result = _dry_run(tmp_path, {"evaluate": {"tasks": ["arc_easy", "hellaswagg"]}})
    assert result.returncode != 0
    out = result.stderr + result.stdout
    assert "evaluate.tasks: unknown task 'hellaswagg'" in out and "lm-eval 0.4" in out and "close: hellaswag" in out
    assert "Traceback" not in out and not (tmp_path / "results").exists()


def test_a_task_of_the_users_own_needs_no_data_stage(tmp_path):
    from conftest import write_user_tasks

    folder = write_user_tasks(tmp_path / "my tasks")  # a space: the path reaches the shell quoted
    config = {"evaluate": {"variants": ["dense"], "tasks": ["toy_parity", "arc_easy"], "include_path": str(folder),
                           "limit_per_task": {"toy_parity": 3}}}  # fmt: skip
    result = _dry_run(tmp_path, config, "results/embedded/eval/dense/toy_parity.json")
    assert result.returncode == 0, result.stderr[-2000:]
    (command,) = [line for line in result.stdout.splitlines() if "radial evaluate" in line]
    assert "--task toy_parity arc_easy " in command and f"--include-path '{folder}'" in command
    assert "--limit-per-task toy_parity=3 " in command and "toy_parity=0" not in command  # its YAML's few-shot
    data_jobs = [line for line in result.stdout.splitlines() if "radial data" in line]
    assert data_jobs and not any("toy_parity" in line for line in data_jobs)


def test_per_task_limit_reaches_each_evaluation_command(tmp_path):
    config = {"evaluate": {"variants": ["dense"], "tasks": ["arc_easy", "mmlu", "gsm8k"], "limit_per_task": {"mmlu": 2}}}
    targets = ["results/embedded/eval/dense/arc_easy.json", "results/embedded/eval/dense/mmlu.json", "results/embedded/eval/dense/gsm8k.json"]
    result = _dry_run(tmp_path, config, *targets)
    assert result.returncode == 0, result.stderr[-2000:]
    (command,) = [line for line in result.stdout.splitlines() if "radial evaluate" in line]  # one job, every task
    assert "--task arc_easy mmlu gsm8k " in command and "--out 'results/embedded/eval/dense/{task}.json'" in command
    assert "--limit-per-task mmlu=2 " in command
    assert "--limit " not in command  # the schema's default limit is null: everything
    assert "--num-fewshot arc_easy=0 mmlu=5 gsm8k=5 " in command  # the schema's per-task defaults
    config["evaluate"]["limit"] = 7
    result = _dry_run(tmp_path, config, *targets)
    (command,) = [line for line in result.stdout.splitlines() if "radial evaluate" in line]
    assert "--limit 7 --limit-per-task mmlu=2 " in command


@pytest.mark.parametrize("timing, threads", [("exclusive", 2), ("shared", 1)])
def test_evaluation_timing_sets_the_cores_each_evaluation_holds(tmp_path, timing, threads):
    config = {"evaluate": {"variants": ["dense"], "tasks": ["arc_easy"], "timing": timing}}
    result = _dry_run(tmp_path, config, "results/embedded/eval/dense/arc_easy.json", cores=2)
    assert result.returncode == 0, result.stderr[-2000:]
    command = next(line for line in result.stdout.splitlines() if "radial evaluate" in line)
    assert command.startswith(f"Shell command: OMP_NUM_THREADS={threads} "), command


def test_an_online_run_with_an_entity_ends_with_its_wandb_report(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    online = _dry_run(tmp_path, {"wandb": {"mode": "online", "entity": "my team"}})
    assert online.returncode == 0, online.stderr
    assert "python -m radial wandb-report --entity 'my team' --run-name default" in online.stdout
    monkeypatch.setenv("WANDB_MODE", "offline")  # $WANDB_MODE overrides the config: offline runs have no Report yet
    offline = _dry_run(tmp_path, {"wandb": {"mode": "online", "entity": "my team"}})
    assert offline.returncode == 0 and "wandb-report" not in offline.stdout
    monkeypatch.setenv("WANDB_MODE", "online")
    nobody = _dry_run(tmp_path, {"wandb": {"mode": "online"}})  # no entity: nowhere to save it
    assert nobody.returncode == 0 and "wandb-report" not in nobody.stdout


def test_profiling_on_the_split_the_variants_are_scored_on_is_refused(tmp_path):
    result = _dry_run(tmp_path, {"profile": {"split": "test"}})
    assert result.returncode != 0
    assert "profile.split: 'test' is the split the variants are scored on" in result.stderr + result.stdout
    calibrated = _dry_run(tmp_path, {}, "results/embedded/profile")
    assert calibrated.returncode == 0 and "--data results/data/synthetic/train.jsonl" in calibrated.stdout


def test_the_reuse_student_is_its_own_variant_trained_with_its_own_flags(tmp_path):
    config = {"evaluate": {"variants": ["dense", "radial", "radial_reuse"]}, "distill": {"reuse_layers": [2, 5], "max_depth": 10}}
    result = _dry_run(tmp_path, config, "results/embedded/eval/radial-reuse/synthetic.json", "results/embedded/models/radial")
    assert result.returncode == 0, result.stderr
    reuse = next(line for line in result.stdout.splitlines() if "distill --reuse" in line)
    assert "--out results/embedded/models/radial-reuse" in reuse and "--reuse-layers 2 5" in reuse and "--max-depth 10" in reuse
    plain = next(line for line in result.stdout.splitlines() if "--out results/embedded/models/radial " in line)
    assert "--reuse" not in plain and "--max-depth" not in plain  # the plain student neither reuses nor changes
    assert "--model results/embedded/models/radial-reuse --variant radial-reuse" in result.stdout


def test_the_depth_sweep_pretrains_each_depth_on_one_token_budget_and_profiles_on_one_text(tmp_path):
    sweep = yaml.safe_load((PROJECT_ROOT / "configs/radial-depth-sweep.yaml").read_text())
    result = _dry_run(tmp_path, sweep, "depth_trend")
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    for layers in (6, 12, 24):
        pretrain = next(c for c in commands if f"--out results/sweep/models/embedded-{layers}L " in c)
        assert f"--layers {layers} " in pretrain and "--steps 1000 " in pretrain and "--hidden-size 128 " in pretrain
        profile = next(c for c in commands if f"--out results/sweep/profiles/embedded-{layers}L " in c)
        assert "--data results/data/synthetic/train.jsonl" in profile
    trend = next(c for c in commands if "radial depth-trend" in c)
    assert all(f"results/sweep/profiles/embedded-{layers}L" in trend for layers in (6, 12, 24))


@pytest.mark.parametrize("entry,message", [
    ({"name": "x"}, "profile.models entry 'x': give exactly one of name_or_path"),
    ({"name": "x", "embedded": {"layers": 6}, "name_or_path": "facebook/opt-125m"}, "give exactly one of"),
    ({"name": "x", "embedded": {"layer": 6}}, "profile.models entry 'x': unknown model.embedded key 'layer'"),
])  # fmt: skip
def test_a_bad_depth_sweep_entry_is_named_at_start(tmp_path, entry, message):
    result = _dry_run(tmp_path, {"profile": {"models": [entry]}})
    assert result.returncode != 0 and message in result.stderr + result.stdout


def test_the_calibration_split_reaches_the_shell_quoted(tmp_path):
    result = _dry_run(tmp_path, {"profile": {"split": "tr ain$(touch pwned)"}}, "results/embedded/profile")
    assert result.returncode == 0, result.stderr
    assert "--data 'results/data/synthetic/tr ain$(touch pwned).jsonl' --out results/embedded/profile" in result.stdout


def test_a_moved_project_plans_the_same_commands(tmp_path):
    """Params hold paths relative to the working directory: a finished run copied elsewhere (with what
    its config points to) has the same params, so Snakemake finds it complete instead of re-running it."""
    import shutil

    commands = []
    for where in (tmp_path / "a", tmp_path / "b" / "deeper"):
        project = where / "project"
        shutil.copytree(PROJECT_ROOT / "workflow", project / "workflow")
        shutil.copytree(PROJECT_ROOT / "profiles", project / "profiles")
        for name in ("Snakefile", "config.yaml"):
            shutil.copy(PROJECT_ROOT / name, project / name)
        (where / "shared").symlink_to(PROJECT_ROOT.parent / "shared")
        result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "-F", "--cores", "1"], cwd=project,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr
        commands.append(sorted(line for line in result.stdout.splitlines() if line.startswith("Shell command")))
    assert commands[0] == commands[1] and any("--local-dir ../shared/data" in c for c in commands[0])


@pytest.mark.parametrize("name_or_path,message", [
    ("/no/such/model", "model.name_or_path: '/no/such/model' is not a folder (/no/such/model does not exist) nor a Hub id"),
    ("./models/mine", "model.name_or_path: './models/mine' is not a folder"),
    ("src", "holds no model (no config.json there)"),
])  # fmt: skip
def test_a_model_that_is_not_there_stops_the_dry_run(tmp_path, name_or_path, message):
    result = _dry_run(tmp_path, {"model": {"name_or_path": name_or_path}, "baselines": {"soft": {"exits": [2]}}})
    assert result.returncode != 0 and message in result.stderr + result.stdout


def test_values_checked_against_the_models_depth_at_start(tmp_path):
    result = _dry_run(tmp_path, {"baselines": {"shortgpt": {"k": [4, 12]}}, "evaluate": {"variants": ["dense", "shortgpt"]}})
    assert result.returncode != 0
    assert "baselines.shortgpt.k: 12 would remove every layer of the model's 12 (k < 12)" in result.stderr + result.stdout
