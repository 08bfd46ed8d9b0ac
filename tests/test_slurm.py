"""The SLURM profile on a real scheduler: a single-node SLURM with accounting started on localhost.

`python -m pytest --slow` runs it (marked slurm and slow; `-m "not slurm"` leaves it out). It installs
slurm-wlm, munge and MariaDB with apt-get when missing (root), starts the daemons (tests/local_slurm.py),
runs the tiny workflow (every variant, evaluated on the synthetic task) with `--workflow-profile
profiles/slurm` exactly as shipped (partition and account come from the RADIAL_SLURM_* variables),
checks in SLURM's accounting that every job went through sbatch and completed, and stops the daemons.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml

from conftest import PROJECT_ROOT
from local_slurm import ACCOUNT, PARTITION, local_slurm_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # in CI (`--slow`) since three clean-clone runs in a row passed

TINY_CONFIG = PROJECT_ROOT / "tests/workflow/config.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(PROJECT_ROOT / "Snakefile"),
             "--workflow-profile", str(PROJECT_ROOT / "profiles/slurm")]
# A stuck `snakemake --executor slurm` ignores SIGTERM; SIGKILL to its process group bounds every run.
TIME_LIMIT_S = 1500


def _run(args, cwd, env, timeout=TIME_LIMIT_S) -> subprocess.CompletedProcess:
    """Run in its own process group, killed with it when the time is up or the test is interrupted."""
    process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def _tiny_config(workdir) -> list[str]:
    """The tiny end-to-end config, every variant evaluated on the synthetic task only: every rule
    family goes through SLURM, in about a third of the jobs of the full evaluation matrix."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["evaluate"]["tasks"] = ["synthetic"]
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--configfile", str(path)]


def _cluster_env(**overrides):
    return {**os.environ, "RADIAL_SLURM_PARTITION": PARTITION, "RADIAL_SLURM_GPU_PARTITION": PARTITION,
            "RADIAL_SLURM_ACCOUNT": ACCOUNT, **overrides}


def _planned_jobs(log: str) -> Counter:
    """Jobs per rule from Snakemake's "Job stats" table."""
    table = log.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    rows = [line.split() for line in table.strip().splitlines()[2:]]
    return Counter({rule: int(count) for rule, count in rows if rule != "total"})


def _submitted_jobs(log: str) -> dict[str, tuple[str, dict]]:
    """SLURM job id -> (rule, resources) from Snakemake's job announcements and its
    "Job N has been submitted with SLURM jobid M" lines."""
    announced = {}
    for rule, block in re.findall(r"\nrule (\w+):\n((?:    .*\n)+)", log):
        jobid = re.search(r"^    jobid: (\d+)$", block, re.M).group(1)
        listed = re.search(r"^    resources: (.*)$", block, re.M)
        resources = dict(item.split("=", 1) for item in listed.group(1).split(", ")) if listed else {}
        announced[jobid] = (rule, resources)
    return {slurm_id: announced[jobid]
            for jobid, slurm_id in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)}


def _accounting(run_id: str) -> dict[str, dict]:
    fields = ["JobIDRaw", "JobName", "State", "ExitCode", "Account", "Partition", "AllocTRES"]
    out = subprocess.run(["sacct", "-X", "--parsable2", "--noheader", f"--format={','.join(fields)}", "--name", run_id,
                          "--starttime", "now-1days"], capture_output=True, text=True, check=True).stdout
    return {row[0]: dict(zip(fields, row)) for row in (line.split("|") for line in out.strip().splitlines())}


class TestOnLocalCluster:
    """One cluster for the tests of this class; it stops after the last of them."""

    @pytest.fixture(scope="class")
    def slurm_cluster(self, tmp_path_factory):
        with local_slurm_cluster(tmp_path_factory.mktemp("slurm-cluster")) as started:
            yield started

    def test_tiny_workflow_runs_through_sbatch_and_completes(self, slurm_cluster, tmp_path):
        started = time.monotonic()
        # What differs from a production run: a status check 2 s after submission instead of 40, and
        # jobs of at most half this node's cores (= threads), so two run at once as with --cores 2.
        max_threads = max(1, os.cpu_count() // 2)
        result = _run([*SNAKEMAKE, *_tiny_config(tmp_path), "--slurm-init-seconds-before-status-checks", "2",
                       "--max-threads", str(max_threads)], tmp_path, _cluster_env())
        log = result.stdout + result.stderr
        elapsed = time.monotonic() - started
        assert result.returncode == 0, log[-6000:]
        print(f"tiny workflow through SLURM: {elapsed:.0f} s")

        planned = _planned_jobs(log)
        local = {"all"}  # target rule without a shell command; Snakemake finishes it itself
        submitted = _submitted_jobs(log)
        assert Counter(rule for rule, _ in submitted.values()) == planned - Counter({rule: planned[rule] for rule in local})

        run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
        accounting = _accounting(run_id)
        assert set(accounting) == set(submitted), "every submitted job is in SLURM's accounting, and nothing else"
        gpu_rules = set()
        for slurm_id, job in accounting.items():
            rule, resources = submitted[slurm_id]
            assert (job["State"], job["ExitCode"]) == ("COMPLETED", "0:0"), (rule, job)
            assert (job["Account"], job["Partition"]) == (ACCOUNT, PARTITION), (rule, job)
            # A job holding `gpu=N` (its device is a GPU or "auto") got N GPUs from SLURM; others none.
            gpus = int(resources.get("gpu", 0))
            assert (f"gres/gpu={gpus}" in job["AllocTRES"]) if gpus else ("gres/gpu" not in job["AllocTRES"]), (rule, job)
            gpu_rules |= {rule} if gpus else set()
            # Every job's SLURM log is kept under logs/slurm/rule_<rule>/.
            assert list((tmp_path / "logs/slurm" / f"rule_{rule}").rglob(f"{slurm_id}.log")), (rule, slurm_id)
        assert "profile" in gpu_rules  # the GPU request path was exercised

        assert (tmp_path / "results/embedded/report/report.md").stat().st_size > 0
        assert (tmp_path / "results/embedded/report/table.csv").stat().st_size > 0

        # Resuming: a second run through the same profile finds everything done and submits nothing.
        again = _run([*SNAKEMAKE, *_tiny_config(tmp_path), "--dry-run"], tmp_path, _cluster_env(), timeout=300)
        assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    def test_unset_partition_stops_with_a_message_naming_the_variable(self, slurm_cluster, tmp_path):
        env = _cluster_env()
        del env["RADIAL_SLURM_PARTITION"]
        result = _run([*SNAKEMAKE, "results/data/synthetic", *_tiny_config(tmp_path)], tmp_path, env, timeout=300)
        assert result.returncode != 0
        assert "RADIAL_SLURM_PARTITION" in result.stdout + result.stderr
        assert not (tmp_path / "results/data/synthetic").exists()


def test_stopped_cluster_leaves_no_configuration_behind(tmp_path):
    """After the cluster stops, `scontrol` fails at once instead of waiting on a missing controller,
    so ordinary snakemake runs stay fast (the slurm plugin asks scontrol on every start)."""
    with local_slurm_cluster(tmp_path / "cluster"):
        assert subprocess.run(["scontrol", "ping"], capture_output=True, timeout=30).returncode == 0
    begin = time.monotonic()
    probe = subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=60)
    assert probe.returncode != 0 and time.monotonic() - begin < 2
