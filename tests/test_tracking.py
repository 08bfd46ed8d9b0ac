"""wandb: a stage really logs an offline run (project radial, group = run name, job type = stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_report_stage_writes_an_offline_wandb_run(tmp_path):
    evaluation = {"variant": "dense", "task": "arc_easy", "metric": "acc", "accuracy": 0.5,
                  "avg_executed_layers": 4, "num_layers": 4, "wall_time_s": 1.0,
                  "forward_time_s": 0.5, "forward_tokens": 100, "n_examples": 10}
    (tmp_path / "e.json").write_text(json.dumps(evaluation))
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env["WANDB_DIR"] = str(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "radial", "report", "--evaluations", str(tmp_path / "e.json"),
         "--out-dir", str(tmp_path / "report"), "--run-name", "wandb-check"],
        check=True, capture_output=True, env=env, cwd=tmp_path, timeout=120,
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "offline mode is the default and writes exactly one run"
    run_files = list(runs[0].rglob("*.wandb"))
    assert run_files and run_files[0].stat().st_size > 0
    recorded = run_files[0].read_bytes()
    for expected in (b"radial", b"wandb-check", b"report"):
        assert expected in recorded
