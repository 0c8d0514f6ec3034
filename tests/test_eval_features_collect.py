"""The feature browser's one pass (evaluate/browser/collect.py) against brute force on codes held whole
in memory: counts, maxima, top contexts with their windows, exact histograms, the random sample of
firings and the quantile bands drawn from it."""
import numpy as np
import pytest
import torch

from evaluate.browser.collect import FeatureCollector
from evaluate.browser.histogram import StreamingHistogram
from evaluate.browser.site import QUANT, SiteWriter
from evaluate.browser.topk import PerLatentTopK

N_SEQ, T, W = 40, 24, 30
BEFORE, AFTER = 3, 2


def _codes(seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(W, generator=g) * 10 + 0.1
    f = torch.relu(torch.randn(N_SEQ, T, W, generator=g) - 1.6) * scale
    f[:, :, 0] = 0.0                                    # a dead latent
    f[:, :, 1] = 0.0
    f[7, 5, 1] = 4.0                                    # a latent that fires once
    keep = torch.ones(N_SEQ, T, dtype=torch.bool)
    keep[:, 0] = False                                  # BOS
    keep[3, 10] = False                                 # a masked position mid-sequence
    return f, keep


def _collect(f, keep, batches=(7, 1, 12, 20), **kw):
    c = FeatureCollector(W, before=BEFORE, after=AFTER, **kw)
    lo = 0
    for b in batches:
        c.update(f[lo:lo + b].clone(), keep[lo:lo + b], torch.arange(lo, lo + b))
        lo += b
    assert lo == N_SEQ
    return c.result()


def test_statistics_and_top_contexts_match_brute_force():
    f, keep = _codes()
    r = _collect(f, keep, top_contexts=5, sample_size=8, histogram_bins=16)
    fm = f * keep[..., None]
    assert r.n_tokens == int(keep.sum())
    assert torch.equal(r.count, (fm != 0).sum((0, 1)))
    torch.testing.assert_close(r.total, fm.double().sum((0, 1)))
    torch.testing.assert_close(r.max, fm.amax((0, 1)))
    assert r.count[0] == 0 and r.count[1] == 1
    peak, where = fm.max(dim=1)                                     # [N_SEQ, W]: each sequence's peak
    for i in range(W):
        vals, seqs = peak[:, i].sort(descending=True, stable=True)
        k = min(5, int((vals > 0).sum()))
        assert torch.equal(r.top_seq[i, :k], seqs[:k]) and torch.equal(r.top_pos[i, :k], where[seqs[:k], i])
        assert torch.equal(r.top_key[i, :k], vals[:k]) and torch.isinf(r.top_key[i, k:]).all()
        for j in range(k):
            s, p = int(seqs[j]), int(where[seqs[j], i])
            want = torch.zeros(BEFORE + 1 + AFTER)
            for o in range(-BEFORE, AFTER + 1):
                if 0 <= p + o < T:
                    want[o + BEFORE] = fm[s, p + o, i]
            torch.testing.assert_close(r.top_window[i, j].float(), want, rtol=1e-3, atol=1e-3)


def test_histograms_are_exact_over_a_range_that_holds_the_maximum():
    f, keep = _codes(seed=1)
    r = _collect(f, keep, histogram_bins=32)
    fm = f * keep[..., None]
    for i in range(2, W):
        a = fm[..., i][fm[..., i] != 0].double().numpy()
        hi = float(r.hist_range[i])
        assert hi / 2 < a.max() <= hi
        counts = np.zeros(32, dtype=np.int64)
        for v in a:
            counts[min(int(v / hi * 32), 31)] += 1
        np.testing.assert_array_equal(r.hist_counts[i].numpy(), counts)
    assert r.hist_counts[0].sum() == 0 and float(r.hist_range[0]) == 0.0


def test_histogram_merges_bins_when_a_larger_value_arrives():
    h = StreamingHistogram(2, bins=8)
    h.add(torch.tensor([0, 0, 0, 1]), torch.tensor([0.1, 0.3, 0.9, 5.0]))
    h.add(torch.tensor([0, 0]), torch.tensor([3.9, 0.5]))          # latent 0's range grows from 1 to 4
    values = np.array([0.1, 0.3, 0.9, 3.9, 0.5])
    np.testing.assert_array_equal(h.counts[0].numpy(), np.histogram(values, bins=8, range=(0, 4))[0])
    np.testing.assert_array_equal(h.ranges().numpy(), [4.0, 8.0])


def test_random_sample_is_a_uniform_sample_of_each_latents_firings():
    f, keep = _codes(seed=2)
    fm = f * keep[..., None]
    r = _collect(f, keep, sample_size=6, seed=3)
    for i in range(W):
        ok = torch.isfinite(r.sample_key[i])
        assert int(ok.sum()) == min(6, int((fm[..., i] != 0).sum()))
        for a, s, p in zip(r.sample_act[i][ok], r.sample_seq[i][ok], r.sample_pos[i][ok]):
            assert a == fm[s, p, i] and a != 0 and keep[s, p]
        assert len({(int(s), int(p)) for s, p in zip(r.sample_seq[i][ok], r.sample_pos[i][ok])}) == int(ok.sum())
    same = _collect(f, keep, sample_size=6, seed=3)
    assert torch.equal(same.sample_seq, r.sample_seq) and torch.equal(same.sample_pos, r.sample_pos)

    # one latent firing on every token: over many seeds, each quarter of the stream holds about a
    # quarter of the samples (a reservoir that kept the first entries would hold them all in the first)
    n = 400
    quarters = np.zeros(4)
    for seed in range(30):
        c = FeatureCollector(1, sample_size=10, before=0, after=0, seed=seed)
        for lo in range(0, n, 50):
            c.update(torch.ones(50, 1, 1), torch.ones(50, 1, dtype=torch.bool), torch.arange(lo, lo + 50))
        quarters += np.bincount(c.result().sample_seq[0].numpy() * 4 // n, minlength=4)
    assert quarters.sum() == 300 and quarters.min() > 50


def test_topk_merge_keeps_the_largest_keys_and_their_payloads():
    t = PerLatentTopK(3, 2, {"p": ((2,), torch.int64)})
    first = torch.tensor([[1, 1], [5, 5], [3, 3], [2, 2]])
    t.offer(torch.tensor([0, 0, 0, 2]), torch.tensor([1.0, 5.0, 3.0, 2.0]), lambda j: {"p": first[j]})
    asked = []
    second = torch.tensor([[4, 4], [9, 9], [7, 7], [0, 0], [6, 6]])

    def payload(j):
        asked.extend(j.tolist())
        return {"p": second[j]}
    t.offer(torch.tensor([0, 2, 2, 0, 0]), torch.tensor([4.0, 2.0, 7.0, 0.5, 0.2]), payload)
    assert sorted(asked) == [0, 1, 2, 3]                # not for entry 4: latent 0 has two better ones here
    assert t.keys.tolist() == [[5.0, 4.0], [float("-inf")] * 2, [7.0, 2.0]]
    assert t.payload["p"][:, :, 0].tolist() == [[5, 4], [0, 0], [7, 2]]    # the tie at 2.0 keeps the older entry
    assert t.threshold.tolist() == [4.0, float("-inf"), 2.0]


def test_quantile_bands_are_ranks_of_the_sample_and_contexts_are_clipped_to_the_sequence():
    f, keep = _codes(seed=4)
    fm = f * keep[..., None]
    r = _collect(f, keep, top_contexts=3, sample_size=N_SEQ * T)     # the sample holds every firing
    tokens = np.arange(N_SEQ * T, dtype=np.int32).reshape(N_SEQ, T)  # token id = its row: easy to check
    seq_ids = np.arange(N_SEQ) * 10 + 7
    writer = SiteWriter(r, tokens, seq_ids, None, [0.0, 0.5, 0.9], samples_per_band=2)
    entries = writer.latents(0, W)
    assert "top" not in entries[0] and entries[1]["top"][0]["s"] == 7 * 10 + 7
    for i in (2, 5, 17):
        e = entries[i]
        acts = np.sort(fm[..., i][fm[..., i] != 0].numpy())
        m = len(acts)
        (b0, b1) = e["bands"]
        assert b0["q"] == [0.0, 0.5] and b0["lo"] == pytest.approx(acts[0], rel=1e-3)
        assert b0["hi"] == pytest.approx(acts[m // 2 - 1], rel=1e-3)
        assert b1["lo"] == pytest.approx(acts[m // 2], rel=1e-3) and b1["hi"] == pytest.approx(acts[int(0.9 * m) - 1], rel=1e-3)
        for band in e["bands"]:
            assert len(band["x"]) == 2
            for c in band["x"]:
                assert band["lo"] * 0.999 <= c["a"] <= band["hi"] * 1.001
        for c in e["top"] + [x for b in e["bands"] for x in b["x"]]:
            s, p = (c["s"] - 7) // 10, c["p"]
            lo, hi = max(0, p - BEFORE), min(T, p + AFTER + 1)
            assert c["o"] == lo and c["t"] == tokens[s, lo:hi].tolist()
            want = np.rint(fm[s, lo:hi, i].numpy() / float(r.max[i]) * QUANT)
            np.testing.assert_allclose(c["v"], want, atol=1.0)       # windows are float16: +-1 thousandth
            assert c["a"] == pytest.approx(float(fm[s, p, i]), rel=1e-3)
