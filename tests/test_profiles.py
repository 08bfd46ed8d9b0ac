"""The workstation and SLURM profiles: documented, consistent with the workflow's rules, and what
they ask for per job (checked on Snakemake's own dry run; tests/test_slurm.py runs them for real)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import PROJECT_ROOT

DEFAULT_PROFILE = PROJECT_ROOT / "profiles/default/config.yaml"
SLURM_PROFILE = PROJECT_ROOT / "profiles/slurm/config.yaml"
TINY_CONFIG = PROJECT_ROOT / "tests/workflow/config.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(PROJECT_ROOT / "Snakefile")]


def _dry_run(tmp_path, *args, config: dict | None = None, env: dict | None = None) -> dict[str, list[dict]]:
    """Rule -> the jobs Snakemake plans (threads and resources as it would request them)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_file = TINY_CONFIG
    if config is not None:
        config_file = tmp_path / "config.yaml"
        config_file.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [*SNAKEMAKE, "--dry-run", "--directory", str(tmp_path), "--configfile", str(config_file), *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs: dict[str, list[dict]] = {}
    for rule, block in re.findall(r"\nrule (\w+):\n((?:    .*\n)+)", result.stdout):
        threads = re.search(r"^    threads: (\d+)$", block, re.M)
        listed = re.search(r"^    resources: (.*)$", block, re.M)
        resources = dict(item.split("=", 1) for item in listed.group(1).split(", ")) if listed else {}
        jobs.setdefault(rule, []).append({"threads": int(threads.group(1)) if threads else 1, **resources})
    return jobs


@pytest.fixture(scope="module")
def workflow_rules():
    listed = subprocess.run([*SNAKEMAKE, "--list-rules", "--configfile", str(TINY_CONFIG)],
                            capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert listed.returncode == 0, listed.stderr
    return set(listed.stdout.split())


@pytest.mark.parametrize("profile", [DEFAULT_PROFILE, SLURM_PROFILE], ids=["default", "slurm"])
def test_every_profile_entry_is_commented(profile):
    """A comment sits right above each top-level entry, or above the group of one-line entries it is in."""
    lines = profile.read_text().splitlines()
    one_line_entry = re.compile(r"^[a-z][\w-]*: \S")
    for number, line in enumerate(lines):
        if re.match(r"^[a-z][\w-]*:", line):
            above = number - 1
            while above >= 0 and one_line_entry.match(lines[above]):
                above -= 1
            assert above >= 0 and lines[above].startswith("#"), f"{profile.name}:{number + 1} has no comment: {line}"


def test_workstation_profile_limits_gpu_jobs():
    profile = yaml.safe_load(DEFAULT_PROFILE.read_text())
    assert profile["cores"] == "all" and profile["printshellcmds"] is True
    assert "gpu=1" in profile["resources"]


def test_slurm_profile_names_only_existing_rules(workflow_rules):
    profile = yaml.safe_load(SLURM_PROFILE.read_text())
    assert profile["executor"] == "slurm"
    named = set(profile["set-resources"]) | set(profile["set-threads"])
    assert named <= workflow_rules, f"rules in profiles/slurm that the workflow lacks: {named - workflow_rules}"
    # Every rule of the workflow belongs to a family the profile sizes (`all` submits nothing).
    assert workflow_rules - {"all"} <= set(profile["set-resources"]), workflow_rules - set(profile["set-resources"])


def test_slurm_profile_requests_per_job(tmp_path):
    env = {"RADIAL_SLURM_PARTITION": "cpu-part", "RADIAL_SLURM_GPU_PARTITION": "gpu-part", "RADIAL_SLURM_ACCOUNT": "proj"}
    jobs = _dry_run(tmp_path, "--workflow-profile", str(SLURM_PROFILE), env=env)
    gpu_families = {"profile", "sweep_profile", "mcts_shard", "routers", "distill", "distill_reuse", "shortgpt", "soft",
                    "dlo", "evaluate"}  # fmt: skip
    for rule, planned in jobs.items():
        for job in planned:
            if rule == "all":
                continue
            # No job inherits the profile's total `cores` as its thread (= CPU) request.
            assert job["threads"] <= 8, (rule, job)
            assert int(job["runtime"]) > 0 and int(job["mem_mb"]) >= 8000, (rule, job)
            assert job["slurm_account"] == "proj", (rule, job)
            expected = "gpu-part" if rule in gpu_families else "cpu-part"
            assert job["slurm_partition"] == expected, (rule, job)
    assert jobs["base_model"][0]["threads"] == 8 and jobs["evaluate"][0]["threads"] == 4


@pytest.mark.slow
def test_gpu_declared_exactly_when_the_device_is_a_gpu(tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    on_cpu = _dry_run(tmp_path / "cpu", "--cores", "2")
    assert all(int(job.get("gpu", 0)) == 0 for job in on_cpu["evaluate"] + on_cpu["mcts_shard"])
    config["evaluate"]["device"] = "cuda"
    config["mcts"]["device"] = "cuda:0"
    on_gpu = _dry_run(tmp_path / "gpu", "--cores", "2", config=config)
    assert all(int(job["gpu"]) == 1 for job in on_gpu["evaluate"] + on_gpu["mcts_shard"])
