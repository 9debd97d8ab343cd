"""Run the Snakemake workflow of this repository on a temporary working directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# The demo at test size: a few dozen images, 32 px, no network models.
TINY = {
    "demo": {"seed": 1, "width": 96, "height": 64, "train_per_subspecies": 2, "test_per_subspecies": 1,
             "train_hybrids_per_type": 3, "test_hybrids_per_type": 1, "jpeg_quality": 90},
    "preprocess": {"resolution": 32, "edge_model": "canny", "depth_source": "dataset", "workers": 0,
                   "batch_size": 8, "shard_size": 16, "device": "cpu"},
}


def write_config(workdir: Path, overrides: dict | None = None) -> Path:
    """The repository's config/config.yaml with ``TINY`` and ``overrides`` merged in."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for extra in (TINY, overrides or {}):
        for section, values in extra.items():
            if isinstance(values, dict) and isinstance(cfg.get(section), dict):
                cfg[section].update(values)
            else:
                cfg[section] = values
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def scheduled(workdir: Path, *args: str) -> dict[str, int]:
    """Rule -> job count that a dry run would execute (empty when nothing is to be done)."""
    proc = snakemake(workdir, "-n", "--quiet", "rules", *args)
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("job", 1)[1].split("total", 1)[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.M)}
