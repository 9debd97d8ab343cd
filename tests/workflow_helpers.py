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

# The demo at test size (a few dozen images, 32 px, a tiny generator, random-weight stand-ins for the
# feature networks): the overlay CI and the catalog's `--configfile .test/config/config.yaml` use.
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"


def write_config(workdir: Path, overrides: dict | None = None) -> Path:
    """The repository's config/config.yaml with the test overlay (.test/config/config.yaml) and
    ``overrides`` merged in, written whole to ``workdir/config.yaml``."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for extra in (yaml.safe_load(TEST_CONFIG.read_text()), overrides or {}):
        _merge(cfg, extra)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


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
