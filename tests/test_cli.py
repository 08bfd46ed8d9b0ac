from __future__ import annotations

import subprocess
import sys

from radial.__main__ import STAGES


def test_help_lists_every_stage():
    result = subprocess.run([sys.executable, "-m", "radial", "--help"], capture_output=True, text=True, check=True)
    for stage in STAGES:
        assert stage in result.stdout


def test_unknown_stage_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "radial", "train-everything"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
