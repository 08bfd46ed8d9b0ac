"""bench/routed_speed.py runs and ends with its key=value summary (speed itself is not asserted:
timings on a shared CPU are too noisy for a test)."""

from __future__ import annotations

import subprocess
import sys

from conftest import PROJECT_ROOT


def test_routed_speed_benchmark_prints_its_summary_line():
    result = subprocess.run(
        [sys.executable, "bench/routed_speed.py", "--models", "embedded", "--batch", "2"]
        + ["--repeats", "1", "--new-tokens", "2", "--threads", "1"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 + 6 + 1  # header, rule, 3 settings x (prefill, decode), summary
    figures = dict(item.split("=") for item in lines[-1].split())
    expected = {"realized_over_ideal", "mixed_realized_over_ideal", "prefill_b1", "decode_b2", "decode_b2_mixed"}
    assert expected <= set(figures)
    assert float(figures["realized_over_ideal"]) > 0
