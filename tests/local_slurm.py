"""A real single-node SLURM cluster on localhost, with accounting, for tests/test_slurm.py.

Debian's slurm-wlm 22.05, munge and MariaDB (installed with apt-get when missing; needs root).
munged, a private mariadbd (data dir under the run dir), slurmdbd, slurmctld and slurmd start from
a minimal configuration without cgroups (proctrack/linuxproc, task/none). Accounting through
slurmdbd is what lets snakemake-executor-plugin-slurm follow jobs with `sacct` and validate the
account, as on a production cluster. The node has this machine's CPUs but declares more memory
and two GPUs (SlurmdParameters=config_overrides; GPUs backed by /dev/null and /dev/zero) so the
memory and GPU requests of the shipped profile fit unchanged; nothing here makes a GPU usable.

The configuration has to live at /etc/slurm (the job-step plugin drops SLURM_CONF before its
nested srun); the files written there carry MARKER and are removed on stop, so later `snakemake`
runs do not wait on `scontrol` for a controller that is gone.

    python tests/local_slurm.py start|stop RUN_DIR      # by hand, for debugging
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

SLURM_ETC = Path("/etc/slurm")
MARKER = "# written by radial tests/local_slurm.py; removed when the test cluster stops"
PARTITION = "radial-test"
ACCOUNT = "radial-test"
PACKAGES = ["slurm-wlm", "slurmdbd", "munge", "mariadb-server"]
COMMANDS = ["slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "mariadb-install-db", "sbatch", "sacct", "sacctmgr"]
_CHILDREN: list[subprocess.Popen] = []  # reaped on stop
PORTS = {"slurmctld": 16817, "slurmd": 16818, "slurmdbd": 16819, "mariadb": 16306}


class ClusterError(RuntimeError):
    pass


def _run(*command: str, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


def ensure_installed() -> None:
    """apt-get install the SLURM, munge and MariaDB packages unless their commands are present."""
    if all(shutil.which(command) for command in COMMANDS):
        return
    if os.geteuid() != 0:
        raise ClusterError(f"SLURM is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, capture_output=True, env=env, timeout=900).returncode != 0:
        _run("apt-get", "update", timeout=600, env=env)
        _run(*install, timeout=900, env=env)
    missing = [command for command in COMMANDS if not shutil.which(command)]
    if missing:
        raise ClusterError(f"installed {PACKAGES} but these commands are still missing: {missing}")


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _write_etc(name: str, text: str, mode: int = 0o644) -> Path:
    path = SLURM_ETC / name
    if path.exists() and MARKER not in path.read_text(errors="replace"):
        raise ClusterError(f"{path} exists and was not written by this test; refusing to replace a real SLURM setup")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{MARKER}\n{text}")
    path.chmod(mode)
    return path


def _wait_for(what: str, ready, timeout: float = 60, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise ClusterError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def _pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
        return None


def _stop(pid_file: Path, timeout: float = 20) -> None:
    pid = _pid(pid_file)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def slurm_conf(run_dir: Path, host: str) -> str:
    return f"""ClusterName=radialtest
SlurmctldHost={host}
SlurmctldPort={PORTS['slurmctld']}
SlurmdPort={PORTS['slurmd']}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={run_dir}/state
SlurmdSpoolDir={run_dir}/spool
SlurmctldPidFile={run_dir}/slurmctld.pid
SlurmdPidFile={run_dir}/slurmd.pid
SlurmctldLogFile={run_dir}/slurmctld.log
SlurmdLogFile={run_dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={PORTS['slurmdbd']}
AccountingStorageTRES=gres/gpu
AccountingStorageEnforce=associations
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
NodeName={host} CPUs={os.cpu_count()} RealMemory=262144 Gres=gpu:2 State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def slurmdbd_conf(run_dir: Path) -> str:
    return f"""AuthType=auth/munge
DbdHost=localhost
DbdPort={PORTS['slurmdbd']}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={PORTS['mariadb']}
StorageUser=slurm
StoragePass=radial-test
StorageLoc=slurm_acct_db
LogFile={run_dir}/slurmdbd.log
PidFile={run_dir}/slurmdbd.pid
"""


def gres_conf(host: str) -> str:
    return f"AutoDetect=off\nNodeName={host} Name=gpu File=/dev/null\nNodeName={host} Name=gpu File=/dev/zero\n"


def start(run_dir: Path) -> dict:
    """Start the cluster; returns what stop() needs. Stops what it started if a later step fails."""
    run_dir = Path(run_dir).resolve()
    ensure_installed()
    busy = [name for name, port in PORTS.items() if _port_in_use(port)]
    if busy:
        raise ClusterError(f"ports of {busy} are in use: another test cluster (or a real one) is running here")
    host = socket.gethostname()
    for sub in ("state", "spool"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    started = {"run_dir": str(run_dir), "munged": False, "etc": []}
    try:
        _start_munge(started)
        _start_mariadb(run_dir)
        started["etc"].append(str(_write_etc("slurmdbd.conf", slurmdbd_conf(run_dir), mode=0o600)))
        started["etc"].append(str(_write_etc("slurm.conf", slurm_conf(run_dir, host))))
        started["etc"].append(str(_write_etc("gres.conf", gres_conf(host))))
        _run("slurmdbd")
        _wait_for("slurmdbd", lambda: _port_in_use(PORTS["slurmdbd"]), log=run_dir / "slurmdbd.log")
        _run("slurmctld")
        _wait_for("slurmctld", lambda: _run("scontrol", "ping", check=False).returncode == 0, log=run_dir / "slurmctld.log")
        _run("slurmd")
        _wait_for(
            "the node",
            lambda: _run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip() in ("idle", "mixed", "allocated"),
            log=run_dir / "slurmd.log",
        )
        _wait_for("the cluster in slurmdbd", lambda: "radialtest" in _run("sacctmgr", "-n", "list", "cluster", "format=cluster", check=False).stdout)
        _run("sacctmgr", "-i", "add", "account", ACCOUNT, "Description=radial tests", "Organization=radial")
        _run("sacctmgr", "-i", "add", "user", "root", f"Account={ACCOUNT}", f"DefaultAccount={ACCOUNT}")
    except BaseException:
        stop(started)
        raise
    return started


def _start_munge(started: dict) -> None:
    if _run("munge", "-n", check=False).returncode == 0:
        return  # a munged is already running; leave it to whoever started it
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    _run("runuser", "-u", "munge", "--", "munged")
    started["munged"] = True
    _wait_for("munged", lambda: _run("munge", "-n", check=False).returncode == 0)


def _start_mariadb(run_dir: Path) -> None:
    socket_path = run_dir / "mariadb.sock"
    _run("mariadb-install-db", "--no-defaults", f"--datadir={run_dir}/db", "--user=root",
         "--auth-root-authentication-method=socket", timeout=120)
    _CHILDREN.append(subprocess.Popen(
        ["mariadbd", "--no-defaults", f"--datadir={run_dir}/db", f"--socket={socket_path}", f"--port={PORTS['mariadb']}",
         "--bind-address=127.0.0.1", "--user=root", f"--pid-file={run_dir}/mariadb.pid",
         f"--log-error={run_dir}/mariadb.log", "--skip-log-bin", "--innodb-buffer-pool-size=64M"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    ))
    _wait_for("mariadbd", socket_path.exists, log=run_dir / "mariadb.log")
    _run("mariadb", "--no-defaults", f"--socket={socket_path}", "-u", "root", "-e",
         "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'radial-test';"
         " GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")


def stop(started: dict) -> None:
    """Cancel jobs, stop the daemons this run started, remove its files under /etc/slurm."""
    run_dir = Path(started["run_dir"])
    if _pid(run_dir / "slurmctld.pid"):
        _run("scancel", "--user=root", check=False)
    for daemon in ("slurmd", "slurmctld", "slurmdbd", "mariadb"):
        _stop(run_dir / f"{daemon}.pid")
    if started.get("munged"):
        _stop(Path("/run/munge/munged.pid"))
    for child in _CHILDREN:
        child.wait(timeout=30)
    _CHILDREN.clear()
    for path in started.get("etc", []):
        path = Path(path)
        if path.exists() and MARKER in path.read_text(errors="replace"):
            path.unlink()


@contextmanager
def local_slurm_cluster(run_dir: Path):
    started = start(run_dir)
    try:
        yield started
    finally:
        stop(started)


if __name__ == "__main__":
    action, run_dir = sys.argv[1], Path(sys.argv[2])
    state = run_dir / "cluster.json"
    import json

    if action == "start":
        state.write_text(json.dumps(start(run_dir)))
        print(f"test cluster up: partition and account {PARTITION}; stop with: python {sys.argv[0]} stop {run_dir}")
    else:
        stop(json.loads(state.read_text()))
