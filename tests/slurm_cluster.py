"""A real two-node Slurm cluster on this machine, for the launch tests (../shared/SLURM_LOCAL.md).

Debian's slurm-wlm and munge, installed when missing (root and apt-get needed): munged, slurmctld and
one slurmd per emulated node, on free ports, with config, state and logs under one directory, so
nothing outside it changes besides the packages. Every node is this host. `stop` ends every daemon
the cluster started, munged included when it was not already running.
MinJobAge=4 keeps `sbatch --wait` polling every 2 s (it backs off to 32 s when jobs are kept longer);
cred_expire=10 lets a requeued job start again after 11 s instead of 121 (the node refuses it until
the killed run's credential has expired).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from conftest import free_port

NODES = ("n1", "n2")
PACKAGES = ("slurm-wlm", "munge")
MUNGED_PID = Path("/run/munge/munged.pid")  # Debian's munged writes its pid there


def unavailable() -> Optional[str]:
    """Why this machine cannot host the cluster, or None. Installs the packages when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a local Slurm cluster needs root (to install slurm-wlm and munge and run their daemons)"
    if not all(shutil.which(d) for d in ("slurmctld", "slurmd", "munged")):
        if not shutil.which("apt-get"):
            return "slurm-wlm and munge are not installed and there is no apt-get to install them"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", *PACKAGES]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:  # stale lists on a new machine
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            out = subprocess.run(install, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                return f"apt-get install {' '.join(PACKAGES)} failed: {out.stderr.strip()[-300:]}"
    try:
        socket.gethostbyname(socket.gethostname().split(".")[0])
    except OSError:
        return "this host's short name does not resolve, and slurmd needs it"
    return None


class SlurmCluster:
    """`env` is the environment for sbatch/squeue/scontrol (and, through sbatch, the jobs)."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.started_munged = False

    def start(self, cpus_per_node: int = 2) -> "SlurmCluster":
        self._start_munged()
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "log", *(f"spool-{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        d = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus_per_node} "
            "RealMemory=1000 State=UNKNOWN"
            for n in NODES
        )
        self.conf.write_text(f"""ClusterName=megatron_llm_test_{os.getpid()}
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
MinJobAge=4
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._run("/usr/sbin/slurmctld", "-f", str(self.conf))
        for n in NODES:
            self._run("/usr/sbin/slurmd", "-f", str(self.conf), "-N", n)
        deadline = time.monotonic() + 60
        while self.idle_nodes() < len(NODES):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Slurm nodes did not come up; see {d / 'log'}")
            time.sleep(0.5)
        return self

    def idle_nodes(self) -> int:
        out = subprocess.run(["sinfo", "-h", "-t", "idle", "-o", "%D"], env=self.env, capture_output=True, text=True)
        return sum(int(x) for x in out.stdout.split()) if out.returncode == 0 else 0

    def stop(self) -> None:
        # A munged that was running before is left alone: it is someone else's.
        pid_files = [self.root / f"slurmd-{n}.pid" for n in NODES] + [self.root / "slurmctld.pid"]
        _stop(pid_files + ([MUNGED_PID] if self.started_munged else []))

    def _run(self, *cmd: str) -> None:
        subprocess.run(cmd, env=self.env, check=True, capture_output=True)

    def _start_munged(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # already running
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "755", "/run/munge"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True)
        self.started_munged = True


def _stop(pid_files: list[Path], timeout: float = 10) -> None:
    """SIGTERM to the daemons named by the pid files, all at once; SIGKILL to those still there later."""
    pids = []
    for path in pid_files:
        try:
            pids.append(int(path.read_text().strip()))
            os.kill(pids[-1], signal.SIGTERM)
        except (OSError, ValueError):
            continue
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
