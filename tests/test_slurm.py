"""The demo workflow through profiles/slurm on a real one-node SLURM cluster (tests/slurm_cluster.py).

Needs Debian's slurm packages (installed on the fly when running as root with apt-get) and takes
about a minute; it skips with the reason otherwise.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.slurm_cluster import SlurmCluster, ensure_slurm, slurm_cluster, slurm_unavailable
from tests.workflow_helpers import REPO, snakemake, write_config

_reason = slurm_unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

RULES = {"demo_data", "ingest", "preprocess", "train", "generate", "evaluate", "classify", "report"}
PROFILE = REPO / "profiles" / "slurm" / "config.v8+.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c
    for name, proc in c.procs.items():
        assert proc.poll() is not None, f"{name} (pid {proc.pid}) is still running"


class QueueWatcher(threading.Thread):
    """Polls squeue while the workflow runs: job id -> (comment, every state seen)."""

    def __init__(self, cluster: SlurmCluster, interval: float = 0.5):
        super().__init__(daemon=True)
        self.cluster, self.interval = cluster, interval
        self.seen: dict[str, tuple[str, set[str]]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            try:
                out = self.cluster.run("squeue", "-h", "--states=all", "-p", self.cluster.partition,
                                       "-o", "%i|%k|%T", timeout=10)
            except (RuntimeError, subprocess.TimeoutExpired):
                continue
            for line in out.splitlines():
                job, comment, state = line.strip().split("|")
                self.seen.setdefault(job, (comment, set()))[1].add(state)


def _failure(what: str | subprocess.CompletedProcess, cluster: SlurmCluster, workdir: Path) -> str:
    """Snakemake's output, SLURM's job logs and the daemons' log tails, for a failure message."""
    if isinstance(what, subprocess.CompletedProcess):
        what = f"snakemake exited {what.returncode}\n{what.stdout[-3000:]}\n{what.stderr[-5000:]}"
    parts = [what]
    for log in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log")):
        parts.append(f"--- {log.relative_to(workdir)}\n" + log.read_text(errors="replace")[-2000:])
    parts.append(cluster.log_tails())
    return "\n".join(parts)


def test_demo_workflow_runs_through_the_slurm_profile(cluster, tmp_path, monkeypatch):
    for name in ("SLURM_CONF", "PATH"):
        monkeypatch.setenv(name, cluster.env[name])
    monkeypatch.setenv("HYBRID_OFFLINE", "1")
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir)
    watcher = QueueWatcher(cluster)
    watcher.start()
    try:
        proc = snakemake(
            workdir,
            "--workflow-profile", str(PROFILE.parent),
            # The README's way to name the partition; the per-rule sizes of the profile stay.
            "--default-resources", f"slurm_partition={cluster.partition}",
            # No accounting here, so no sacct: squeue answers while slurmctld keeps finished
            # jobs (MinJobAge=600 s); poll every second instead of the default 40 s.
            "--slurm-status-command", "squeue",
            "--slurm-init-seconds-before-status-checks", "1",
            check=False, timeout=900,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(_failure(f"snakemake did not finish within {e.timeout} s", cluster, workdir))
    finally:
        watcher.done.set()
        watcher.join(15)
    assert proc.returncode == 0, _failure(proc, cluster, workdir)

    # Each rule ran as exactly one SLURM job in the test partition, seen by squeue while queued
    # or running, and jobcomp (the sacct stand-in) recorded it COMPLETED.
    rules = {job: comment.removeprefix("rule_") for job, (comment, _) in watcher.seen.items()}
    assert sorted(rules.values()) == sorted(RULES), (watcher.seen, _failure(proc, cluster, workdir))
    finished = {r["JobId"]: r for r in cluster.jobcomp()}
    assert set(finished) == set(rules), (finished, watcher.seen)
    for job, record in finished.items():
        assert record["JobState"] == "COMPLETED", (rules[job], record)
        assert record["Partition"] == cluster.partition, (rules[job], record)

    # The profile's per-rule sizes (first attempt) reached sbatch: memory, time limit, GPU.
    profile = yaml.safe_load(PROFILE.read_text())["set-resources"]
    jobs = {rules[j["JobId"]]: j for j in cluster.jobs() if j["JobId"] in rules}
    for job, record in finished.items():
        rule = rules[job]
        want = {k: eval(str(v), {"attempt": 1}) for k, v in profile[rule].items()}  # as Snakemake does
        assert jobs[rule]["MinMemoryNode"] == f"{want['mem_mb']}M", (rule, jobs[rule])
        assert int(record["TimeLimit"]) == want["runtime"], (rule, record)  # minutes
        gpus = jobs[rule].get("TresPerJob", "(null)")
        assert gpus == ("gres:gpu:1" if want.get("gpu") else "(null)"), (rule, jobs[rule])
    assert profile["preprocess"]["gpu"] == 1

    manifest = pd.read_parquet(workdir / "results" / "manifest.parquet")
    index = pd.read_parquet(workdir / "results" / "shards" / "index.parquet")
    assert len(manifest) > 0 and set(index["sample_id"]) == set(manifest["sample_id"])
    assert list((workdir / "results" / "shards").glob("shard-*.h5"))
    assert (workdir / "results" / "report" / "index.html").exists()
