"""`make ablation` on a synthetic cache with known features: one sweep, a table, a frontier plot."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.cache_factory import sparse_feature_activations, write_cache

REPO = Path(__file__).resolve().parents[1]
ARMS = ("arms=[{preset:jumprelu,levels:[1e-3,1e-2]},{preset:jumprelu_l1,levels:[3e-3,3e-2]},"
        "{preset:relu,levels:[3e-3,3e-2]},{preset:topk,knob:k,levels:[3,8]},{preset:gated,levels:[3e-3,3e-2]}]")
SMALL = ("budgets.small=['train.total_tokens=30000','loader.batch_size=256','loader.buffer_tokens=2048',"
         "'optim.lr=3e-3','optim.lr_warmup_steps=5','optim.lambda_warmup_steps=20','train.checkpoint_every_steps=0',"
         "'train.log_every_steps=10','train.tensorboard=false','train.progress=false','loader.heldout_fraction=0.1',"
         "'sae.width=32']")


def test_ablation_command_trains_one_sweep_and_reports(tmp_path):
    x, features, _ = sparse_feature_activations(128 * 32, 16, n_features=24, active=2.0, seed=0, noise=0.01)
    cache = write_cache(tmp_path / "cache", {(0, "mlp_out"): x}, context_length=32, chunk_rows=256)
    np.save(tmp_path / "features.npy", features)
    run_dir = tmp_path / "ablation"
    done = subprocess.run([sys.executable, "-m", "evaluate.ablation", f"cache={cache}", "layer=0",
                           "sublayer=mlp_out", f"run_dir={run_dir}", ARMS, SMALL, "eval.progress=false",
                           f"eval.true_features={tmp_path / 'features.npy'}"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "budget=small" in done.stdout
    # One sweep: every member in its own run folder, trained together (one lock-step checkpoint).
    members = sorted(p.name for p in run_dir.iterdir() if (p / "sae.json").is_file())
    assert len(members) == 10
    assert (run_dir / "checkpoint.pt").is_file()
    archs = {json.loads((run_dir / m / "sae.json").read_text())["architecture"] for m in members}
    assert archs == {"jumprelu", "relu", "topk", "gated"}
    losses = {json.loads((run_dir / m / "sae.json").read_text())["hyperparameters"].get("sparsity_loss")
              for m in members if m.startswith("jumprelu")}
    assert losses == {"l0", "l1"}

    folder = run_dir / "eval"
    for name in ("ablation_frontier.png", "frontier_l0_fvu.png", "firing_frequency.png", "training_curves.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG", name
    table = (folder / "table.csv").read_text().splitlines()
    assert len(table) == 1 + 10
    report = (folder / "ablation.md").read_text()
    assert "the L0 penalty (both JumpReLU)" in report and "the JumpReLU activation (both L1)" in report
    result = json.loads((folder / "ablation.json").read_text())
    labels = {r["architecture"] for r in result["rows"]}
    assert labels == {"jumprelu+l0", "jumprelu+l1", "relu+l1", "topk", "gated+l1"}
    topk = sorted((r for r in result["rows"] if r["architecture"] == "topk"), key=lambda r: r["l0"])
    assert [round(r["l0"]) for r in topk] == [3, 8]        # TopK's L0 is its k, on held-out tokens too
    assert topk[0]["fvu"] > topk[1]["fvu"]                  # more latents, better reconstruction
    # Known features: the trained decoders point at them far better than random directions do.
    rng = np.random.default_rng(1)
    random_dirs = rng.standard_normal((32, 16))
    cos = features @ (random_dirs / np.linalg.norm(random_dirs, axis=1, keepdims=True)).T
    chance = cos.max(1).mean()
    assert all(r["feature_mmcs"] is not None for r in result["rows"])
    assert max(r["feature_mmcs"] for r in result["rows"]) > chance + 0.2


def test_verdict_uses_differences_and_relative_only_against_positive_values():
    from evaluate.ablation import _verdict
    entry = {"question": "q", "a": "x", "b": "y", "metric": "delta_ce",
             "points": [{"l0": 10.0, "x": -0.002, "y": -0.001, "difference": -0.001, "relative": None},
                        {"l0": 20.0, "x": 0.001, "y": 0.003, "difference": -0.002, "relative": -2 / 3}]}
    text = _verdict(entry)
    assert "x minus y is -0.0015 on average" in text and "%" not in text and text.endswith("x is better")
    entry["points"] = [{"l0": 10.0, "x": 0.2, "y": 0.1, "difference": 0.1, "relative": 1.0}]
    assert "+0.1 (+100.0%)" in _verdict(entry) and _verdict(entry).endswith("y is better")
