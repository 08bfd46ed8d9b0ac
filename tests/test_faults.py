"""Faults on shared machines, through real `snakemake` runs of the tiny config in a temp directory:
bad input stops the run with one message naming the file and line (or the config key) and leaves
no output that looks complete; with no network and no local files the run fails fast.

Then SIGKILL in the middle of a stage (an MCTS shard; distillation, with Snakemake killed too): the
next `snakemake` resumes from the stage's checkpoint and ends with the same outputs as a run nobody
killed. The stage-level versions live in tests/test_data.py, test_base_model.py, test_config.py (an
invalid config key stops even the dry run), test_mcts.py and test_routers_train.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from conftest import PROJECT_ROOT, SHARED_DATA
from radial.hub import model_slug

pytestmark = pytest.mark.slow

TINY_CONFIG = yaml.safe_load((PROJECT_ROOT / "tests/workflow/config.yaml").read_text())


def _snakemake(workdir, config: dict, *args, env: dict | None = None, timeout: float = 300):
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(PROJECT_ROOT / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(config_file), "--cores", "1", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    return result.returncode, result.stdout + result.stderr


def _config(**data) -> dict:
    config = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    config["data"].update(data)
    return config


def _assert_not_complete(workdir, config, output: str, rule: str):
    """The failed job's output is gone and a new run plans that job again."""
    assert not (workdir / output).exists()
    incomplete = workdir / ".snakemake" / "incomplete"
    assert not incomplete.exists() or not any(incomplete.iterdir())
    code, log = _snakemake(workdir, config, "--dry-run", output)
    assert code == 0 and f"rule {rule}:" in log and output in log, log[-3000:]


def _one_message(log: str, message: str):
    """The stage's one-line error reaches the terminal (Snakemake shows the failed job's log), no traceback."""
    assert message in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture
def local_data(tmp_path, shared_data):
    """A private copy of the ARC and GSM8K originals that a test may damage."""
    copy = tmp_path / "benchmarks"
    for task in ("arc", "gsm8k"):
        shutil.copytree(shared_data / task, copy / task)
    return copy


def test_truncated_data_file_stops_with_file_and_line(tmp_path, local_data):
    path = local_data / "arc/ARC-Easy-Test.csv"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])  # a copy cut off mid-row, as by a full disk
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = _config(local_dir=str(local_data))
    code, log = _snakemake(workdir, config, "results/data/arc_easy")
    assert code != 0
    _one_message(log, f"{path}:1172: expected 12 columns, found 10")
    _assert_not_complete(workdir, config, "results/data/arc_easy", "data")


def test_malformed_row_stops_with_file_and_line(tmp_path, local_data):
    path = local_data / "gsm8k/test.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[41] = lines[41].rstrip().rstrip("}") + "\n"  # line 42 loses its closing brace
    path.write_text("".join(lines))
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = _config(local_dir=str(local_data))
    code, log = _snakemake(workdir, config, "results/data/gsm8k")
    assert code != 0
    _one_message(log, f"{path}:42: not valid JSON")
    _assert_not_complete(workdir, config, "results/data/gsm8k", "data")


@pytest.mark.parametrize("problem", ["missing", "no model inside"])
def test_a_bad_model_folder_stops_the_workflow_at_start_and_keeps_the_finished_model(tmp_path, problem):
    workdir = tmp_path / "run"
    finished = workdir / "results/embedded/models/dense"
    finished.mkdir(parents=True)
    (finished / "model.safetensors").write_bytes(b"ten minutes of pre-training")
    folder = tmp_path / "models" / "llama-local"
    if problem == "no model inside":
        folder.mkdir(parents=True)
    config = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    config["model"]["name_or_path"] = str(folder)
    code, log = _snakemake(workdir, config)
    assert code != 0
    expected = "does not exist) nor a Hub id" if problem == "missing" else "holds no model (no config.json there)"
    assert f"model.name_or_path: " in log and expected in log and str(folder) in log, log[-3000:]
    assert (finished / "model.safetensors").read_bytes() == b"ten minutes of pre-training"
    assert not (workdir / "results" / model_slug(str(folder))).exists()


def test_another_model_writes_its_own_results_and_never_overwrites_the_finished_ones(tmp_path):
    """results/embedded/ of the embedded model, then a config naming a local model: the whole chain
    is planned under results/<that model>/ and the embedded model's results stay. A folder of that
    name holding another source's results stops the workflow at start, naming it and how to keep it."""
    workdir = tmp_path / "run"
    finished = workdir / "results/embedded/models/dense"
    finished.mkdir(parents=True)
    (finished / "model.safetensors").write_bytes(b"ten minutes of pre-training")
    (finished / "radial_base.json").write_text(json.dumps({"source": "embedded", "num_layers": 4}))
    other = tmp_path / "models" / "llama-local"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    config = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    config["model"]["name_or_path"] = str(other)
    slug = model_slug(str(other))
    assert slug.endswith("models--llama-local")

    code, log = _snakemake(workdir, config, "--dry-run")  # the default target: the whole chain
    assert code == 0, log[-3000:]
    assert f"--out results/{slug}/models/dense " in log and f"results/{slug}/report/report.md" in log
    assert "results/embedded/" not in log and "logs/embedded/" not in log
    assert (finished / "model.safetensors").read_bytes() == b"ten minutes of pre-training"

    theirs = workdir / "results" / slug / "models/dense"
    theirs.mkdir(parents=True)
    (theirs / "radial_base.json").write_text(json.dumps({"source": "elsewhere/llama-local", "num_layers": 4}))
    code, log = _snakemake(workdir, config, "--dry-run")
    assert code != 0
    assert f"results/{slug}/ holds the results of model 'elsewhere/llama-local'" in log, log[-3000:]
    assert f"this config names {str(other)!r}" in log and f"mv results/{slug} results/{slug}-previous" in log
    assert "Traceback" not in log, log[-3000:]

    # Built from that folder (recorded relative to the run folder), the same folder given absolute is the same model.
    (theirs / "radial_base.json").write_text(json.dumps({"source": "../models/llama-local", "num_layers": 4}))
    code, log = _snakemake(workdir, config, "--dry-run")
    assert code == 0, log[-3000:]


def test_a_run_from_before_per_model_folders_is_pointed_at_its_new_place(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "results/models/dense").mkdir(parents=True)
    (workdir / "results/models/dense/radial_base.json").write_text(json.dumps({"source": "embedded"}))
    code, log = _snakemake(workdir, TINY_CONFIG, "--dry-run", "results/embedded/models/dense")
    assert code == 0, log[-3000:]
    assert "mkdir -p results/embedded && mv results/models results/embedded/" in log, log[-3000:]


def test_config_values_reach_the_shell_quoted(tmp_path):
    """A model name with shell syntax or a space is one argument, never a command."""
    workdir = tmp_path / "run dir"
    workdir.mkdir()
    config = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    config["model"]["name_or_path"] = "x$(touch pwned)"
    assert model_slug("x$(touch pwned)") == "x-touch-pwned"
    code, log = _snakemake(workdir, config, "results/x-touch-pwned/models/dense")
    assert code != 0  # no such model
    assert "x$(touch pwned)" in log and "unrecognized arguments" not in log
    assert not list(tmp_path.rglob("pwned")) and not (PROJECT_ROOT / "pwned").exists()


@pytest.fixture
def silent_endpoint():
    """A local address that never answers a connection (its accept queue is full, so the kernel
    drops new SYNs), like a firewalled cluster node: the bound a hang would otherwise break."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    for open_socket in (*fillers, server):
        open_socket.close()


@pytest.mark.parametrize("network", ["no DNS", "silent"])
def test_no_network_and_no_local_files_fails_fast(tmp_path, network, silent_endpoint):
    """The Hub not in offline mode but unreachable: its name does not resolve (.invalid never
    does), or it never answers. The data stage gives up after data.hub_timeout instead of hanging."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    endpoint = "huggingface.invalid" if network == "no DNS" else silent_endpoint
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = f"https://{endpoint}"
    config = _config(local_dir=None, hub_timeout=3)
    start = time.monotonic()
    code, log = _snakemake(workdir, config, "results/data/arc_easy", env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert code != 0
    host_port = endpoint if ":" in endpoint else f"{endpoint}:443"
    _one_message(log, f"no TCP connection to {host_port} within 3 s")
    assert "data.local_dir" in log
    assert elapsed < 60, f"took {elapsed:.0f} s"  # Snakemake and the stage start up; the probe waits <= 3 s
    _assert_not_complete(workdir, config, "results/data/arc_easy", "data")


# --- SIGKILL in the middle of a stage, then `snakemake` again ------------------------------------


def _stage_pids(workdir, *words: str) -> list[int]:
    """Processes running in `workdir` with every word as one of their arguments: the stage itself,
    not the shell around it (whose command is one string)."""
    pids = []
    for proc in os.scandir("/proc"):
        try:
            argv = open(f"/proc/{proc.name}/cmdline", "rb").read().split(b"\0")
            cwd = os.readlink(f"/proc/{proc.name}/cwd")
        except (OSError, ValueError):
            continue
        if cwd == os.path.realpath(workdir) and all(word.encode() in argv for word in words):
            pids.append(int(proc.name))
    return pids


def _wait_for(condition, process, what: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)


def _resume_config(model_dir) -> dict:
    """The tiny config over a local tiny model (copied, not pre-trained), with MCTS and distillation
    long enough to be killed part-way."""
    config = _config(local_dir=str(SHARED_DATA))
    config["model"]["name_or_path"] = str(model_dir)
    config["mcts"].update(examples=12, shards=2, checkpoint_every=1, simulations=200)
    config["distill"].update(steps=30, checkpoint_every=5, eval_every=10)
    return config


MCTS_LABELS = "results/embedded/mcts/labels.jsonl"
DISTILLED = "results/embedded/models/radial"


def _start(workdir, config, *targets) -> subprocess.Popen:
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(PROJECT_ROOT / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(config_file), "--cores", "1", *targets]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir):
    """The reference: MCTS labels and the distilled model from one run that nobody killed."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = _resume_config(tiny_llama_dir)
    code, log = _snakemake(workdir, config, MCTS_LABELS, DISTILLED, timeout=1800)
    assert code == 0, log[-5000:]
    return workdir


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "search_seconds"} for row in rows]


@pytest.mark.integration
def test_sigkilled_mcts_shard_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_llama_dir, uninterrupted):
    from radial.utils import read_jsonl

    config = _resume_config(tiny_llama_dir)
    run = _start(tmp_path, config, MCTS_LABELS)
    progress = tmp_path / "results/embedded/mcts/progress/1-of-2.jsonl"
    # Kill the stage process of shard 1 (Snakemake stays up, sees the job fail) once it has
    # checkpointed a few examples.
    _wait_for(lambda: progress.is_file() and len(progress.read_text().splitlines()) >= 1 + 2, run, "shard progress")
    pids = _stage_pids(tmp_path, "mcts", "search", "results/embedded/mcts/shards/1-of-2.jsonl")
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    log, _ = run.communicate(timeout=600)
    assert run.returncode != 0 and "Error in rule mcts_shard" in log, log[-3000:]
    assert not (tmp_path / "results/embedded/mcts/shards/1-of-2.jsonl").exists()  # nothing half-written looks complete
    done_before = len(progress.read_text().splitlines()) - 1
    assert 2 <= done_before < 6, done_before  # 12 examples over 2 shards: killed part-way

    code, log = _snakemake(tmp_path, config, MCTS_LABELS, timeout=900)
    assert code == 0, log[-4000:]
    assert f"resuming shard 1/2 after {done_before} of 6 examples" in (tmp_path / "logs/embedded/mcts/1-of-2.log").read_text()
    resumed = _without_timing(read_jsonl(tmp_path / MCTS_LABELS))
    assert resumed == _without_timing(read_jsonl(uninterrupted / MCTS_LABELS))


@pytest.mark.integration
def test_sigkilled_workflow_during_distillation_resumes_and_matches_an_uninterrupted_run(
    tmp_path, tiny_llama_dir, uninterrupted
):
    """SIGKILL to Snakemake and the training process together (a node crash): the next run needs
    `snakemake --unlock`, then re-runs the incomplete job, which resumes from its last checkpoint."""
    import torch
    from safetensors.torch import load_file

    config = _resume_config(tiny_llama_dir)
    run = _start(tmp_path, config, DISTILLED)
    latest = tmp_path / "results/embedded/train/distill/checkpoints/latest"
    _wait_for(latest.is_file, run, "a distillation checkpoint", timeout=900)
    os.killpg(run.pid, signal.SIGKILL)
    for pid in _stage_pids(tmp_path, "distill"):  # the stage runs in Snakemake's session: gone too
        os.kill(pid, signal.SIGKILL)
    run.communicate()
    killed_at = latest.read_text().strip()
    assert killed_at != f"step{config['distill']['steps']}" and not (tmp_path / DISTILLED).exists()

    locked, log = _snakemake(tmp_path, config, DISTILLED)  # the killed run's lock is still there
    assert locked != 0 and "cannot be locked" in log, log[-2000:]
    assert _snakemake(tmp_path, config, "--unlock")[0] == 0
    code, log = _snakemake(tmp_path, config, DISTILLED, timeout=1200)  # rerun-incomplete: the workstation profile
    assert code == 0, log[-4000:]
    assert "resumed from" in (tmp_path / "logs/embedded/distill.log").read_text()

    info = json.loads((tmp_path / DISTILLED / "training.json").read_text())
    reference = json.loads((uninterrupted / DISTILLED / "training.json").read_text())
    assert info["resumed_from_step"] == int(killed_at.removeprefix("step"))
    assert [row["loss"] for row in info["history"]] == pytest.approx([row["loss"] for row in reference["history"]], rel=1e-4)
    for weights in ("router.safetensors", "base/model.safetensors"):
        resumed, expected = load_file(tmp_path / DISTILLED / weights), load_file(uninterrupted / DISTILLED / weights)
        assert resumed.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(resumed[name], expected[name], rtol=1e-4, atol=1e-6)
