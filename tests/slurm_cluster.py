"""A real one-node SLURM cluster in a temporary folder, for tests (a helper, not a test module).

`slurm_cluster(root)` starts munged, slurmctld and slurmd from Debian's packages with every
state, spool, log, pid and socket file under ``root``, waits until the node is idle, yields a
`SlurmCluster` whose ``env`` points clients (sbatch, squeue, snakemake) at it, and stops the
daemons by PID on exit. Accounting is off; finished jobs are recorded by jobcomp/filetxt
(``root/jobcomp.txt``, one line per job with its final state), which stands in for sacct.

Inside a job, snakemake-executor-plugin-slurm-jobstep starts the rule with `srun` after
dropping every SLURM_* variable, SLURM_CONF included; a real cluster's srun then reads
/etc/slurm/slurm.conf, this one would find nothing. So ``root/bin/srun``, first on the PATH
that jobs inherit, is a two-line shim that puts SLURM_CONF back and runs the real srun.

The node advertises one GPU backed by /dev/null (Slurm 22.05 drops GPUs without a device
file) so that `--gpus=1` jobs schedule; the job sees CUDA_VISIBLE_DEVICES=0 and a CPU build of
torch simply finds no CUDA.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
PARTITION = "hybridtest"
# Memory is not enforced here (no cgroups), so the node claims at least this much: enough for
# what profiles/slurm asks of every rule on its first attempt.
MIN_NODE_MEMORY_MB = 65536


def slurm_unavailable() -> str | None:
    """Why a SLURM cluster cannot be started here, or None (cheap: no installation)."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


def ensure_slurm(timeout: float = 300) -> str | None:
    """Install Debian's SLURM and munge when missing (root + apt-get); the reason on failure."""
    reason = slurm_unavailable()
    if reason or all(shutil.which(b) for b in BINARIES):
        return reason
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    # Keep the packages' init scripts from starting system daemons (the Docker convention).
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:  # stale or missing package lists: refresh once, then retry
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout)
            proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"apt-get did not finish within {timeout:.0f} s"
    finally:
        if own_policy:
            policy.unlink()
    if proc.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-500:]}"
    missing = [b for b in BINARIES if not shutil.which(b)]
    return f"installed, but {missing} are still not on PATH" if missing else None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once, so the ports differ
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return kb // 1024


def parse_records(text: str) -> list[dict[str, str]]:
    """``Key=Value Key=Value`` lines (jobcomp/filetxt, ``scontrol -o``) as dicts."""
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if "=" in line]


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    partition: str = PARTITION
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, timeout: float = 30) -> str:
        """A SLURM client command against this cluster; its stdout."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def jobcomp(self) -> list[dict[str, str]]:
        """Every finished job with its final JobState (the accounting-free sacct)."""
        path = self.root / "jobcomp.txt"
        return parse_records(path.read_text()) if path.exists() else []

    def jobs(self) -> list[dict[str, str]]:
        """`scontrol show job` of every job slurmctld still remembers (MinJobAge after the end)."""
        return parse_records(self.run("scontrol", "show", "job", "-o"))

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of each daemon's log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)


def _write_config(root: Path, host: str, munge_socket: Path) -> Path:
    cpus = os.cpu_count() or 1
    memory = max(_memory_mb(), MIN_NODE_MEMORY_MB)
    ctld_port, slurmd_port = _free_ports(2)
    conf = f"""\
ClusterName=hybridtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
ReturnToService=2
MinJobAge=600
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# The node below is declared, not probed: trust it (memory is not enforced without cgroups).
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:1 State=UNKNOWN
# Not the default partition: a job reaches it only when the partition is passed on.
PartitionName={PARTITION} Nodes={host} Default=NO MaxTime=INFINITE State=UP
"""
    (root / "slurm.conf").write_text(conf)
    (root / "gres.conf").write_text(f"NodeName={host} Name=gpu Count=1 File=/dev/null\n")
    return root / "slurm.conf"


def _start(cluster: SlurmCluster, name: str, cmd: list[str]) -> None:
    out = open(cluster.root / "log" / f"{name}.out", "w")
    cluster.procs[name] = subprocess.Popen(
        cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    out.close()


def _wait(what: str, ready, cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                                   f"{cluster.log_tails()}")
        try:
            if ready():
                return
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{cluster.log_tails()}")


def _stop(cluster: SlurmCluster, timeout: float = 20) -> None:
    """Cancel what is left, then stop slurmd, slurmctld and munged (in that order) by PID."""
    if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
        subprocess.run(["scancel", "--partition", cluster.partition], env=cluster.env,
                       capture_output=True, timeout=30)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@contextmanager
def slurm_cluster(root: Path, timeout: float = 60) -> Iterator[SlurmCluster]:
    """Start a one-node cluster under ``root``; stop every daemon on exit, whatever happened."""
    root = Path(root)
    for d in ("munge", "state", "spool", "log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = root / "munge" / "munge.sock"
    host = socket.gethostname().split(".")[0]
    conf = _write_config(root, host, munge_socket)
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "srun"
    shim.write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {shutil.which("srun")} "$@"\n')
    shim.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    cluster = SlurmCluster(root, {**os.environ, "SLURM_CONF": str(conf), "PATH": path})
    try:
        _start(cluster, "munged", [
            "munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
            f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed"])
        _wait("the munge socket", munge_socket.exists, cluster, timeout)
        _start(cluster, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
        _start(cluster, "slurmd", ["slurmd", "-D", "-f", str(conf), "-N", host])

        def idle() -> bool:
            return cluster.run("sinfo", "-h", "-N", "-p", PARTITION, "-o", "%t").strip() == "idle"

        _wait(f"node {host} to be idle in sinfo", idle, cluster, timeout)
        yield cluster
    finally:
        _stop(cluster)
