"""The training loop end to end on small caches: run folder, resume bit for bit, sweeps, bad input."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

import train.config  # noqa: F401
from tests.cache_factory import sparse_feature_activations, write_cache
from train.cache_reader import ActivationArray, CacheError
from train.cli import run_training
from train.loop import TrainingDiverged
from train.member import Member
from train.run_folder import load_sae

CONF = str(Path(__file__).resolve().parent.parent / "conf")
ROOT = Path(__file__).resolve().parent.parent


def make_cfg(cache, run_dir, *overrides, sweep=False):
    base = [f"cache={cache}", "layer=3", "sublayer=mlp_out", f"run_dir={run_dir}", "train.progress=false",
            "train.tensorboard=false", "loader.batch_size=32", "loader.buffer_tokens=64", "loader.num_readers=2",
            "train.total_tokens=384", "train.log_every_steps=4", "train.checkpoint_every_steps=4",
            "sae.width=16", "optim.lr=1e-2", "optim.lr_warmup_steps=3", "optim.lambda_warmup_steps=5",
            "loader.heldout_fraction=0.1"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train_sweep" if sweep else "train", overrides=base + list(overrides))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    x, _, _ = sparse_feature_activations(16 * 48, 8, 12, 2, seed=1)
    return write_cache(tmp_path_factory.mktemp("c") / "cache", {(3, "mlp_out"): x}, context_length=16,
                       chunk_rows=32, incomplete=[4])


def weights_bytes(run_dir):
    return (Path(run_dir) / "sae.safetensors").read_bytes()


def test_run_folder_metrics_and_load(cache, tmp_path, capsys):
    cfg = make_cfg(cache, tmp_path / "run", "train.tensorboard=true")
    final = run_training(cfg, single=True)
    assert "training on the 23 complete chunks of 24" in capsys.readouterr().out
    run = tmp_path / "run"
    meta = json.loads((run / "sae.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "model", "layer", "sublayer", "cache", "normalisation",
                "hyperparameters_train", "final_metrics", "heldout"):
        assert key in meta, key
    assert meta["architecture"] == "jumprelu" and meta["d_in"] == 8 and meta["d_sae"] == 16
    assert meta["layer"] == 3 and meta["sublayer"] == "mlp_out" and meta["model"]["id"] == "synthetic"
    assert meta["training"]["steps"] == 12 and meta["heldout"]["count"] == 5     # round(0.1 * 48)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [4, 8, 12]
    for key in ("loss", "mse", "fvu", "l0", "dead", "dense", "threshold_mean", "threshold_min", "tokens_per_s"):
        assert key in lines[-1], key
    assert final["jumprelu"] == {k: v for k, v in lines[-1].items() if k != "step"} == meta["final_metrics"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    sae, meta2 = load_sae(run)
    assert meta2 == meta and sae.architecture == "jumprelu"
    assert set(meta["tensors"]) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    # raw units: the saved SAE on raw x equals scale * (trained SAE on x / scale), i.e. its loss is scale^2 x
    x = torch.randn(5, 8) * meta["normalisation"]["scale"]
    assert sae(x).shape == (5, 8) and sae.encode(x).shape == (5, 16)
    assert torch.all(sae.threshold > 0)


def test_resume_after_crash_equals_uninterrupted_bit_for_bit(cache, tmp_path, monkeypatch):
    run_training(make_cfg(cache, tmp_path / "full"), single=True)

    real_step, calls = Member.step, {"n": 0}

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:                      # dies inside step 7, after the checkpoint at step 4
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(Member, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run_training(make_cfg(cache, tmp_path / "crash"), single=True)
    monkeypatch.setattr(Member, "step", real_step)
    assert not (tmp_path / "crash" / "sae.safetensors").exists()
    assert torch.load(tmp_path / "crash" / "checkpoint.pt", weights_only=False)["step"] == 4
    run_training(make_cfg(cache, tmp_path / "crash"), single=True)     # the same command resumes
    assert weights_bytes(tmp_path / "crash") == weights_bytes(tmp_path / "full")
    steps = [json.loads(l)["step"] for l in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]


def test_max_steps_this_run_slices_resume_bit_for_bit(cache, tmp_path):
    run_training(make_cfg(cache, tmp_path / "full", "train.checkpoint_every_steps=0"), single=True)
    sliced = tmp_path / "sliced"
    for _ in range(2):
        assert run_training(make_cfg(cache, sliced, "train.max_steps_this_run=5",
                                     "train.checkpoint_every_steps=0"), single=True) is None
    assert run_training(make_cfg(cache, sliced, "train.max_steps_this_run=5",
                                 "train.checkpoint_every_steps=0"), single=True) is not None
    assert weights_bytes(sliced) == weights_bytes(tmp_path / "full")


def test_sweep_members_equal_single_runs_and_read_the_cache_once(cache, tmp_path, monkeypatch):
    reads = {"n": 0}
    real_read = ActivationArray.read_chunk_into

    def counting_read(*a):
        reads["n"] += 1
        return real_read(*a)

    monkeypatch.setattr(ActivationArray, "read_chunk_into", counting_read)
    run_training(make_cfg(cache, tmp_path / "single", "sae.sparsity_coeff=0.02"), single=True)
    single_reads, reads["n"] = reads["n"], 0
    final = run_training(make_cfg(cache, tmp_path / "sweep", "sweep.grid.sae.sparsity_coeff=[0.001,0.02,0.1]",
                                  sweep=True), single=False)
    # K=3 members, one read of the cache: the same chunks as one run, give or take the background
    # read-ahead at the moment training ends (up to two windows of 2 chunks)
    assert abs(reads["n"] - single_reads) <= 4 and reads["n"] < 1.5 * single_reads, (reads["n"], single_reads)
    assert sorted(final) == ["sparsity_coeff=0.001", "sparsity_coeff=0.02", "sparsity_coeff=0.1"]
    member = tmp_path / "sweep" / "sparsity_coeff=0.02"
    assert weights_bytes(member) == weights_bytes(tmp_path / "single")
    assert weights_bytes(member) != weights_bytes(tmp_path / "sweep" / "sparsity_coeff=0.1")
    assert json.loads((member / "sae.json").read_text())["hyperparameters_train"]["sae"]["sparsity_coeff"] == 0.02


def test_architecture_sweep_uses_presets(cache, tmp_path):
    members = "[{preset:jumprelu},{preset:jumprelu_l1},{preset:relu},{preset:topk,sae:{k:4}},{preset:gated}]"
    final = run_training(make_cfg(cache, tmp_path / "abl", "sweep=ablation", f"sweep.members={members}",
                                  "train.total_tokens=128", sweep=True), single=False)
    assert sorted(final) == ["gated", "jumprelu", "jumprelu_l1", "relu", "topk"]
    for name in final:
        sae, meta = load_sae(tmp_path / "abl" / name)
        assert sae.d_sae == 16 and sae(torch.randn(3, 8)).shape == (3, 8)
        assert meta["hyperparameters_train"]["sae"]["architecture"] == sae.architecture
    assert load_sae(tmp_path / "abl" / "topk")[0].k == 4
    assert load_sae(tmp_path / "abl" / "jumprelu_l1")[1]["hyperparameters"]["sparsity_loss"] == "l1"
    assert load_sae(tmp_path / "abl" / "relu")[1]["hyperparameters_train"]["sae"]["sparsity_coeff"] == 3e-3


@pytest.mark.parametrize("unit", ["median_norm", "sqrt_d_median_norm"])
def test_constants_units_are_the_constants_scaled_by_the_unit(cache, tmp_path, unit):
    """sae.constants_unit=median_norm trains exactly as the rms unit with theta_init,
    bandwidth, threshold_lr and optim.bias_lr_scale multiplied by the median token norm (normalised)
    that sae.json records, and optim.grad_clip_norm by its square; sqrt_d_median_norm (the constants on
    data scaled to E||x||^2 = d_in) by that norm over sqrt(d_in), the clip by its square."""
    from train.members import sae_preset
    run_training(make_cfg(cache, tmp_path / "unit", f"sae.constants_unit={unit}"), single=True)
    meta = json.loads((tmp_path / "unit" / "sae.json").read_text())
    r = meta["normalisation"]["median_norm"]
    assert 0.3 < r < 1.2 and r != 1.0
    # kept in the checkpoint: a resumed run keeps the unit it started with
    assert torch.load(tmp_path / "unit" / "checkpoint.pt", weights_only=False)["median_norm"] == r
    factor = r / math.sqrt(meta["d_in"]) if unit.startswith("sqrt_d") else r
    sae, optim = meta["hyperparameters_train"]["sae"], meta["hyperparameters_train"]["optim"]
    assert sae["constants_unit"] == unit and sae["bandwidth"] == sae_preset("jumprelu").bandwidth   # as configured
    by_hand = [f"sae.{k}={sae[k] * factor!r}" for k in ("theta_init", "bandwidth", "threshold_lr")]
    by_hand += [f"optim.bias_lr_scale={optim['bias_lr_scale'] * factor!r}",
                f"optim.grad_clip_norm={optim['grad_clip_norm'] * factor * factor!r}"]
    run_training(make_cfg(cache, tmp_path / "by_hand", "sae.constants_unit=rms", *by_hand), single=True)
    assert weights_bytes(tmp_path / "unit") == weights_bytes(tmp_path / "by_hand")
    assert "median_norm" not in json.loads((tmp_path / "by_hand" / "sae.json").read_text())["normalisation"]
    if unit == "median_norm":
        run_training(make_cfg(cache, tmp_path / "rms", "sae.constants_unit=rms"), single=True)
        assert weights_bytes(tmp_path / "rms") != weights_bytes(tmp_path / "unit")
    with pytest.raises(ValueError, match="constants_unit='sqrt_n'; choose one of rms, median_norm, sqrt_d"):
        run_training(make_cfg(cache, tmp_path / "bad", "sae.constants_unit=sqrt_n"), single=True)


def test_members_set_their_own_dead_window_and_nothing_else_of_train(cache, tmp_path, capsys):
    """A member's own train.dead_window_tokens: the dead latents its pre-activation loss pulls (thresholds
    start above every pre-activation; the sweep's window of 1e7 tokens sees none dead in this run)."""
    members = ("[{name:short_window,sae:{pre_act_coeff:1e-3},train:{dead_window_tokens:64}},"
               "{name:sweep_window,sae:{pre_act_coeff:1e-3}},{name:no_pre_act,sae:{pre_act_coeff:0}}]")
    run_training(make_cfg(cache, tmp_path / "s", "sweep=none", f"sweep.members={members}", "sae.theta_init=3",
                          sweep=True), single=False)
    said = capsys.readouterr().out
    assert "sweep_window: its loss on dead latents" in said and "will never act" in said
    assert "short_window: its loss on dead latents" not in said and "no_pre_act: its" not in said
    train_of = {n: json.loads((tmp_path / "s" / n / "sae.json").read_text())["hyperparameters_train"]["train"]
                for n in ("short_window", "sweep_window")}
    assert train_of["short_window"]["dead_window_tokens"] == 64 and train_of["sweep_window"]["dead_window_tokens"] == 1e7
    assert weights_bytes(tmp_path / "s" / "sweep_window") == weights_bytes(tmp_path / "s" / "no_pre_act")
    assert weights_bytes(tmp_path / "s" / "short_window") != weights_bytes(tmp_path / "s" / "no_pre_act")
    with pytest.raises(ValueError, match="lock-step"):
        run_training(make_cfg(cache, tmp_path / "bad", "sweep=none", "sweep.members=[{train:{total_tokens:64}}]",
                              sweep=True),
                     single=False)
    assert not (tmp_path / "bad").exists()


def test_pre_activation_loss_stops_after_its_fraction_of_the_run(cache, tmp_path, monkeypatch, capsys):
    """sae.pre_act_until_fraction: thresholds start above every pre-activation, so every latent is dead
    after the first 64-token window; the loss on them acts in the first half of the 12 steps only, and a
    fraction of 0 trains what no pre-activation loss trains, byte for byte."""
    from train.sae.jumprelu import JumpReLUSAE
    args = ("sae.theta_init=3", "train.dead_window_tokens=64", "sae.pre_act_coeff=1e-3", "optim.resample_every_steps=0")
    real_loss, seen = JumpReLUSAE.training_loss, []

    def spying_loss(self, *a, dead=None, **k):
        seen.append(dead is not None and bool(dead.any()))
        return real_loss(self, *a, dead=dead, **k)

    monkeypatch.setattr(JumpReLUSAE, "training_loss", spying_loss)
    run_training(make_cfg(cache, tmp_path / "half", *args, "sae.pre_act_until_fraction=0.5"), single=True)
    assert seen == [False, False] + [True] * 4 + [False] * 6     # dead from step 2 (64 tokens), until step 6
    monkeypatch.setattr(JumpReLUSAE, "training_loss", real_loss)
    for name, extra in (("never", "sae.pre_act_until_fraction=0"), ("off", "sae.pre_act_coeff=0"),
                        ("always", "sae.pre_act_until_fraction=1")):
        run_training(make_cfg(cache, tmp_path / name, *args, extra), single=True)
    assert weights_bytes(tmp_path / "never") == weights_bytes(tmp_path / "off")
    assert len({weights_bytes(tmp_path / n) for n in ("half", "off", "always")}) == 3
    assert "never: its loss on dead latents" not in capsys.readouterr().out
    run_training(make_cfg(cache, tmp_path / "late", *args[1:], "sae.pre_act_until_fraction=0.1"), single=True)
    assert "the 64 of this run it acts in: it will never act" in capsys.readouterr().out
    with pytest.raises(ValueError, match="pre_act_until_fraction=1.5, in \\[0, 1\\]"):
        run_training(make_cfg(cache, tmp_path / "bad", "sae.pre_act_until_fraction=1.5"), single=True)


def test_resampling_on_schedule_and_resumed_bit_for_bit(cache, tmp_path, monkeypatch, capsys):
    """Thresholds start (and restart) above every pre-activation, so every latent is dead after each
    64-token window: resampling every 3 steps re-initialises all 16 at steps 3, 6, 9 and 12
    (train/resample.py). A crash after the checkpoint at step 4 and a resume give the uninterrupted
    run's weights byte for byte (the draw is seeded by the step)."""
    args = ("sae.theta_init=3", "train.dead_window_tokens=64", "optim.resample_every_steps=3",
            "optim.resample_until_fraction=1.0")
    run_training(make_cfg(cache, tmp_path / "full", *args), single=True)
    lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [l["resampled"] for l in lines] == [16, 32, 64]
    run_training(make_cfg(cache, tmp_path / "off", *args[:2], "optim.resample_every_steps=0"), single=True)
    off = [json.loads(l) for l in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert "resampled" not in off[-1] and weights_bytes(tmp_path / "off") != weights_bytes(tmp_path / "full")

    real_step, calls = Member.step, {"n": 0}

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(Member, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run_training(make_cfg(cache, tmp_path / "crash", *args), single=True)
    monkeypatch.setattr(Member, "step", real_step)
    run_training(make_cfg(cache, tmp_path / "crash", *args), single=True)
    assert weights_bytes(tmp_path / "crash") == weights_bytes(tmp_path / "full")
    capsys.readouterr()
    run_training(make_cfg(cache, tmp_path / "late", "train.dead_window_tokens=256", "optim.resample_every_steps=3",
                           "optim.resample_until_fraction=0.5"),
                 single=True)
    assert "none will be (set a shorter window)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="resample_until_fraction"):
        run_training(make_cfg(cache, tmp_path / "bad", "optim.resample_until_fraction=2"), single=True)


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    x, _, _ = sparse_feature_activations(16 * 48, 8, 12, 2, seed=2)
    x[32 * 20:32 * 21] = 1e30                 # chunk 20 overflows float32 once squared
    cache = write_cache(tmp_path / "c", {(3, "mlp_out"): x}, context_length=16, chunk_rows=32,
                        mean_squared_norm=2.0)
    with pytest.raises(TrainingDiverged) as e:
        run_training(make_cfg(cache, tmp_path / "run", "loader.heldout_fraction=0", "train.total_tokens=1536"),
                     single=True)
    msg = str(e.value)
    step = int(msg.split("non-finite loss at step ")[1].split(";")[0])
    assert "last good checkpoint" in msg or "no checkpoint" in msg
    if "last good checkpoint" in msg:
        good = int(msg.split("(step ")[1].split(")")[0])
        assert good <= step and torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == good
    assert not (tmp_path / "run" / "sae.safetensors").exists()


def test_incomplete_cache_refused_when_asked(cache, tmp_path):
    with pytest.raises(CacheError, match="23 of 24 chunks complete"):
        cfg = make_cfg(cache, tmp_path / "r", "loader.require_complete=true")
        run_training(cfg, single=True)


def test_config_typos_fail_at_composition(cache, tmp_path):
    with pytest.raises(ConfigCompositionException):
        make_cfg(cache, tmp_path / "r", "sae.sparsity_cof=1")
    with pytest.raises(MissingConfigException):
        make_cfg(cache, tmp_path / "r", "sae=jumprelo")
    with pytest.raises(ConfigCompositionException):
        make_cfg(cache, tmp_path / "r", "loader.batch_size=many")
    assert not (tmp_path / "r").exists()
    # values the schema cannot check, and inside sweep members, all before the cache is opened
    for override, match in (("sae.architecture=relux", "architecture"), ("kernel_backend=tritn", "kernel_backend"),
                            ("sublayer=mlp", "sublayer"), ("sae.sparsity_loss=l2", "sparsity_loss")):
        with pytest.raises(ValueError, match=match):
            run_training(make_cfg(tmp_path / "no_cache", tmp_path / "r", override), single=True)
    for members, error in (("[{preset:relu,sae:{sparsity_cof:1}}]", Exception), ("[{preset:relux}]", ValueError),
                           ("[{presett:relu}]", ValueError)):
        cfg = make_cfg(tmp_path / "no_cache", tmp_path / "r", f"sweep.members={members}", sweep=True)
        with pytest.raises(error, match="sparsity_cof|relux|presett"):
            run_training(cfg, single=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("base_preset", ["jumprelu", "topk", "jumprelu_paper"])
def test_member_preset_means_what_sae_equals_preset_means(tmp_path, base_preset):
    """A member's preset replaces the base's sae section as `sae=<preset>` would (fields the preset
    does not set take the schema's defaults, not the base preset's: the default's free decoder and
    own threshold lr never leak into the papers' recipe), and the command line's sae.* overrides
    (sae.width here) reach every member."""
    from train.config import SAEConfig
    from train.members import member_configs, sae_preset
    members = "[{preset:jumprelu_paper},{preset:jumprelu},{preset:topk,sae:{k:4}}]"
    cfg = make_cfg(tmp_path / "c", tmp_path / "r", f"sae={base_preset}", "sweep=ablation", f"sweep.members={members}",
                   sweep=True)
    got = dict(member_configs(cfg))
    paper, default, topk = got["jumprelu_paper"].sae, got["jumprelu"].sae, got["topk"].sae
    assert paper.theta_parametrisation == "raw" and paper.threshold_lr == SAEConfig.threshold_lr == 0
    own_lr = sae_preset("jumprelu").threshold_lr
    assert default.b_dec_to_input and default.decoder_norm == 0.1 and default.threshold_lr == own_lr > 0
    assert topk.architecture == "topk" and topk.k == 4 and paper.architecture == "jumprelu"
    assert {m.sae.width for m in got.values()} == {16}            # make_cfg's sae.width=16
    # the optim section likewise: the default's conf/optim/jumprelu.yaml, the schema's for the others,
    # and the command line's optim.* (make_cfg's lr and warm-ups) in every member
    from train.config import OptimConfig
    from omegaconf import OmegaConf
    recipe = OmegaConf.load(Path(CONF) / "optim" / "jumprelu.yaml")
    assert recipe and all(got["jumprelu"].optim[k] == v for k, v in recipe.items())
    for name in ("jumprelu_paper", "topk"):
        assert all(got[name].optim[k] == getattr(OptimConfig, k) for k in recipe), name
    assert {(m.optim.lr, m.optim.lr_warmup_steps, m.optim.lambda_warmup_steps) for m in got.values()} == {(1e-2, 3, 5)}
    assert dict(got[base_preset].optim) == dict(cfg.optim)         # a member of the base's preset is the base


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(CONF) / "sae").glob("*.yaml")))
def test_sweep_members_read_each_preset_as_hydra_composes_it(preset, tmp_path):
    """train.members reads conf/sae/<preset>.yaml and conf/optim/<preset>.yaml itself (for sweep members
    and the quality benchmark), presets that extend others (jumprelu_tanh_saelens) included: what it
    reads is what Hydra composes for `sae=<preset>`."""
    from train.members import optim_preset, sae_preset
    cfg = make_cfg(tmp_path / "c", tmp_path / "r", f"sae={preset}")
    for section, got in (("sae", sae_preset(preset)), ("optim", optim_preset(preset))):
        overridden = {"width", "lr", "lr_warmup_steps", "lambda_warmup_steps"}   # make_cfg's command line
        want = {k: v for k, v in cfg[section].items() if k not in overridden}
        assert {k: v for k, v in got.items() if k not in overridden} == want, section


def test_cli_runs_and_rejects_missing_layer(cache, tmp_path):
    args = [sys.executable, "-m", "train", f"cache={cache}", "sublayer=mlp_out", "train.progress=false",
            "train.total_tokens=64", "loader.batch_size=32", "sae.width=16", "train.tensorboard=false"]
    ok = subprocess.run(args + ["layer=3", f"run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "run" / "sae.safetensors").exists() and (tmp_path / "run" / ".hydra").exists()
    bad = subprocess.run(args + ["layer=7", f"run_dir={tmp_path / 'bad'}"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "It holds: layer_3/mlp_out" in bad.stderr


def test_sweep_shards_split_members_and_log_theta_trains(cache, tmp_path):
    grid = "sweep.grid.sae.sparsity_coeff=[0.001,0.01,0.1]"
    final = run_training(make_cfg(cache, tmp_path / "s", grid, "sweep.num_shards=2", "sweep.shard=1",
                                  "sae.theta_parametrisation=log", sweep=True), single=False)
    assert sorted(final) == ["sparsity_coeff=0.01"]                    # members 0, 2 belong to shard 0
    assert (tmp_path / "s" / "checkpoint_shard1of2.pt").exists()
    sae, meta = load_sae(tmp_path / "s" / "sparsity_coeff=0.01")
    assert meta["hyperparameters_train"]["sae"]["theta_parametrisation"] == "log"
    assert torch.all(sae.threshold > 0) and not torch.allclose(sae.threshold, torch.full_like(sae.threshold,
                                                                                            1e-3 * meta["normalisation"]["scale"]))


def test_cache_without_statistics_estimates_them(tmp_path, capsys):
    x, _, _ = sparse_feature_activations(16 * 48, 8, 12, 2, seed=3)
    cache = write_cache(tmp_path / "c", {(3, "mlp_out"): x}, context_length=16, chunk_rows=32,
                        write_mean_squared_norm=False)
    run_training(make_cfg(cache, tmp_path / "r", "train.total_tokens=64"), single=True)
    assert "no mean_squared_norm attribute; estimated" in capsys.readouterr().out
    meta = json.loads((tmp_path / "r" / "sae.json").read_text())
    rows = x.reshape(-1, 16, 8)[:, 1:].reshape(-1, 8).astype(np.float64)   # non-BOS rows
    # a sample of 16 of the 24 chunks (the exact estimator is checked in test_train_cache.py)
    assert meta["normalisation"]["mean_squared_norm"] == pytest.approx((rows ** 2).sum(1).mean(), rel=0.1)


def test_hydra_multirun_shards_one_sweep_across_processes(cache, tmp_path):
    """Sweeps too large for one process: one Hydra job per shard, each reading the same cache."""
    args = [sys.executable, "-m", "train.sweep", f"cache={cache}", "layer=3", "sublayer=mlp_out",
            f"run_dir={tmp_path / 'sweep'}", "train.progress=false", "train.tensorboard=false",
            "train.total_tokens=64", "loader.batch_size=32", "sae.width=16",
            "sweep.grid.sae.sparsity_coeff=[0.001,0.01,0.1]", "hydra.mode=MULTIRUN",
            "sweep.num_shards=2", "sweep.shard=0,1"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("sparsity_coeff=0.001", "sparsity_coeff=0.01", "sparsity_coeff=0.1"):
        assert (tmp_path / "sweep" / name / "sae.safetensors").exists(), name
    assert (tmp_path / "sweep" / "checkpoint_shard0of2.pt").exists()
    assert (tmp_path / "sweep" / "checkpoint_shard1of2.pt").exists()


def _small_cache(path, **kw):
    x, _, _ = sparse_feature_activations(16 * 48, 8, 12, 2, seed=1)
    return write_cache(path, {(3, "mlp_out"): x}, context_length=16, chunk_rows=32, **kw)


def test_resume_refuses_another_harvest_written_to_the_same_path(tmp_path):
    import zarr
    cache = _small_cache(tmp_path / "cache")
    run = tmp_path / "run"
    assert run_training(make_cfg(cache, run, "train.max_steps_this_run=5"), single=True) is None
    group = zarr.open_group(str(cache), mode="r+")
    group.attrs["model"] = {"id": "another-model", "revision": "test"}
    with pytest.raises(ValueError, match="cache_identity"):
        run_training(make_cfg(cache, run), single=True)


def test_resume_keeps_the_normalisation_it_started_with(tmp_path):
    """A run started while the cache had no statistics (a harvest still running) resumes with the
    scale it estimated, not the one the finished harvest wrote: same bits as never stopping."""
    import zarr
    cache = _small_cache(tmp_path / "cache", write_mean_squared_norm=False)
    run_training(make_cfg(cache, tmp_path / "full", "train.checkpoint_every_steps=0"), single=True)
    sliced = tmp_path / "sliced"
    assert run_training(make_cfg(cache, sliced, "train.max_steps_this_run=5",
                                 "train.checkpoint_every_steps=0"), single=True) is None
    zarr.open_group(str(cache), mode="r+")["layer_3/mlp_out"].attrs["mean_squared_norm"] = 123.0
    assert run_training(make_cfg(cache, sliced, "train.checkpoint_every_steps=0"), single=True) is not None
    assert weights_bytes(sliced) == weights_bytes(tmp_path / "full")
    meta = json.loads((sliced / "sae.json").read_text())
    assert meta["normalisation"]["mean_squared_norm"] != 123.0
