"""The SAE quality benchmark (quality/): its synthetic caches against direct computations, the same
batches for every trainer, and the benchmark and the threshold-pool study end to end on small settings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from quality.config import Arm, Budget, QualityConfig
from quality.synthetic import Regime, SyntheticSource, true_features, write_synthetic_cache


@pytest.mark.parametrize("regime", [
    Regime(name="u", d=16, n_features=64, active_per_token=3),
    Regime(name="p", d=16, n_features=64, active_per_token=3, frequency="power_law", power_law_exponent=1.2),
    Regime(name="g", d=16, n_features=64, active_per_token=3, correlation="groups", group_size=4, within_group=0.5),
    Regime(name="m", d=16, n_features=64, active_per_token=3, magnitude="lognormal", magnitude_spread=1.0),
], ids=lambda r: r.name)
def test_regimes_draw_what_they_say(regime):
    src = SyntheticSource(regime)
    x, coeff = src.sample(40000, np.random.default_rng(0))
    on = coeff > 0
    np.testing.assert_allclose(np.linalg.norm(src.features, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(x, coeff @ src.features, rtol=1e-4, atol=1e-4)
    assert on.sum(1).mean() == pytest.approx(regime.active_per_token, rel=0.05)
    freq = on.mean(0)
    if regime.frequency == "power_law":
        ranks = np.argsort(np.argsort(-src.p_fire)) + 1
        # rate of rank r ~ r^-exponent: the fitted slope of log rate against log rank
        slope = np.polyfit(np.log(ranks), np.log(np.maximum(freq, 1e-6)), 1)[0]
        assert slope == pytest.approx(-regime.power_law_exponent, abs=0.15)
    else:
        np.testing.assert_allclose(freq, regime.active_per_token / regime.n_features, atol=0.006)
    if regime.correlation == "groups":
        a, b = on[:, 0], on[:, 1]                          # same group
        c = on[:, 4]                                       # another group
        assert (a & b).mean() > 5 * a.mean() * b.mean() and (a & c).mean() < 2 * a.mean() * c.mean()
    if regime.magnitude == "lognormal":
        mean_mag = np.array([coeff[on[:, i], i].mean() for i in range(regime.n_features)])
        np.testing.assert_allclose(mean_mag, src.scale, rtol=0.15)       # factor uniform in [0.5, 1.5]


def test_synthetic_cache_is_a_format_v1_cache(tmp_path):
    from train.cache_reader import open_activations
    regime = Regime(name="u", d=8, n_features=24, active_per_token=2, seed=3)
    path = write_synthetic_cache(tmp_path / "c", regime, 4096, context_length=64, chunk_rows=1024, progress=False)
    source = open_activations(str(path), 0, "resid_post")
    assert source.complete.all() and source.width == 8
    x, _ = SyntheticSource(regime).sample(1024, np.random.default_rng([3, 1, 2]))     # chunk 2's rows
    stored = source.as_tensor(source.array[2048:3072]).float().numpy()
    np.testing.assert_allclose(stored, x, rtol=1e-2, atol=1e-2)                        # bf16 of the same draws
    np.testing.assert_array_equal(true_features(path), SyntheticSource(regime).features)
    assert write_synthetic_cache(tmp_path / "c", regime, 4096, context_length=64, chunk_rows=1024,
                                 progress=False) == path                              # found, not rewritten
    with pytest.raises(FileExistsError):
        write_synthetic_cache(tmp_path / "c", Regime(name="v", d=8, n_features=24, seed=4), 4096,
                              context_length=64, chunk_rows=1024, progress=False)


def _small_config(tmp_path, arms) -> QualityConfig:
    return QualityConfig(out=str(tmp_path / "q"), caches=str(tmp_path / "caches"), regimes=[Regime(name="tiny", d=8, n_features=24, active_per_token=2)],
                         synthetic_tokens=16384, budgets=[Budget(name="smoke", tokens=4096, batch_size=256, lr=3e-3,
                                                                  lr_warmup_steps=2)],
                         arms=arms, width=32, buffer_tokens=2048, heldout_fraction=0.1, eval_tokens=2048,
                         progress=False)


def test_every_trainer_sees_the_batches_the_trainer_loop_serves(tmp_path):
    from quality.bench import _caches, _loader_batches
    from train.cache_reader import heldout_sequences, open_activations
    from train.loader import ChunkLoader
    cfg = _small_config(tmp_path, [])
    cache = _caches(cfg)[0]
    _, batches = _loader_batches(cache, cfg, 256)
    source = open_activations(cache["cache"], 0, "resid_post")
    # what train.loop.train_members builds for the same loader settings
    loop = ChunkLoader(source, [int(c) for c in source.complete.nonzero()[0]],
                       heldout_sequences(source.n_sequences, cfg.heldout_fraction, 0), 256, cfg.buffer_tokens, cfg.seeds[0])
    for _ in range(20):
        assert torch.equal(next(batches), loop.next_batch().to(torch.float32))


def test_arm_overrides_become_the_members_sections():
    from quality.ours_arm import sweep_members
    arm = Arm(name="pre_act", trainer="ours", preset="jumprelu", knob="sparsity_coeff", levels=[0.01, 0.1],
              overrides={"sae.pre_act_coeff": 3e-4, "train.dead_window_tokens": 1e6, "optim.beta1": 0.0})
    members = sweep_members([arm])
    assert members[1] == {"preset": "jumprelu", "name": "pre_act@0.1", "sae": {"pre_act_coeff": 3e-4, "sparsity_coeff": 0.1},
                          "optim": {"beta1": 0.0}, "train": {"dead_window_tokens": 1e6}}
    with pytest.raises(ValueError, match="loader.batch_size"):
        sweep_members([Arm(name="bad", trainer="ours", preset="jumprelu", knob="k", levels=[2],
                           overrides={"loader.batch_size": 8})])


def test_benchmark_end_to_end_with_saelens(tmp_path):
    pytest.importorskip("sae_lens")
    from quality.bench import run_quality
    arms = [Arm(name="ours", trainer="ours", preset="jumprelu", knob="sparsity_coeff", levels=[0.01, 0.1]),
            Arm(name="theirs", trainer="saelens", preset="jumprelu_step", knob="l0_coefficient", levels=[0.3])]
    results = run_quality(_small_config(tmp_path, arms))
    rows = results["runs"][0]["rows"]
    assert {(r["trainer"], r["level"]) for r in rows} == {("ours", 0.01), ("ours", 0.1), ("saelens", 0.3)}
    for r in rows:
        assert 0 <= r["recovered"] <= 1 and np.isfinite(r["fvu"]) and r["l0"] >= 0 and 0 <= r["alive"] <= 32
    import sae_lens
    assert [r.get("saelens_version") for r in rows if r["trainer"] == "saelens"] == [sae_lens.__version__]
    assert all("saelens_version" not in r for r in rows if r["trainer"] == "ours")
    ours = {r["level"]: r for r in rows if r["trainer"] == "ours"}
    assert ours[0.1]["l0"] < ours[0.01]["l0"]                 # lambda does what it should
    report = (tmp_path / "q" / "report.md").read_text()
    assert "tiny / smoke" in report and (tmp_path / "q" / "frontier_tiny_smoke.png").read_bytes()[:4] == b"\x89PNG"
    # the summary: at how many compared L0s our best is better, per metric, as the tables below say
    fvu_table = report.split("**FVU** at equal L0:")[1].split("**")[0]          # (no ties in FVU here)
    yes, compared = fvu_table.count("| yes |"), fvu_table.count("| yes |") + fvu_table.count("| no |")
    summary = next(l for l in report.splitlines() if l.startswith("| tiny / smoke |"))
    assert summary.split(" | ")[1].startswith(f"{yes} of {compared}") if compared else "n/a" in summary
    assert json.loads((tmp_path / "q" / "results.json").read_text())["runs"][0]["rows"] == rows


def test_threshold_pool_study_end_to_end(tmp_path, monkeypatch):
    from quality.threshold_pool_study import run_study
    arms = [Arm(name="none", trainer="ours", preset="jumprelu", knob="sparsity_coeff", levels=[0.01, 0.1]),
            Arm(name="window_4", trainer="ours", preset="jumprelu", knob="sparsity_coeff", levels=[0.01, 0.1],
                overrides={"sae.threshold_grad_pool": "window", "sae.threshold_grad_pool_steps": 4})]
    docs = tmp_path / "docs"
    report = run_study(_small_config(tmp_path, arms), docs=docs, noise_batches=24).read_text()
    assert "early (10% of the budget)" in report and "end of training" in report
    assert "window 16" in report and "bandwidth 0.01" in report
    assert "window_4 against none" in report
    assert (docs / "thresholds_tiny.png").read_bytes()[:4] == b"\x89PNG"
    study = json.loads((docs / "results.json").read_text())
    table = study["runs"][0]["noise"]["end of training"]["table"]
    # at fixed parameters a window of K batches has about 1/K of the batch-alone variance (in buckets
    # whose latents got any threshold gradient in these few batches)
    noisy = {b: none for b, none in table["none"].items() if none["variance"] > 0}
    assert noisy
    for bucket, none in noisy.items():
        assert table["window 8"][bucket]["variance"] < 0.5 * none["variance"]
    # recovery is judged the right way round: as features missed, lower is better
    judged = {c["metric"] for c in study["runs"][0]["comparisons_against_none"]}
    assert "missed" in judged and "recovered" not in judged
    # a second run reuses the arms and the noise tables (same `none` SAEs): nothing is trained again
    import quality.ours_arm
    def refuse(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(quality.ours_arm, "train_ours", refuse)
    monkeypatch.setattr("quality.bench.train_ours", refuse)
    again = run_study(_small_config(tmp_path, arms), docs=docs, noise_batches=24).read_text()
    assert again == report


def test_an_arm_done_before_is_not_trained_again(tmp_path, monkeypatch):
    import quality.bench as bench
    arms = [Arm(name="a", trainer="ours", preset="jumprelu", knob="sparsity_coeff", levels=[0.03]),
            Arm(name="b", trainer="ours", preset="topk", knob="k", levels=[2])]
    cfg = _small_config(tmp_path, arms)
    cfg.only_arms = ["a"]
    first = bench.run_quality(cfg)
    assert {r["arm"] for r in first["runs"][0]["rows"]} == {"a"}
    trained = []
    real = bench._targets
    monkeypatch.setattr(bench, "_targets", lambda c, b, q, d, todo, seed=0: trained.append([a.name for a in todo]) or real(c, b, q, d, todo, seed))
    cfg.only_arms = []
    both = bench.run_quality(cfg)
    assert trained == [["b"]]                                   # a came from its results file
    assert [r for r in both["runs"][0]["rows"] if r["arm"] == "a"] == first["runs"][0]["rows"]
    cfg.arms[0].overrides = {"sae.bandwidth": 0.02}             # a changed: trained again
    cfg.report_only = True                                      # ... but not when only a report is asked for
    only = bench.run_quality(cfg)
    assert len(trained) == 1 and {r["arm"] for r in only["runs"][0]["rows"]} == {"b"}
    cfg.report_only = False
    changed = bench.run_quality(cfg)
    assert trained[-1] == ["a"]
    levels = []
    monkeypatch.setattr(bench, "_targets", lambda c, b, q, d, todo, seed=0: levels.append({a.name: a.levels for a in todo})
                        or real(c, b, q, d, todo, seed))
    cfg.arms[0].levels = [0.1, 0.03]                            # a level added: only it is trained
    added = bench.run_quality(cfg)
    assert levels == [{"a": [0.1]}]
    a_rows = [r for r in added["runs"][0]["rows"] if r["arm"] == "a"]
    assert [r["level"] for r in a_rows] == [0.1, 0.03]           # in the arm's order
    assert a_rows[1] == next(r for r in changed["runs"][0]["rows"] if r["arm"] == "a")
    cfg.arms[0].levels = [0.1]                                  # a level dropped: its row is left out, nothing trains
    assert [r["level"] for r in bench.run_quality(cfg)["runs"][0]["rows"] if r["arm"] == "a"] == [0.1]
    assert len(levels) == 1


def test_an_arm_identity_follows_its_presets_settings_not_their_comments(tmp_path, monkeypatch):
    """Our arms' identity holds the settings of their presets on those of the presets they extend
    (conf/sae/, conf/optim/): a value edited in place retrains, a comment edited does not, nor a value
    of the extended preset that the arm's own sets. An identity kept in the earlier form (each file's
    settings, a list) is the same identity."""
    import re
    import shutil
    import train.members
    from quality.bench import _arm_identity, _but_levels
    conf = tmp_path / "conf"
    shutil.copytree(train.members.CONF, conf)
    monkeypatch.setattr(train.members, "CONF", conf)
    cfg = _small_config(tmp_path, [])
    arm = Arm(name="t", trainer="ours", preset="jumprelu_tanh_saelens", knob="sparsity_coeff", levels=[0.01])
    cache = {"cache": "c", "layer": 0, "sublayer": "resid_post"}

    def identity():
        return _arm_identity(arm, cfg.budgets[0], cache, cfg)
    before = identity()
    base = conf / "sae" / "jumprelu.yaml"        # extended by jumprelu_round6, which jumprelu_tanh_saelens extends
    base.write_text("# a comment\n" + base.read_text().replace("\n#", "\n# reworded:"))
    assert identity() == before
    assert "bandwidth" in OmegaConf.load(conf / "sae" / "jumprelu_round6.yaml")
    base.write_text(re.sub(r"\nbandwidth: .*\n", "\nbandwidth: 0.02\n", base.read_text()))
    assert "bandwidth: 0.02" in base.read_text() and identity() == before
    base.write_text(base.read_text().replace("decoder_norm: 0.1\n", "decoder_norm: 0.2\n"))
    assert identity() != before
    files = [OmegaConf.to_container(OmegaConf.load(p)) for p in train.members.preset_files("sae", arm.preset)]
    earlier = {**identity(), "preset": files}
    assert _but_levels(earlier) == _but_levels(identity())
    assert _but_levels({**earlier, "preset": files[:1]}) != _but_levels(identity())


def test_kept_results_of_another_checkout_are_not_trained_again(tmp_path, monkeypatch):
    """cfg.kept (conf/quality.yaml: the committed docs/quality/results.json): a fresh out/ takes every
    arm whose identity is the same from it, and trains only the arm whose settings changed."""
    import shutil
    import quality.bench as bench
    arms = [Arm(name="a", trainer="ours", preset="jumprelu", knob="sparsity_coeff", levels=[0.03]),
            Arm(name="b", trainer="ours", preset="topk", knob="k", levels=[2])]
    cfg = _small_config(tmp_path, arms)
    first = bench.run_quality(cfg)
    kept = tmp_path / "kept.json"
    shutil.copy(Path(cfg.out) / "results.json", kept)
    shutil.rmtree(cfg.out)                                      # a fresh clone: no out/ (the caches stay)
    trained = []
    real = bench._targets
    monkeypatch.setattr(bench, "_targets", lambda c, b, q, d, todo, seed=0: trained.append([a.name for a in todo]) or real(c, b, q, d, todo, seed))
    cfg.kept = str(kept)
    again = bench.run_quality(cfg)
    assert trained == [] and again["runs"][0]["rows"] == first["runs"][0]["rows"]
    shutil.rmtree(cfg.caches)                                   # a report alone needs no cache, writes none
    cfg.report_only = True
    assert bench.run_quality(cfg)["runs"][0]["rows"] == first["runs"][0]["rows"]
    assert not Path(cfg.caches).exists()
    cfg.report_only = False
    cfg.arms[1].levels = [3]                                    # b changed: trained again, a still kept
    changed = bench.run_quality(cfg)
    assert trained == [["b"]]
    assert [r for r in changed["runs"][0]["rows"] if r["arm"] == "a"] == [r for r in first["runs"][0]["rows"]
                                                                          if r["arm"] == "a"]


def test_recipe_report_compares_arms_at_equal_l0(tmp_path):
    """Arm files from two runs merged; an arm whose FVU is 0.9x the baseline's at every L0 (on other
    L0 points) reads +10% better and, recovering 0.6 of the features against 0.5, +10 points (also where
    the baseline recovers none, where a relative difference is undefined); no overlap says so."""
    from quality.recipe_report import against_baseline, load_arms, write_recipe_report

    def arm(name, l0s, fvu, rec):
        return [{"arm": name, "trainer": "ours", "level": i, "l0": l, "fvu": fvu(l), "recovered": rec(l), "alive": 10}
                for i, l in enumerate(l0s)]
    fvu = lambda l: 1 - 0.1 * np.log(l)              # linear in log L0: interpolation is exact  # noqa: E731
    base = arm("base", [1, 2, 4, 8], fvu, lambda l: 0.5)
    better = arm("better", [1.5, 3, 6], lambda l: 0.9 * fvu(l), lambda l: 0.6)
    far = arm("far", [100, 200], fvu, lambda l: 0.5)
    for folder, rows in (("a", base), ("b", better + far)):
        (tmp_path / folder / "arms").mkdir(parents=True)
        names = {r["arm"] for r in rows}
        for n in names:
            (tmp_path / folder / "arms" / f"{n}.json").write_text(
                json.dumps({"rows": [r for r in rows if r["arm"] == n]}))
    rows = load_arms([tmp_path / "a", tmp_path / "b"])
    assert len(rows) == 9
    assert against_baseline(rows, "better", "base", "fvu")["better"] == pytest.approx(0.1)
    recovered = against_baseline(rows, "better", "base", "recovered")
    assert recovered["better"] == pytest.approx(0.2) and recovered["difference"] == pytest.approx(0.1)
    assert against_baseline(rows, "far", "base", "fvu")["better"] is None
    report = write_recipe_report(rows, "base", tmp_path / "out" / "r.md", "t").read_text()
    assert "| better | 1.5-6 | +10% | +10.0 pts | +0% |" in report and "| far | no overlap |" in report
    # on an LM cache the report compares KL to the clean LM beside delta LM loss, as the benchmark's does
    lm = [{**r, "delta_ce": r["fvu"], "kl_spliced": r["fvu"] * (0.8 if r["arm"] == "better" else 1.0)}
          for r in rows if r["arm"] != "far"]
    lm_report = write_recipe_report(lm, "base", tmp_path / "out" / "lm.md", "t").read_text()
    assert "| arm | L0 range | FVU | true features recovered | delta LM loss | KL to the clean LM | alive latents |" in lm_report
    assert "| better | 1.5-6 | +10% | +10.0 pts | +10% | +28% | +0% |" in lm_report
    none = [{**r, "recovered": 0.0} for r in base]
    recovered = against_baseline(none + better, "better", "base", "recovered")
    assert recovered["better"] is None and recovered["difference"] == pytest.approx(0.6)
    # the same baseline from a results.json (the kept results), only the arm asked for
    results = {"runs": [{"cache": {"name": "other"}, "budget": {"name": "short"}, "rows": far},
                        {"cache": {"name": "c"}, "budget": {"name": "short"}, "rows": base + far}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert load_arms([f"{tmp_path / 'results.json'}#c/short:base", tmp_path / "b"]) == base + better + far
    with pytest.raises(FileNotFoundError, match="no run c/long"):
        load_arms([f"{tmp_path / 'results.json'}#c/long"])
    assert (tmp_path / "out" / "r.png").is_file()
    with pytest.raises(ValueError, match="DIR:base=<other name>"):
        load_arms([tmp_path / "a", tmp_path / "a"])
    # the same arm of two runs (a default before and after), one of them renamed; the other arms left out
    both = load_arms([tmp_path / "a", f"{tmp_path / 'a'}:base=base_before",
                      f"{tmp_path / 'results.json'}#c/short:base=base_kept,far"])
    assert [r["arm"] for r in both] == ["base"] * 4 + ["base_before"] * 4 + ["base_kept"] * 4 + ["far"] * 2
    assert [{**r, "arm": "base"} for r in both[4:8]] == base and both[:4] == base
    picked = load_arms([tmp_path / "a", f"{tmp_path / 'b'}:better"])       # DIR:arm takes only that arm
    assert sorted({r["arm"] for r in picked}) == ["base", "better"] and len(picked) == 7
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_arms([f"{tmp_path / 'b'}:nothere"])


def test_best_at_equal_l0_skips_gaps_between_a_trainers_arms():
    """Best arm per trainer at the L0 of each SAE; an L0 between two arms' ranges (no arm of ours
    reaches it) is left out instead of failing, and the rest name the arm that is best there."""
    from quality.report import best_at_equal_l0
    rows = ([{"arm": "a", "trainer": "ours", "l0": l, "fvu": 0.1} for l in (1, 2)] +
            [{"arm": "b", "trainer": "ours", "l0": l, "fvu": 0.3} for l in (4, 8)] +
            [{"arm": "s", "trainer": "saelens", "l0": l, "fvu": 0.2} for l in (1, 1.5, 3, 4, 6, 8)])
    got = best_at_equal_l0(rows, "fvu")
    # 3 lies between a's and b's ranges: left out
    assert [round(p["l0"], 2) for p in got["points"]] == [1, 1.5, 2, 4, 6, 8]
    assert [p["ours_arm"] for p in got["points"]] == ["a", "a", "a", "b", "b", "b"]
    assert all(p["ours_better"] == (p["ours_arm"] == "a") for p in got["points"])


def test_best_at_equal_l0_does_not_interpolate_across_a_wide_gap_of_a_sweep():
    """An arm whose SAEs are more than MAX_L0_GAP apart in L0 is not read between them: a straight line
    in log L0 there would credit a sparse sweep with SAEs it never trained."""
    from quality.report import MAX_L0_GAP, best_at_equal_l0
    gap = MAX_L0_GAP * 1.5
    rows = ([{"arm": "o", "trainer": "ours", "l0": l, "fvu": 0.5 / l} for l in (1, 2, 4, gap)] +
            [{"arm": "s", "trainer": "saelens", "l0": l, "fvu": 0.4 / l} for l in (1, gap)])
    got = best_at_equal_l0(rows, "fvu")
    assert [round(p["l0"], 3) for p in got["points"]] == [1, round(gap, 3)]     # only where s has SAEs
    rows += [{"arm": "s", "trainer": "saelens", "l0": l, "fvu": 0.4 / l} for l in (2, 4)]
    assert len(best_at_equal_l0(rows, "fvu")["points"]) == 4
    assert all(p["ours"] == pytest.approx(1.25 * p["saelens"]) for p in best_at_equal_l0(rows, "fvu")["points"])


def test_lm_metrics_carry_their_standard_errors_into_the_comparison(tmp_path):
    """delta LM loss is read with its standard error (interpolated on the best arm like the metric); a
    point where ours is behind by less than two standard errors of the difference is said to be within
    noise, in the table and in the summary, and one behind by more is not."""
    from quality.report import best_at_equal_l0, write_report
    rows = ([{"arm": "o", "trainer": "ours", "l0": l, "fvu": 0.1, "delta_ce": d, "delta_ce_se": 0.01}
             for l, d in ((10, 0.10), (20, 0.08))] +
            [{"arm": "s", "trainer": "saelens", "l0": l, "fvu": 0.2, "delta_ce": d, "delta_ce_se": se}
             for l, d, se in ((10, 0.09, 0.01), (20, 0.01, 0.03))])
    points = best_at_equal_l0(rows, "delta_ce")["points"]
    assert [(p["ours_se"], p["saelens_se"]) for p in points] == [(0.01, 0.01), (0.01, 0.03)]
    # 0.10 vs 0.09: 0.01 < 2 * hypot(0.01, 0.01); 0.08 vs 0.01: 0.07 > 2 * hypot(0.01, 0.03)
    results = {"runs": [{"cache": {"name": "lm"}, "budget": {"name": "b", "tokens": 1e3, "lr": 1e-3}, "rows": rows}]}
    report = write_report(results, tmp_path).read_text()
    table = report.split("**delta LM loss** at equal L0:")[1].split("**")[0]
    assert "| 0.1 ± 0.01 (o) | 0.09 ± 0.01 (s) | no (within 2 s.e.) |" in table
    assert "| 0.08 ± 0.01 (o) | 0.01 ± 0.03 (s) | no |" in table
    summary = next(l for l in report.splitlines() if l.startswith("| lm / b |"))
    assert "0 of 2 (" in summary and "; 1 of the other 2 within 2 s.e." in summary
    # results kept from before the errors were recorded: no verdict on noise
    for r in rows:
        r.pop("delta_ce_se")
    report = write_report(results, tmp_path).read_text()
    assert "within 2 s.e." not in report and "±" not in report


def test_summary_reads_recovery_in_points_and_fvu_relative(tmp_path):
    """The summary's median difference: relative for FVU, in percentage points for the recovered
    fraction, where a relative difference on a recovery near 0 explodes (0.4 against 0.004: +9900%)."""
    from quality.report import write_report
    rows = ([{"arm": "o", "trainer": "ours", "l0": l, "fvu": 0.09, "recovered": r} for l, r in ((1, 0.4), (2, 0.9))] +
            [{"arm": "s", "trainer": "saelens", "l0": l, "fvu": 0.1, "recovered": r} for l, r in ((1, 0.004), (2, 0.95))])
    results = {"runs": [{"cache": {"name": "syn"}, "budget": {"name": "b", "tokens": 1e3, "lr": 1e-3}, "rows": rows}]}
    summary = next(l for l in write_report(results, tmp_path).read_text().splitlines() if l.startswith("| syn / b |"))
    fvu, recovered = summary.split(" | ")[1:3]
    assert fvu == "2 of 2 (+10%)"
    # the two points' differences: +39.6 and -5 points, median +17.3
    assert recovered == "1 of 2 (+17.3 pts)"


def test_lm_metrics_scored_per_sequence_are_compared_paired(tmp_path):
    """Where both SAEs carry per-sequence delta LM losses (the same held-out sequences), a gap is judged
    against the standard error of the per-sequence differences, interpolated along each arm as the
    metric is: a small gap that every sequence shows is beyond noise though the unpaired errors (which
    the sequences' difficulty inflates) would call it within; a gap that flips sign from sequence to
    sequence stays within noise."""
    from quality.report import best_at_equal_l0, write_report
    rng = np.random.default_rng(0)
    n = 200
    difficulty = rng.normal(0.05, 0.03, size=n)                    # shared by every SAE
    def seqs(shift, noise):
        return difficulty + shift + noise * rng.normal(size=n)
    o = {10: seqs(0.002, 1e-4), 40: seqs(0.001, 1e-4)}                # ours: 0.0015 worse at L0 20, consistently
    s = {10: seqs(0.0, 1e-4), 40: seqs(0.0, 1e-4)}
    rows = [{"arm": arm, "trainer": t, "l0": l0, "fvu": 0.1, "delta_ce": float(v.mean()),
             "delta_ce_se": float(v.std(ddof=1) / np.sqrt(n)), "delta_ce_per_sequence": v.tolist()}
            for arm, t, d in (("o", "ours", o), ("s", "saelens", s)) for l0, v in d.items()]
    rows.append({"arm": "s", "trainer": "saelens", "l0": 20.0, "fvu": 0.1, "delta_ce": float(s[10].mean()),
                 "delta_ce_se": 0.002, "delta_ce_per_sequence": s[10].tolist()})
    points = {round(p["l0"]): p for p in best_at_equal_l0(rows, "delta_ce")["points"]}
    w = np.log(20 / 10) / np.log(40 / 10)
    ours_at_20 = (1 - w) * o[10] + w * o[40]
    assert points[20]["ours"] == pytest.approx(float(ours_at_20.mean()))
    assert points[20]["paired_se"] == pytest.approx(float(np.std(ours_at_20 - s[10], ddof=1) / np.sqrt(n)))
    assert points[20]["paired_se"] < 0.1 * points[20]["ours_se"]
    results = {"runs": [{"cache": {"name": "lm"}, "budget": {"name": "b", "tokens": 1e3, "lr": 1e-3}, "rows": rows}]}
    table = write_report(results, tmp_path).read_text().split("**delta LM loss** at equal L0:")[1].split("**")[0]
    verdicts = [line.rsplit("|", 2)[1].strip() for line in table.splitlines() if line.startswith("| 2")]
    assert verdicts == ["no"]                                         # unpaired it would be within 2 s.e.
    assert abs(points[20]["ours"] - points[20]["saelens"]) < 2 * np.hypot(points[20]["ours_se"], points[20]["saelens_se"])
    # the same mean gap, but sequence by sequence of either sign: within noise
    for r in rows:
        if r["arm"] == "o":
            v = np.array(r["delta_ce_per_sequence"]) + rng.normal(0, 0.05, size=n)
            v += float(np.mean(r["delta_ce_per_sequence"])) - v.mean()
            r["delta_ce_per_sequence"] = v.tolist()
    table = write_report(results, tmp_path).read_text().split("**delta LM loss** at equal L0:")[1].split("**")[0]
    assert [line.rsplit("|", 2)[1].strip() for line in table.splitlines() if line.startswith("| 2")] == \
        ["no (within 2 s.e.)"]
    # a row without its sequences (results kept from before): the unpaired errors, as before
    rows[0].pop("delta_ce_per_sequence")
    assert "paired_se" not in best_at_equal_l0(rows, "delta_ce")["points"][0]


def test_scores_keep_the_lm_metrics_per_sequence(tmp_path, monkeypatch):
    """An LM cache's rows keep each SAE's per-sequence delta LM loss and KL (6 significant digits), which
    the report pairs; a synthetic cache's rows have none."""
    from types import SimpleNamespace
    import evaluate.evaluation
    import quality.bench as bench
    cfg = _small_config(tmp_path, [])
    rec = SimpleNamespace(l0=3.0, fvu=0.1, dead_fraction=0.0, firing_frequency=[0.1, 0.0], dense_fraction=0.0)
    lm = {"delta_ce": 0.01, "delta_ce_se": 0.001, "delta_ce_per_sequence": [0.0123456789, 0.0076543211],
          "kl_per_sequence": [1.23456789e-4, 2e-4]}
    monkeypatch.setattr(evaluate.evaluation, "evaluate_targets", lambda targets, c: [{"reconstruction": rec, "delta_lm": lm}])
    target = SimpleNamespace(name="o@1", path=tmp_path, meta={"label": "o", "trainer": "ours", "level": 1, "ms_per_step": 1.0})
    (row,) = bench._score([target], {"features": None, "cache": str(tmp_path)}, cfg)
    assert row["delta_ce_per_sequence"] == [0.0123457, 0.00765432] and row["kl_per_sequence"] == [0.000123457, 0.0002]
    assert row["delta_ce"] == 0.01 and row["alive"] == 1
    lm.clear()
    (row,) = bench._score([target], {"features": None, "cache": str(tmp_path)}, cfg)
    assert "delta_ce_per_sequence" not in row and "kl_per_sequence" not in row


def test_an_lm_cache_holds_out_its_own_fraction_for_every_trainer(tmp_path):
    """LMCache.heldout_fraction: the batches SAELens is given and our sweep's loader hold out that
    fraction, the scoring reads it, and it keys the cache's results (others keep the benchmark's)."""
    import quality.bench as bench
    from quality.config import LMCache
    from train.cache_reader import heldout_sequences, open_activations
    from train.loader import ChunkLoader
    cfg = _small_config(tmp_path, [])
    synthetic = bench._caches(cfg)[0]                 # written once; the LM entries below point at it
    cfg.regimes = []
    cfg.lm_caches = [LMCache(name="own", cache=synthetic["cache"], layer=0, sublayer="resid_post", heldout_fraction=0.4),
                     LMCache(name="shared", cache=synthetic["cache"], layer=0, sublayer="resid_post")]
    own, shared = bench._caches(cfg)
    assert own["heldout_fraction"] == 0.4 and "heldout_fraction" not in shared
    arm = Arm(name="a", trainer="ours", preset="jumprelu", knob="sparsity_coeff", levels=[0.03])
    ids = [bench._arm_identity(arm, cfg.budgets[0], c, cfg)["cache"] for c in (own, shared)]
    assert ids[0] == {**ids[1], "heldout_fraction": 0.4}
    # scored per held-out sequence (results kept from before are scored again); synthetic caches: no LM
    assert all(bench._arm_identity(arm, cfg.budgets[0], c, cfg)["lm_scores"] == "per_sequence" for c in (own, shared))
    assert "lm_scores" not in bench._arm_identity(arm, cfg.budgets[0], synthetic, cfg)
    # SAELens's batches: what a loader holding out 0.4 serves, not what one holding out 0.1 does
    source = open_activations(own["cache"], 0, "resid_post")
    loaders = {f: ChunkLoader(source, [int(c) for c in source.complete.nonzero()[0]],
                              heldout_sequences(source.n_sequences, f, 0), 256, cfg.buffer_tokens, cfg.seeds[0])
               for f in (0.4, cfg.heldout_fraction)}
    _, batches = bench._loader_batches(own, cfg, 256)
    first = next(batches)
    assert torch.equal(first, loaders[0.4].next_batch().to(torch.float32))
    assert not torch.equal(first, loaders[cfg.heldout_fraction].next_batch().to(torch.float32))
    # our sweep trains on the same rule, and the scoring reads it
    (target,) = bench._targets(own, cfg.budgets[0], cfg, tmp_path / "run", [arm])
    assert target.heldout["fraction"] == 0.4 and target.meta["heldout"]["fraction"] == 0.4


def test_mean_over_seeds_against_a_direct_computation():
    """Each SAE's mean over its seeds with the standard error of that mean (n - 1 spread over sqrt(n));
    an LM metric's own error over held-out sequences (shared by the seeds) added in quadrature; an arm
    trained at one seed keeps no error it did not have; one seed's run is passed through unchanged."""
    from quality.seed_mean import merged_runs
    rng = np.random.default_rng(0)
    fvu = rng.uniform(0.1, 0.2, size=3)
    dce, dce_se = rng.uniform(0.01, 0.02, size=3), rng.uniform(1e-3, 2e-3, size=3)

    def run(seed, rows):
        return {"cache": {"name": "c"}, "budget": {"name": "b"}, "seed": seed, "rows": rows}
    runs = [run(s, [{"name": "o@1", "arm": "o", "trainer": "ours", "level": 1, "l0": 2.0 + s, "fvu": float(fvu[s]),
                     "alive": 10 + s, "delta_ce": float(dce[s]), "delta_ce_se": float(dce_se[s])}]
                + ([{"name": "q@2", "arm": "q", "trainer": "saelens", "level": 2, "l0": 3.0, "fvu": 0.3}] if s == 0 else []))
            for s in (2, 0, 1)]
    (merged,) = merged_runs(runs)
    assert merged["seeds"] == [0, 1, 2]
    o, q = merged["rows"]
    assert o["seeds"] == 3 and o["l0"] == pytest.approx(3.0) and o["alive"] == pytest.approx(11.0)
    assert o["fvu"] == pytest.approx(fvu.mean())
    assert o["fvu_se"] == pytest.approx(np.std(fvu, ddof=1) / np.sqrt(3))
    assert o["alive_se"] == pytest.approx(np.std([10, 11, 12], ddof=1) / np.sqrt(3))
    assert o["delta_ce_se"] == pytest.approx(np.sqrt(np.var(dce, ddof=1) / 3 + np.mean(dce_se ** 2)))
    assert "l0_se" not in o
    assert q == {"name": "q@2", "arm": "q", "trainer": "saelens", "level": 2, "seeds": 1, "l0": 3.0, "fvu": 0.3}
    (alone,) = merged_runs(runs[1:2])
    assert alone["rows"] is runs[1]["rows"] and alone["seeds"] == [0]
    with pytest.raises(ValueError, match="seed listed twice"):
        merged_runs([runs[0], runs[0]])


def test_seed_errors_reach_the_verdicts(tmp_path):
    """Synthetic caches trained at several seeds: the report compares the means, and says where ours
    is behind by less than two standard errors over the seeds (and not where it is behind by more)."""
    from quality.report import write_report
    budget = {"name": "b", "tokens": 1e3, "lr": 1e-3}

    def rows(seed):
        wobble = 0.001 * (seed - 1)
        return ([{"arm": "o", "trainer": "ours", "level": l, "l0": l, "fvu": f + wobble, "recovered": 0.5}
                 for l, f in ((1, 0.301), (2, 0.3))] +
                [{"arm": "s", "trainer": "saelens", "level": l, "l0": l, "fvu": f - wobble, "recovered": 0.5}
                 for l, f in ((1, 0.3), (2, 0.2))])
    results = {"runs": [{"cache": {"name": "syn"}, "budget": budget, "seed": s, "rows": rows(s)} for s in (0, 1, 2)]}
    report = write_report(results, tmp_path).read_text()
    assert "## syn / b (1e+03 tokens, lr 0.001, seeds 0, 1, 2)" in report
    table = report.split("**FVU** at equal L0:")[1].split("**")[0]
    # L0 1: 0.301 against 0.3, each with s.e. 0.001/sqrt(3): within; L0 2: 0.3 against 0.2: not
    assert "| 0.301 ± 0.00058 (o) | 0.3 ± 0.00058 (s) | no (within 2 s.e.) |" in table
    assert "| 0.3 ± 0.00058 (o) | 0.2 ± 0.00058 (s) | no |" in table
    summary = next(l for l in report.splitlines() if l.startswith("| syn / b (3 seeds) |"))
    assert summary.split(" | ")[1].startswith("0 of 2 (") and "; 1 of the other 2 within 2 s.e." in summary
    assert "| arm | level | seeds | l0 | fvu | fvu_se | recovered | recovered_se |" in report
    assert "| o | 1 | 3 | 1 | 0.301 | 0.0005774 | 0.5 | 0 |" in report


def test_repeated_arms_train_at_their_seeds_alone(tmp_path, monkeypatch):
    """cfg.repeat: the arms it names are trained again at its seeds on the caches it names (another
    initialisation and loader order, the same held-out rows), the others at cfg.seeds alone; each seed's
    results are kept and found again; the report compares the means over seeds."""
    import quality.bench as bench
    from quality.config import Repeat
    arms = [Arm(name="a", trainer="ours", preset="jumprelu", knob="sparsity_coeff", levels=[0.01, 0.1]),
            Arm(name="b", trainer="ours", preset="topk", knob="k", levels=[2])]
    cfg = _small_config(tmp_path, arms)
    cfg.repeat = Repeat(caches=["tiny"], arms=["a"], seeds=[1])
    assert bench.arm_seeds(cfg, "tiny", arms[0]) == [0, 1] and bench.arm_seeds(cfg, "tiny", arms[1]) == [0]
    assert bench.arm_seeds(cfg, "other", arms[0]) == [0]
    assert bench.arm_seeds(cfg, "other", Arm(name="a", caches=["tiny"])) == []
    calls = []
    real = bench._targets
    monkeypatch.setattr(bench, "_targets", lambda c, b, q, d, todo, seed=0: calls.append((seed, [a.name for a in todo]))
                        or real(c, b, q, d, todo, seed))
    results = bench.run_quality(cfg)
    assert calls == [(0, ["a", "b"]), (1, ["a"])]
    runs = {r["seed"]: r for r in results["runs"]}
    assert sorted(runs) == [0, 1] and {r["arm"] for r in runs[1]["rows"]} == {"a"}
    assert runs[1]["identities"]["a"]["settings"]["seed"] == 1
    first = {r["level"]: r for r in runs[0]["rows"] if r["arm"] == "a"}
    again = {r["level"]: r for r in runs[1]["rows"]}
    assert all(first[v]["fvu"] != again[v]["fvu"] for v in first)           # another seed, another SAE
    assert (Path(cfg.out) / "runs" / "tiny" / "smoke" / "seed_1" / "arms" / "a.json").is_file()
    # both trainers' batches follow the seed
    cache = bench._caches(cfg)[0]
    assert not torch.equal(next(bench._loader_batches(cache, cfg, 256, 0)[1]),
                           next(bench._loader_batches(cache, cfg, 256, 1)[1]))
    report = (Path(cfg.out) / "report.md").read_text()
    assert "seeds 0, 1)" in report
    a_mean = next(l for l in report.splitlines() if l.startswith("| a | 0.01 | 2 |"))
    assert f"{(first[0.01]['fvu'] + again[0.01]['fvu']) / 2:.4g}" in a_mean
    assert next(l for l in report.splitlines() if l.startswith("| b | 2 | 1 |"))
    calls.clear()
    assert bench.run_quality(cfg)["runs"] == results["runs"] and calls == []   # every seed found again
    cfg.repeat = Repeat(caches=["tiny"], arms=["c"], seeds=[1])
    with pytest.raises(ValueError, match=r"repeat.arms: \['c'\]"):
        bench.run_quality(cfg)


def test_arms_and_budgets_run_on_the_caches_they_name(tmp_path, monkeypatch):
    """Arm.caches and Budget.caches ([]: every cache): the others are not trained there, and a name
    that is no cache of the benchmark is refused before anything runs."""
    import quality.bench as bench
    arms = [Arm(name="a", trainer="ours", preset="jumprelu", knob="sparsity_coeff", levels=[0.03]),
            Arm(name="b", trainer="ours", preset="topk", knob="k", levels=[2], caches=["tiny"])]
    cfg = _small_config(tmp_path, arms)
    cfg.regimes.append(Regime(name="tiny2", d=8, n_features=24, active_per_token=2, seed=1))
    cfg.budgets.append(Budget(name="other", tokens=2048, batch_size=256, lr=1e-3, lr_warmup_steps=2, caches=["tiny2"]))
    calls = []
    real = bench._targets
    monkeypatch.setattr(bench, "_targets", lambda c, b, q, d, todo, seed=0: calls.append(
        (c["name"], b.name, [a.name for a in todo])) or real(c, b, q, d, todo, seed))
    bench.run_quality(cfg)
    assert calls == [("tiny", "smoke", ["a", "b"]), ("tiny2", "smoke", ["a"]), ("tiny2", "other", ["a"])]
    # where an arm runs is not part of what it gives: results kept before are still its own
    cache = bench._caches(cfg)[0]
    from dataclasses import replace
    assert (bench._arm_identity(arms[1], cfg.budgets[1], cache, cfg)
            == bench._arm_identity(replace(arms[1], caches=[]), replace(cfg.budgets[1], caches=[]), cache, cfg))
    cfg.arms[1].caches = ["tiny3"]
    with pytest.raises(ValueError, match=r"arms\[b\].caches: \['tiny3'\]"):
        bench.run_quality(cfg)
    # an arm's results are kept by its name: one name twice (say, per cache) is refused, not merged
    cfg.arms[1] = replace(arms[0], caches=["tiny2"])
    with pytest.raises(ValueError, match=r"arms: \['a'\] named more than once"):
        bench.run_quality(cfg)


def test_recipe_report_reads_a_budget_folder_as_the_mean_over_its_seeds(tmp_path):
    """`runs/<cache>/<budget>` (seed_*/arms/*.json beneath): each SAE the mean of its seeds; a seed's
    own folder gives that seed's rows alone."""
    from quality.recipe_report import load_arms
    for seed, fvu in ((0, 0.2), (1, 0.4)):
        arms = tmp_path / "short" / f"seed_{seed}" / "arms"
        arms.mkdir(parents=True)
        (arms / "x.json").write_text(json.dumps({"rows": [
            {"arm": "x", "trainer": "ours", "level": 0.1, "l0": 2.0 + seed, "fvu": fvu, "alive": 10}]}))
    (row,) = load_arms([tmp_path / "short"])
    assert row["seeds"] == 2 and row["fvu"] == pytest.approx(0.3) and row["l0"] == pytest.approx(2.5)
    assert row["fvu_se"] == pytest.approx(0.1)                    # std (n-1) 0.1414 / sqrt(2)
    assert load_arms([tmp_path / "short" / "seed_1"])[0]["fvu"] == 0.4


def test_the_committed_report_is_what_the_committed_results_of_the_benchmark_give(tmp_path):
    """docs/quality/results.json holds every arm of conf/quality.yaml at every level and seed it is
    trained at, under its current settings (a fresh clone's `make quality` trains nothing), and
    docs/quality/report.md is the report those results give: an arm, preset or level changed without
    its results, or results committed without their report, fail here."""
    from hydra import compose, initialize_config_dir
    import quality.bench as bench
    from quality.config import register_configs
    register_configs()
    root = Path(__file__).resolve().parent.parent
    with initialize_config_dir(config_dir=str(root / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="quality", overrides=[
            f"out={tmp_path / 'q'}", f"kept={root / 'docs/quality/results.json'}", "report_only=true"]))
    results = bench.run_quality(cfg)
    have = {(r["cache"]["name"], r["budget"]["name"], r["seed"], row["arm"], row["level"])
            for r in results["runs"] for row in r["rows"]}
    want = {(c["name"], b.name, seed, a.name, level)
            for c in bench._caches(cfg) for b in cfg.budgets if not b.caches or c["name"] in b.caches
            for a in cfg.arms for seed in bench.arm_seeds(cfg, c["name"], a) for level in a.levels}
    assert sorted(want - have) == []
    assert (tmp_path / "q" / "report.md").read_text() == (root / "docs/quality/report.md").read_text()


def test_saelens_at_its_own_normalisation_trains_on_the_batches_every_trainer_sees():
    """normalize_activations=expected_average_only_in: SAELens's trainer estimates its scale on 1,000
    batches of its data provider and trains on the batches after them. The benchmark gives it the same
    batches again for that estimate: training takes exactly `steps` batches, from the first, and the
    saved SAE, its scale folded in, reconstructs raw activations (norm about 30, sqrt(d) = 4)."""
    pytest.importorskip("sae_lens")
    from quality.saelens_arm import train_saelens
    d, steps, batch = 16, 30, 64
    directions = torch.nn.functional.normalize(torch.randn(24, d, generator=torch.Generator().manual_seed(0)), dim=1)

    def stream(counter):
        g = torch.Generator().manual_seed(1)
        while True:
            counter[0] += 1
            codes = (torch.rand(batch, 24, generator=g) < 0.1) * torch.rand(batch, 24, generator=g)
            yield 30 * codes @ directions
    used, estimated = [0], [0]
    sae, _ = train_saelens("jumprelu_step", "l0_coefficient", 0.1, {"normalize_activations": "expected_average_only_in"},
                           stream(used), d, 32, steps, batch, 1e-2, 1, 1, "cpu", 0, same_batches=lambda: stream(estimated))
    assert used == [steps] and estimated[0] == 1000
    x = next(stream([0]))
    fvu = ((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert torch.isfinite(fvu) and fvu < 0.3          # 0.18; read as if the scale were not folded in: 0.44
    with pytest.raises(ValueError, match="same_batches"):
        train_saelens("jumprelu_step", "l0_coefficient", 0.1, {"normalize_activations": "expected_average_only_in"},
                      stream([0]), d, 32, 2, batch, 1e-2, 1, 1, "cpu", 0)
