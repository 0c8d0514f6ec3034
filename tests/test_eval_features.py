"""`make features`: the feature browser built from a harvest of the trained tiny Gemma 2, opened from
disk in headless Chromium (Debian's package). Checked in the DOM after its JavaScript ran: the index
lists the latents, a latent's page shows highlighted contexts, and its top context sits where an
independent computation here (plain torch on the cache's arrays) puts the latent's maximum."""
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from evaluate.browser import site
from evaluate.browser.build import FeaturesError, build_browser
from evaluate.browser.chromium import dump_dom, find_chromium
from evaluate.browser.config import FeaturesConfig
from evaluate.sources import RunError
from tests.cache_factory import write_cache
from tests.test_eval_features_cache import HELDOUT, LAYER, calibrated_jumprelu, save_run, tiny_cache
from train.cache_reader import heldout_sequences
from train.run_folder import save_sae
from train.sae import JumpReLUSAE

REPO = Path(__file__).resolve().parents[1]
D_SAE = 512

needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="Chromium is not installed and could not be (make test runs apt-get install chromium): "
           "the rendered-page checks need a real browser")


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, dict(attrs), parent, [], ""

    @property
    def classes(self):
        return set((self.attrs.get("class") or "").split())

    def all_text(self):
        return self.text + "".join(c.all_text() for c in self.children)

    def find_all(self, tag=None, cls=None, **attrs):
        out = []
        for c in self.children:
            if ((tag is None or c.tag == tag) and (cls is None or cls in c.classes)
                    and all(c.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())):
                out.append(c)
            out += c.find_all(tag, cls, **attrs)
        return out


class DOM(HTMLParser):
    VOID = {"meta", "link", "input", "br", "img", "hr", "source"}

    def __init__(self, html):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("root", {})
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        n = Node(tag, attrs, self.node)
        self.node.children.append(n)
        if tag not in self.VOID:
            self.node = n

    def handle_endtag(self, tag):
        n = self.node
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is not self.root:
            self.node = n.parent

    def handle_data(self, data):
        self.node.text += data


def _dom(page) -> Node:
    return DOM(dump_dom(page)).root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The browser of a sparse SAE on the tiny model's layer 2 mlp_out, through the command line."""
    cache = tiny_cache(tmp_path_factory)
    group = zarr.open_group(str(cache), mode="r")
    x = torch.from_numpy(np.asarray(group["layer_2/mlp_out"][:2048]).view(np.int16)).view(torch.bfloat16).float()
    sae = calibrated_jumprelu(x, D_SAE, firing=0.03, seed=5)
    run = save_run(tmp_path_factory.mktemp("features") / "run", sae, cache)
    done = subprocess.run([sys.executable, "-m", "evaluate.browser", f"run={run}", "top_contexts=6",
                           "sample_size=16", "shard_latents=100", "progress=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run, sae, cache


def _oracle(sae, cache):
    """Codes of every held-out token by plain torch on the cache's arrays: (codes [n_seq, T, W] with BOS
    zeroed, tokens [n_seq, T], cache sequence ids [n_seq])."""
    group = zarr.open_group(str(cache), mode="r")
    T, n = group.attrs["context_length"], group.attrs["n_tokens"]
    seqs = heldout_sequences(n // T, HELDOUT["fraction"], HELDOUT["seed"])
    raw = np.asarray(group[f"layer_{LAYER}/mlp_out"][:]).view(np.int16)
    x = torch.from_numpy(raw).view(torch.bfloat16).float().reshape(n // T, T, -1)[seqs]
    tokens = np.asarray(group["tokens"][:]).reshape(n // T, T)[seqs]
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        f = pre * (pre > sae.threshold)
    f[:, 0] = 0.0
    f[torch.from_numpy(tokens == group.attrs["bos_token_id"])] = 0.0
    return f, tokens, seqs


def test_browser_files_and_index_data(built):
    run, sae, cache = built
    folder = run / "features"
    assert {p.name for p in folder.iterdir()} >= {"index.html", "browser.js", "browser.css", "data", site.MARKER}
    assert len(list((folder / "data").glob("shard_*.js"))) == -(-D_SAE // 100)
    index = (folder / "data" / "index.js").read_text()
    assert index.startswith("window.JUMPSCOPE_INDEX=")
    data = json.loads(index[len("window.JUMPSCOPE_INDEX="):].rstrip().rstrip(";"))
    f, tokens, seqs = _oracle(sae, cache)
    np.testing.assert_array_equal(data["count"], (f != 0).sum((0, 1)).numpy())
    np.testing.assert_allclose(data["max"], f.amax((0, 1)).numpy(), rtol=1e-3)
    assert data["meta"]["n_tokens"] == tokens[:, 1:].size and data["meta"]["has_logit_lens"]
    html = (folder / "index.html").read_text()
    assert "http://" not in html and "https://" not in html and "fetch(" not in (folder / "browser.js").read_text()


@pytest.fixture(scope="module")
def model(built):
    from harvest.model import load_model_from_cache
    return load_model_from_cache(built[2], device="cpu").model


@needs_chromium
def test_rendered_index_and_latent_page_agree_with_an_independent_computation(built, model):
    run, sae, cache = built
    f, tokens, seqs = _oracle(sae, cache)
    count = (f != 0).sum((0, 1))
    alive = int((count > 0).sum())
    frequent = int(torch.argmax(count))                   # ties: the lowest id, as the page's sort
    rare = int(torch.nonzero(count == count[count > 0].min()).flatten()[0])
    page = run / "features" / "index.html"

    dom = _dom(f"{page}#latent={frequent}&sort=-frequency")
    rows = [r for r in dom.find_all("div", "row") if "data-latent" in r.attrs]
    assert 10 <= len(rows) <= 120                          # only the rows in view are in the DOM
    assert int(rows[0].attrs["data-latent"]) == frequent
    assert f"{alive:,} of {D_SAE:,} latents" in dom.find_all(id="shown")[0].all_text()
    _check_latent(dom, frequent, f, seqs, sae, model)

    dom = _dom(f"{page}#latent={rare}")
    _check_latent(dom, rare, f, seqs, sae, model)
    rows = [int(r.attrs["data-latent"]) for r in dom.find_all("div", "row") if "data-latent" in r.attrs]
    assert rows == sorted(rows) and 0 < len(rows) < alive   # by id, dead latents hidden
    assert all(count[r] > 0 for r in rows)


def _check_latent(dom, i, f, seqs, sae, model):
    pane = dom.find_all("section", id="latent")[0]
    assert pane.attrs["data-state"] == "ready" and int(pane.attrs["data-latent"]) == i
    contexts = pane.find_all("div", "ctx")
    top = [c for c in contexts if "top" in c.classes]
    assert 0 < len(top) <= 6
    s, p = divmod(int(torch.argmax(f[..., i])), f.shape[1])
    assert int(top[0].attrs["data-seq"]) == int(seqs[s]) and int(top[0].attrs["data-pos"]) == p
    assert float(top[0].attrs["data-act"]) == pytest.approx(float(f[s, p, i]), rel=1e-3)
    peak = [t for t in top[0].find_all("span", "tok") if "max" in t.classes]
    assert len(peak) == 1 and float(peak[0].attrs["data-act"]) == pytest.approx(float(f[s, p, i]), rel=2e-3)
    for c in contexts:       # every shown token is shaded exactly where the latent fires
        row = int(np.searchsorted(seqs, int(c.attrs["data-seq"])))
        assert int(seqs[row]) == int(c.attrs["data-seq"])
        for t in c.find_all("span", "tok"):
            pos = int(t.attrs["title"].split()[1].rstrip(","))
            assert ("background" in t.attrs.get("style", "")) == bool(f[row, pos, i] > 0), (c.attrs, pos)
    # the model's own modules give the logit lens: the final norm, then the (tied) unembedding
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(sae.W_dec[i][None]))[0]
    shown = [int(t.attrs["data-token"]) for t in pane.find_all("td", "t")]
    assert shown[:10] == logits.topk(10).indices.tolist()
    assert shown[10:20] == (-logits).topk(10).indices.tolist()
    if int((f[..., i] != 0).sum()) >= 8:
        assert any("Quantiles" in b.all_text() for b in pane.find_all("div", "band-head"))


def _synthetic(tmp_path, d_sae, n_seq=32, ctx=16, d=8, firing=0.02, seed=0):
    """A cache that records no model (tokens shown as ids, no logit lens) and a run folder on it."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((n_seq * ctx, d)).astype(np.float32)
    cache = write_cache(tmp_path / "cache", {(0, "resid_post"): x}, context_length=ctx, chunk_rows=4 * ctx)
    sae = calibrated_jumprelu(torch.from_numpy(x), d_sae, firing=firing, seed=seed)
    run = tmp_path / "run"
    save_sae(run, sae, {"model": "synthetic", "layer": 0, "sublayer": "resid_post", "cache": str(cache),
                        "heldout": {"fraction": 0.5, "seed": 0}})
    return run, sae, cache


def _features(run, **kw):
    kw.setdefault("progress", False)
    return build_browser(FeaturesConfig(run=str(run), **kw))


@needs_chromium
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_131k_latents_render_only_the_rows_in_view_and_sort(tmp_path):
    W = 131072
    run, sae, cache = _synthetic(tmp_path, W, firing=0.0005)
    out = _features(run, top_contexts=2, sample_size=4, context_before=2, context_after=1, encode_tokens=128,
                    shard_latents=8192, histogram_bins=8, quantiles=[0.0, 1.0], samples_per_band=1)
    index = json.loads((out / "data" / "index.js").read_text()[len("window.JUMPSCOPE_INDEX="):].rstrip().rstrip(";"))
    maxima = np.asarray(index["max"])
    assert 1000 < (maxima > 0).sum() < W
    # filtered (ids starting with 1, dead ones shown) and sorted by max, in one page load
    dom = _dom(f"{out / 'index.html'}#sort=-max&dead=show&q=1")
    rows = [int(r.attrs["data-latent"]) for r in dom.find_all("div", "row") if "data-latent" in r.attrs]
    assert 10 <= len(rows) <= 120
    matching = [i for i in range(W) if str(i).startswith("1")]
    assert f"{len(matching):,} of {W:,} latents" in dom.find_all(id="shown")[0].all_text()
    assert rows == sorted(matching, key=lambda i: (-maxima[i], i))[:len(rows)]


def test_sweep_folders_foreign_out_folders_and_unknown_sites_are_clear_errors(tmp_path):
    run, sae, cache = _synthetic(tmp_path, 64)
    sweep = tmp_path / "sweep"
    for name in ("lam_1", "lam_2"):
        save_sae(sweep / name, sae, {"model": "synthetic", "layer": 0, "sublayer": "resid_post", "cache": str(cache),
                                     "heldout": {"fraction": 0.5, "seed": 0}})
    with pytest.raises(RunError, match="sweep folder.*lam_1, lam_2"):
        _features(sweep)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(FeaturesError, match="not a feature browser"):
        _features(run, out=str(other))
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    with pytest.raises(RunError, match="trained on layer=0 but layer=3"):
        _features(run, layer=3)
    with pytest.raises(FeaturesError, match=r"top_contexts=0 must be >= 1; quantiles=\[0.5, 0.2\] must be"):
        _features(run, top_contexts=0, quantiles=[0.5, 0.2])
    assert not (run / "features").exists()
    done = subprocess.run([sys.executable, "-m", "evaluate.browser", f"run={run}", "top_context=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "top_context" in done.stderr + done.stdout


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_failed_build_leaves_the_previous_browser_as_it_was(tmp_path, monkeypatch):
    run, sae, cache = _synthetic(tmp_path, 300)
    out = _features(run, shard_latents=100)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []

    def failing(self, lo, hi):
        calls.append(lo)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(self, lo, hi)
    original = site.SiteWriter.latents
    monkeypatch.setattr(site.SiteWriter, "latents", failing)
    with pytest.raises(OSError, match="disk full"):
        _features(run, shard_latents=100, top_contexts=3)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["sae.json", "sae.safetensors", "features"])
    monkeypatch.setattr(site.SiteWriter, "latents", original)
    _features(run, shard_latents=100, top_contexts=3)     # and a rerun replaces it
    meta = json.loads((out / site.MARKER).read_text())
    assert meta["settings"]["top_contexts"] == 3 and not meta["has_logit_lens"] and meta["notes"]


@pytest.mark.parametrize("sublayer", ["mlp_out", "attn_z"])
def test_logit_lens_ranks_tokens_as_the_models_own_modules_do(model, sublayer):
    from evaluate.browser.logit_lens import logit_lens
    block = model.model.layers[LAYER]
    width = block.self_attn.o_proj.in_features if sublayer == "attn_z" else model.config.hidden_size
    W_dec = torch.randn(7, width, generator=torch.Generator().manual_seed(4))
    lens = logit_lens(model, W_dec, LAYER, sublayer, n_tokens=12, latents_per_chunk=3, progress=False)
    with torch.no_grad():
        h = W_dec
        if sublayer == "attn_z":      # the direction's path to the residual stream: o_proj, then its norm
            h = block.post_attention_layernorm(block.self_attn.o_proj(h))
        logits = model.lm_head(model.model.norm(h))
    assert lens.top_ids.tolist() == logits.topk(12).indices.tolist()
    assert lens.bottom_ids.tolist() == (-logits).topk(12).indices.tolist()
    assert (lens.top_values[:, 0] > lens.bottom_values[:, 0]).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_pass_killed_midway_resumes_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    from evaluate.browser import resume
    from evaluate.browser.collect import FeatureCollector
    run, sae, cache = _synthetic(tmp_path, 200, n_seq=64)
    settings = dict(batch_sequences=3, sample_size=8, shard_latents=50)
    reference = _features(run, out=str(tmp_path / "reference"), checkpoint_every_s=0, **settings)
    original, calls = FeatureCollector.update, []

    def crashing(self, *args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt       # as a kill leaves it: state saved after batches 1..4 only
        return original(self, *args, **kw)
    monkeypatch.setattr(FeatureCollector, "update", crashing)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _features(run, out=str(out), checkpoint_every_s=1e-9, **settings)
    checkpoint = resume.checkpoint_path(out)
    assert torch.load(checkpoint, weights_only=False)["done"] == 12 and not out.exists()
    monkeypatch.setattr(FeatureCollector, "update", original)
    _features(run, out=str(out), checkpoint_every_s=1e-9, **settings)
    assert not checkpoint.exists()
    data = lambda folder: {p.name: p.read_bytes() for p in (folder / "data").glob("shard_*.js")}
    assert data(out) == data(reference) and len(data(out)) == 4
    strip = lambda folder: (folder / "data" / "index.js").read_text().split('"count":', 1)[1]
    assert strip(out) == strip(reference)
    # a saved state of other settings is not resumed from: it is discarded
    resume.save(checkpoint, "another SAE", 3, np.zeros((3, 16), np.int32), FeatureCollector(200))
    _features(run, out=str(out), **settings)
    assert data(out) == data(reference) and not checkpoint.exists()
