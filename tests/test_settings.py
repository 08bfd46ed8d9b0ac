"""One definition per setting: every stage's flags take their defaults from the config schema."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from radial import settings
from radial.__main__ import STAGES, main as radial_main
from radial.training import TrainConfig
from radial.utils import RadialError

# The config sections a stage's flags come from; a flag named like a key of one of them must be
# that key's flag (same default), not a hand-written twin.
STAGE_SECTIONS = {
    "data": ["data", "data.synthetic"],
    "base-model": ["model", "model.embedded"],
    "profile": ["profile"],
    "mcts": ["mcts"],
    "routers": ["routers"],
    "distill": ["distill"],
    "shortgpt": ["baselines.shortgpt"],
    "soft": ["baselines.finetune", "baselines.soft"],
    "soft-exit": ["baselines.soft"],
    "dlo": ["baselines.finetune", "baselines.dlo"],
    "evaluate": ["evaluate"],
    "report": [],
    "depth-trend": [],
    "wandb-report": ["wandb"],
}
COMMON = {"seed": "seed", "run_name": "run_name", "wandb_mode": "wandb.mode"}
# Stages that log nothing and draw nothing take fewer than the common three (wandb-report: run name, entity).
LINKED_AT_LEAST = {"wandb-report": 2}


def stage_parsers(stage: str) -> list[argparse.ArgumentParser]:
    parser = argparse.ArgumentParser()
    importlib.import_module(STAGES[stage][0]).add_arguments(parser)
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    return parsers


def test_every_stage_is_mapped():
    assert set(STAGE_SECTIONS) == set(STAGES)


# Flags named like a config key that mean something else on the command line.
OTHER_MEANING = {
    ("mcts", "shards"): "the count of shards this one belongs to (the config key sets the workflow's scatter)",
    ("evaluate", "num_fewshot"): "one task's shots; None takes evaluate.num_fewshot.<task> from the schema",
}


def is_sweep_value(action, key) -> bool:
    """A flag that takes one value of a sweep list (given by the workflow for each variant)."""
    return action.nargs is None and "array" in str(settings.key_schema(key).get("type"))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_flags_take_the_schema_defaults(stage):
    section_keys = {}
    for section in STAGE_SECTIONS[stage]:
        for key in settings.section_keys(section):
            section_keys[key.rsplit(".", 1)[-1]] = key
    linked = 0
    for parser in stage_parsers(stage):
        for action in parser._actions:
            key = getattr(action, "setting", None)
            if key is None:
                twin = COMMON.get(action.dest) or section_keys.get(action.dest)
                assert twin is None or (stage, action.dest) in OTHER_MEANING, (
                    f"radial {stage} {action.option_strings[0]} is written by hand beside config key {twin}"
                )
                continue
            linked += 1
            if action.required or is_sweep_value(action, key):
                continue
            assert action.default == settings.default(key), f"radial {stage} {action.option_strings[0]} ({key})"
    assert linked >= LINKED_AT_LEAST.get(stage, 3), f"radial {stage}: only {linked} flags linked to the schema"


@pytest.mark.parametrize("stage,section", [("routers", "routers"), ("distill", "distill"), ("soft", "baselines.finetune")])
def test_train_config_from_default_flags_equals_the_config_section(stage, section):
    from radial.training import train_config_from_args

    parser = stage_parsers(stage)[0]
    required = {a.dest: "x" for a in parser._actions if a.required}
    args = parser.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in required.items()])
    cfg = train_config_from_args(args)
    for name in ("steps", "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "zero_stage", "checkpoint_every"):
        assert getattr(cfg, name) == settings.default(f"{section}.{name}"), name
    assert cfg.bf16 == settings.default("$defs.training.bf16")
    assert cfg.deepspeed_config.is_file()  # the ZeRO JSON ships inside the package


def test_a_bad_flag_value_is_refused_once_naming_flag_and_key(capsys):
    assert radial_main(["distill", "--model", "m", "--data-dir", "d", "--out", "o", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps 0" in err and "config key distill.steps" in err and "Traceback" not in err
    assert radial_main(["dlo", "--model", "m", "--data-dir", "d", "--out", "o", "--capacity", "1.5"]) == 2
    assert "config key baselines.dlo.capacity" in capsys.readouterr().err


def test_train_config_is_validated_by_the_same_schema():
    with pytest.raises(RadialError, match="zero_stage=4"):
        TrainConfig(steps=1, batch_size=1, grad_accum=1, lr=1e-3, warmup_steps=0, weight_decay=0.0, zero_stage=4,
                    checkpoint_every=0, seed=0)


def test_no_stage_imports_another_and_no_library_imports_a_stage():
    import ast
    from pathlib import Path

    package = Path(settings.__file__).parent
    for path in package.rglob("*.py"):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        is_stage = module.startswith("radial.stages.")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("radial.stages.") and name.count(".") >= 2 and not name.endswith("__init__"):
                    target = name
                    assert not is_stage or target.startswith(module), f"stage {module} imports stage {target}"
                    assert is_stage or module == "radial.__main__", f"library module {module} imports stage {target}"


@pytest.mark.slow
def test_the_wheel_ships_the_schema_and_the_zero_files(tmp_path):
    """A non-editable install has no workflow/ folder: what the stages read must be package data."""
    import zipfile

    from conftest import PROJECT_ROOT

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(PROJECT_ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("radial-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"radial/resources/config.schema.yaml", "radial/stages/distill.py", "radial/stages/baselines/dlo.py",
                "radial/training/loop.py"} | {f"radial/resources/deepspeed/zero{z}.json" for z in (1, 2, 3)}
    assert expected <= names
