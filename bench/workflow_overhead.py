"""Snakemake overhead of the workflow itself: how long a run takes when there is nothing to do.

    python bench/workflow_overhead.py [--workdir DIR] [--configfile FILE] [--repeats 3] [--cores 2]

Runs the tiny workflow (tests/workflow/config.yaml, or --configfile) to completion once in DIR (a
temp dir unless given; a finished DIR is reused as is), then times, as a user would type them from
the project root:
- noop rerun: `snakemake --cores 2 --configfile tests/workflow/config.yaml` (must report "Nothing to
  be done": every output cached);
- dry run: the same with `--dry-run`;
- baseline: a no-op run of a one-rule Snakefile, i.e. Snakemake's own start-up on this machine.
Medians over the repeats. The ratio noop/baseline is what the workflow adds (parsing the rules,
validating the config, the DAG over every output). Target: noop rerun <= 5 s.

The last line is `noop_rerun_s=... dryrun_s=... baseline_s=... noop_over_baseline=...`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = PROJECT_ROOT / "tests/workflow/config.yaml"
TARGET_S = 5.0


def snakemake(workdir: Path, *args: str, snakefile: Path = PROJECT_ROOT / "Snakefile") -> tuple[float, str]:
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), *args]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stdout + result.stderr


def median_time(repeats: int, workdir: Path, *args: str, expect: str | None = None, **kwargs) -> float:
    times = []
    for _ in range(repeats):
        elapsed, log = snakemake(workdir, *args, **kwargs)
        if expect and expect not in log:
            raise SystemExit(f"expected {expect!r} from snakemake {' '.join(args)}; got:\n{log[-3000:]}")
        times.append(elapsed)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="finished (or to-be-built) tiny workflow directory; default: a temp dir")
    parser.add_argument("--configfile", type=Path, default=TINY_CONFIG, help="workflow config (default: the tiny one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="radial-overhead-") as scratch:
        workdir = (args.workdir or Path(scratch) / "tiny").resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        run = ["--cores", str(args.cores), "--configfile", str(args.configfile.resolve())]
        elapsed, log = snakemake(workdir, *run)
        if "Nothing to be done" not in log:
            print(f"built the tiny workflow in {workdir} ({elapsed:.0f} s)", flush=True)

        noop = median_time(args.repeats, workdir, *run, expect="Nothing to be done")
        dry = median_time(args.repeats, workdir, *run, "--dry-run", expect="Nothing to be done")

        empty = Path(scratch) / "empty"
        empty.mkdir()
        (empty / "Snakefile").write_text('rule all:\n    output: "done"\n    shell: "touch {output}"\n')
        snakemake(empty, "--cores", "1", snakefile=empty / "Snakefile")
        baseline = median_time(args.repeats, empty, "--cores", "1", snakefile=empty / "Snakefile", expect="Nothing to be done")

    print(f"{'run':12} {'median s':>9}")
    for name, seconds in (("noop rerun", noop), ("dry run", dry), ("baseline", baseline)):
        print(f"{name:12} {seconds:9.2f}")
    verdict = "within" if noop <= TARGET_S else "over"
    print(f"noop rerun {verdict} the {TARGET_S:g} s target; the workflow adds {noop - baseline:.2f} s to Snakemake's start-up")
    print(f"noop_rerun_s={noop:.2f} dryrun_s={dry:.2f} baseline_s={baseline:.2f} noop_over_baseline={noop / baseline:.2f}"
          f" target_s={TARGET_S:g} repeats={args.repeats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
