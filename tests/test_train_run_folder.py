"""`make train RUN=<a folder of other files>` is refused before anything is written there; a run or
sweep folder of ours (to resume), an empty one or a new one is accepted."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cache_factory import sparse_feature_activations, write_cache
from tests.harvest_util import tree_digest
from tests.test_train_loop import make_cfg
from train.cli import run_training
from train.run_folder import ForeignRunFolder, check_run_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    x, _, _ = sparse_feature_activations(16 * 8, 8, 12, 2, seed=1)
    return write_cache(tmp_path_factory.mktemp("c") / "cache", {(3, "mlp_out"): x}, context_length=16,
                       chunk_rows=32)


@pytest.fixture
def foreign(tmp_path):
    folder = tmp_path / "papers"
    (folder / "drafts").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "drafts" / "a.tex").write_text("\\section{}\n")
    return folder


def cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_foreign_folder_is_refused_in_process(cache, foreign):
    before = tree_digest(foreign)
    with pytest.raises(ForeignRunFolder, match=r"holds files that no training wrote \(drafts/a\.tex, notes\.txt\)"):
        run_training(make_cfg(cache, foreign, "train.total_tokens=64"), single=True)
    assert tree_digest(foreign) == before


def test_cli_refuses_before_hydra_writes_anything(cache, foreign):
    before = sorted(p.relative_to(foreign) for p in foreign.rglob("*"))
    done = cli("train", f"cache={cache}", "layer=3", "sublayer=mlp_out", f"run_dir={foreign}",
               "train.total_tokens=64", "loader.batch_size=32", "sae.width=16", "train.progress=false")
    assert done.returncode == 1, done.stderr
    assert "error: run_dir=" in done.stderr and "notes.txt" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.relative_to(foreign) for p in foreign.rglob("*")) == before      # no .hydra/, no log


def test_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ForeignRunFolder, match="is a file"):
        check_run_folder(tmp_path / "run")


def test_own_run_and_sweep_folders_new_and_empty_ones_are_accepted(cache, tmp_path):
    run = tmp_path / "run"
    run_training(make_cfg(cache, run, "train.total_tokens=64"), single=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("{}\n")       # what Hydra adds
    (run / "__main__.log").write_text("")
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text("{}")          # what `make eval` adds
    check_run_folder(run)
    again = cli("train", f"cache={cache}", "layer=3", "sublayer=mlp_out", f"run_dir={run}",
                "train.total_tokens=64", "loader.batch_size=32", "sae.width=16", "train.progress=false",
                "train.resume=false")
    assert again.returncode == 0 and "[train] wrote" in again.stdout, again.stderr
    sweep = tmp_path / "sweep"
    run_training(make_cfg(cache, sweep, "train.total_tokens=64", "sweep.grid.sae.sparsity_coeff=[0.001,0.01]",
                          sweep=True), single=False)
    check_run_folder(sweep)                                   # member folders are run folders
    (tmp_path / "empty").mkdir()
    check_run_folder(tmp_path / "empty")
    check_run_folder(tmp_path / "absent")
    (sweep / "sparsity_coeff=0.01" / "stray.csv").write_text("1,2\n")
    with pytest.raises(ForeignRunFolder, match=r"sparsity_coeff=0\.01/stray\.csv"):
        check_run_folder(sweep)
