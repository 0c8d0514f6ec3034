"""Sweeps on a cluster: Hydra's submitit launcher (hydra-submitit-launcher) runs one job per sweep
shard. Here its local executor runs the shards as separate processes reading a cache in an object
store (tests/s3_server.py), and the members equal, bit for bit, one unsharded sweep of a local copy.
conf/hydra/launcher/slurm.yaml (the Slurm preset) is checked to compose into submitit's Slurm launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.cache_factory import sparse_feature_activations, write_cache
from tests.s3_server import s3_fixture
from tests.test_train_loop import make_cfg
from train.cli import run_training

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
GRID = "sweep.grid.sae.sparsity_coeff=[0.001,0.01,0.1]"
MEMBERS = ("sparsity_coeff=0.001", "sparsity_coeff=0.01", "sparsity_coeff=0.1")

s3 = s3_fixture()


@pytest.fixture(autouse=True)
def plugin():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed: pip install -e '.[slurm]'")


def test_submitit_shards_from_the_store_equal_one_local_sweep(s3, tmp_path, monkeypatch):
    x, _, _ = sparse_feature_activations(16 * 48, 8, 12, 2, seed=1)
    local = write_cache(tmp_path / "cache", {(3, "mlp_out"): x}, context_length=16, chunk_rows=32)
    url = s3.upload(local, "cluster")
    run_training(make_cfg(local, tmp_path / "one", GRID, sweep=True), single=False)

    env = {**os.environ, **s3.env()}
    done = subprocess.run(
        [sys.executable, "-m", "train.sweep", f"cache={url}", "layer=3", "sublayer=mlp_out",
         f"run_dir={tmp_path / 'sharded'}", "train.progress=false", "train.tensorboard=false",
         "loader.batch_size=32", "loader.buffer_tokens=64", "loader.num_readers=2", "train.total_tokens=384",
         "train.log_every_steps=4", "train.checkpoint_every_steps=4", "sae.width=16", "optim.lr=1e-2",
         "optim.lr_warmup_steps=3", "optim.lambda_warmup_steps=5", "loader.heldout_fraction=0.1", GRID,
         "hydra.mode=MULTIRUN", "hydra/launcher=submitit_local", "sweep.num_shards=2", "sweep.shard=0,1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Submitit 'local' sweep" in done.stdout + done.stderr
    jobs = sorted((tmp_path / "sharded" / ".submitit").glob("*/*_result.pkl"))
    assert len(jobs) == 2                                       # one submitit job per shard
    for name in MEMBERS:
        assert ((tmp_path / "sharded" / name / "sae.safetensors").read_bytes()
                == (tmp_path / "one" / name / "sae.safetensors").read_bytes()), name


def test_slurm_preset_composes_into_submitits_slurm_launcher(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train_sweep", overrides=["cache=x", "layer=3", "sublayer=mlp_out", f"run_dir={tmp_path}",
                                                "hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.max_num_timeout > 0            # time limits and preemption requeue; the run resumes
