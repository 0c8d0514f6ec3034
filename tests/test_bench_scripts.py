"""`make bench`'s scripts run end to end on small settings and write their results (the figures
themselves are for BENCHMARKS.md, not for tests)."""
import json
import sys

from tests.harvest_util import REPO


def test_harvest_bench_runs_and_reports_its_ratio(tmp_path, monkeypatch):
    from harvest import bench
    monkeypatch.setattr(sys, "argv", ["bench", "--out", str(tmp_path), "--tokens", "8192", "--repeats", "1"])
    monkeypatch.chdir(REPO)
    bench.main()
    result = json.loads((tmp_path / "harvest_bench.json").read_text())
    assert result["tokens"] == 8192 and result["durable"] is True
    med = result["seconds_median"]
    assert result["harvest_over_limit"] == med["harvest"] / max(med["forward"], med["write"])
    assert not (tmp_path / "harvest_cache").exists()          # its scratch cache is removed


def test_train_bench_runs_and_reports_both_figures(tmp_path):
    from train import bench
    result = bench.main(["--out", str(tmp_path), "--d", "64", "--chunks", "4", "--chunk-rows", "512",
                         "--batch", "256", "--buffer-tokens", "1024", "--repeats", "1", "--k", "2",
                         "--sweep-d", "16", "--sweep-width", "32", "--sweep-batch", "64", "--sweep-steps", "3"])
    assert (tmp_path / "train_bench.json").exists()
    assert result["loader"]["ratio"] > 0 and result["loader"]["reader_threads"] >= 1
    assert result["sweep"]["k"] == 2 and result["sweep"]["speedup"] > 0


def test_object_store_bench_runs_against_its_own_s3_server(tmp_path):
    import pytest
    pytest.importorskip("obstore")
    pytest.importorskip("moto.server")
    from scripts import bench_object_store
    result = bench_object_store.main(["--out", str(tmp_path), "--tokens", "512", "--chunk-tokens", "256",
                                      "--d", "64", "--chunks", "4", "--chunk-rows", "256", "--batch", "128",
                                      "--buffer-tokens", "512", "--repeats", "1"])
    assert (tmp_path / "object_store_bench.json").exists() and result["store"].startswith("moto")
    assert set(result["write"]["MB_per_s"]) == {"harvest_local", "harvest_store", "raw_write_local", "raw_put_store"}
    assert result["read"]["loader_store_over_raw_ranged_gets"] > 0 and result["write"]["objects"] == 2 * 22


def test_step_speed_runs_ours_with_dead_latents_beside_saelens():
    import pytest
    pytest.importorskip("sae_lens")
    from quality.step_speed import measure
    row = measure(8, 32, 16, steps=2, rounds=1, device="cpu", dead_fraction=0.5)
    assert row["dead_fraction"] == 0.5 and set(row["ms_per_step"]) == {"ours", "saelens"}
    assert row["saelens_over_ours"] == row["ms_per_step"]["saelens"] / row["ms_per_step"]["ours"]
