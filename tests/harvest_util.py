"""Helpers for the harvest tests: compose a config, run a harvest in or out of process, digest a
cache folder byte for byte."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Small and quick: 8 chunks of 8 sequences of 64 tokens, every sublayer of the tiny model's 4 layers.
SMALL = ["n_tokens=4096", "chunk_tokens=512", "context_length=64", "batch_tokens=256", "progress=false"]


def harvest_config(overrides: list[str]):
    from harvest.config import compose_harvest_config
    return compose_harvest_config(overrides)


def harvest_inprocess(cache: Path, extra: list[str] = ()) -> dict:
    from harvest.run import run_harvest
    return run_harvest(harvest_config([f"cache={cache}", *SMALL, *extra]))


def harvest_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def harvest_cli(cache: Path, extra: list[str] = (), nproc: int = 1, timeout: int = 600,
                env: dict | None = None) -> subprocess.CompletedProcess:
    args = [f"cache={cache}", *SMALL, *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "harvest", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--num_processes", str(nproc), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "harvest", *args]
    return subprocess.run(cmd, cwd=REPO, env=env or harvest_env(), capture_output=True, text=True, timeout=timeout)


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `path`."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(path).rglob("*")) if f.is_file()}
