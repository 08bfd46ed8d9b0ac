"""envs/*.yaml (for --sdm conda) carry the same pins as pyproject.toml, and every rule names one."""

from __future__ import annotations

import re
import tomllib

import yaml

from conftest import PROJECT_ROOT


def _requirement(spec: str) -> tuple[str, str]:
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", spec)
    return match.group(1).lower().replace("_", "-"), match.group(2).replace(" ", "")


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    return dict(_requirement(s) for s in specs)


def test_env_pins_match_pyproject():
    pins = _pyproject_pins()
    env_files = sorted((PROJECT_ROOT / "envs").glob("*.yaml"))
    assert {f.stem for f in env_files} >= {"data", "train", "eval", "report"}
    for env_file in env_files:
        env = yaml.safe_load(env_file.read_text())
        pip_specs = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        for spec in pip_specs:
            name, version = _requirement(spec)
            assert name in pins, f"{env_file.name}: {name} is not declared in pyproject.toml"
            assert version == pins[name], f"{env_file.name}: {name}{version} but pyproject.toml has {name}{pins[name]}"


def test_every_rule_names_an_existing_env():
    for rule_file in sorted((PROJECT_ROOT / "workflow/rules").glob("*.smk")):
        text = rule_file.read_text()
        rules = re.findall(r"^rule (\w+):", text, flags=re.M)
        envs = re.findall(r'conda:\s*\n\s*"([^"]+)"', text)
        assert len(envs) == len(rules), f"{rule_file.name}: {len(rules)} rules but {len(envs)} conda envs"
        for env in envs:
            assert (rule_file.parent / env).resolve().is_file(), f"{rule_file.name}: {env} does not exist"
