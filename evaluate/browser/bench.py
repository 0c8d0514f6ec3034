"""Benchmarks of the feature browser (BENCHMARKS.md, "Feature browser"):

1. `make features` at 16k latents and 1M held-out tokens: a random bf16 cache (no model recorded,
   so no logit lens) and a JumpReLU SAE of random unit directions whose thresholds give L0 about 64.
   Wall time of each phase (from the run's features.json), the build process's peak RSS, and, side by
   side in the same run, the two costs the pass cannot avoid: reading the same held-out rows
   (`evaluate.heldout`) and encoding as many tokens with the same SAE.
2. The logit lens at Gemma 2 2B's shape (d 2304, vocabulary 256,000) on a random model: a slice of
   the latents, timed, and scaled to all of them (stated as such).
3. The page in headless Chromium at 16k and 131k latents: time to a rendered index, and to sort,
   filter and re-render (the page's own timings, `index.html#bench=1`).

    .venv/bin/python -m evaluate.browser.bench                  # results: bench_out/features/bench.json
    .venv/bin/python -m evaluate.browser.bench --tokens 65536   # a quick run
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from train.bench import write_random_cache
from train.run_folder import save_sae
from train.sae import JumpReLUSAE

from .chromium import dump_dom, find_chromium

REPO = Path(__file__).resolve().parents[2]
CTX, CHUNK_ROWS = 1024, 16384
HELDOUT_FRACTION = 0.9


def random_sae(d_in: int, d_sae: int, l0: float, seed: int = 0) -> JumpReLUSAE:
    """Unit random directions; on N(0, I) inputs each pre-activation is N(0, 1), so one threshold at the
    (1 - l0 / d_sae) quantile gives about l0 active latents per token."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - l0 / d_sae)))
    return JumpReLUSAE.from_tensors(W_enc=W_dec.T.clone(), W_dec=W_dec, b_enc=torch.zeros(d_sae),
                                    b_dec=torch.zeros(d_in), threshold=torch.full((d_sae,), z))


def make_run(root: Path, d_in: int, d_sae: int, tokens: int, l0: float) -> tuple[Path, Path]:
    n_chunks = -(-int(tokens / HELDOUT_FRACTION * 1.02) // CHUNK_ROWS)
    cache = root / f"cache_d{d_in}_{n_chunks}"
    if not (cache / "complete" / "zarr.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        print(f"writing a random cache: {n_chunks * CHUNK_ROWS:,} tokens x {d_in} (bf16) -> {cache}", flush=True)
        write_random_cache(cache, d_in, n_chunks, CHUNK_ROWS, CTX, layer=0, sublayer="resid_post")
    run = root / f"run_d{d_in}_w{d_sae}"
    save_sae(run, random_sae(d_in, d_sae, l0), {"model": "bench-random", "layer": 0, "sublayer": "resid_post",
                                                "cache": str(cache), "heldout": {"fraction": HELDOUT_FRACTION, "seed": 0}})
    return run, cache


def peak_rss_mb(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run cmd under /usr/bin/time (GNU time: the maximum resident set size of cmd alone; a child's
    getrusage would also count pages it shared with this process when it was forked)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], cwd=REPO, capture_output=True,
                              text=True)
        kb = rss.read().split()
    return done, (int(kb[-1]) / 1024 if kb and kb[-1].isdigit() else float("nan"))


def build_in_subprocess(run: Path, overrides: list[str]) -> dict:
    """`python -m evaluate.browser` on run; (wall s, peak RSS of the child in MB, its features.json)."""
    t = time.time()
    done, peak = peak_rss_mb([sys.executable, "-m", "evaluate.browser", f"run={run}", "progress=false", *overrides])
    wall = time.time() - t
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    meta = json.loads((run / "features" / "features.json").read_text())
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1),
            "phases_s": meta["seconds"], "n_tokens": meta["n_tokens"], "d_sae": meta["d_sae"],
            "size_mb": round(sum(f.stat().st_size for f in (run / "features").rglob("*") if f.is_file()) / 2**20, 1)}


def bare_costs(run: Path, cache: Path, max_tokens: int, encode_tokens: int = 4096) -> dict:
    """Reading the same held-out rows, and encoding as many tokens, each alone."""
    from evaluate.heldout import heldout_batches, open_site, select_heldout
    from train.run_folder import load_sae
    sae, meta = load_sae(run)
    source = open_site(str(cache), 0, "resid_post")
    seqs = select_heldout(source, meta["heldout"], max_tokens)
    t = time.time()
    n = sum(len(tok) for tok, _ in heldout_batches(source, seqs, 8))
    read_s = time.time() - t
    x = torch.randn(encode_tokens, sae.d_in)
    t = time.time()
    with torch.no_grad():
        for _ in range(-(-n * CTX // encode_tokens)):
            f = sae.encode(x)
    encode_s = time.time() - t
    return {"read_s": round(read_s, 1), "encode_s": round(encode_s, 1), "l0": float((f != 0).sum(-1).float().mean())}


def logit_lens_at_gemma_scale(d_sae: int, d_model: int = 2304, vocab: int = 256_000, slice_latents: int = 1024) -> dict:
    from types import SimpleNamespace
    from .logit_lens import logit_lens
    g = torch.Generator().manual_seed(0)
    unembed = torch.nn.Linear(d_model, vocab, bias=False)
    torch.nn.init.normal_(unembed.weight, generator=g)
    norm = SimpleNamespace(weight=torch.zeros(d_model))
    model = torch.nn.Module()
    model.lm_head = unembed
    model.model = SimpleNamespace(norm=norm)
    model.get_output_embeddings = lambda: unembed
    W_dec = torch.randn(slice_latents, d_model, generator=g)
    t = time.time()
    logit_lens(model, W_dec, 0, "mlp_out", 10, progress=False)
    s = time.time() - t
    return {"latents_timed": slice_latents, "seconds": round(s, 1), "scaled_to_all_s": round(s * d_sae / slice_latents),
            "d_model": d_model, "vocab": vocab}


def page_timings(folder: Path, repeats: int = 3) -> dict:
    """The page's own timings (median of `repeats` page loads), without virtual time so that
    performance.now() measures real time."""
    if find_chromium() is None:
        return {"skipped": "no chromium"}
    from .chromium import _run, file_url
    runs = []
    for _ in range(repeats):
        html = _run(["--window-size=1400,900", "--dump-dom", file_url(f"{folder / 'index.html'}#bench=1&dead=show")],
                    timeout=300).stdout
        m = re.search(r'<pre id="bench-result">(.*?)</pre>', html, re.S)
        if not m:
            raise RuntimeError("the page wrote no bench result")
        runs.append(json.loads(m.group(1)))
    return {k: (float(np.median([r[k] for r in runs])) if isinstance(runs[0][k], (int, float)) else runs[0][k])
            for k in runs[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/features")
    p.add_argument("--latents", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=1_048_576)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--l0", type=float, default=64)
    p.add_argument("--page-latents", default="16384,131072")
    p.add_argument("--skip-logit-lens", action="store_true")
    a = p.parse_args(argv)
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
                           "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d")}

    run, cache = make_run(root, a.d_in, a.latents, a.tokens, a.l0)
    print(f"pass: {a.latents:,} latents, {a.tokens:,} held-out tokens, d_in {a.d_in}", flush=True)
    results["pass"] = {**build_in_subprocess(run, [f"max_tokens={a.tokens}"]), "d_in": a.d_in}
    results["pass"]["bare"] = bare_costs(run, cache, a.tokens)
    results["pass"]["imports_only_rss_mb"] = round(peak_rss_mb([sys.executable, "-c", "import evaluate.browser.build"])[1], 1)
    print(json.dumps(results["pass"]), flush=True)

    if not a.skip_logit_lens:
        results["logit_lens"] = logit_lens_at_gemma_scale(a.latents)
        print(json.dumps(results["logit_lens"]), flush=True)

    results["page"] = {}
    for w in [int(v) for v in a.page_latents.split(",") if v]:
        if w == a.latents:
            folder = run / "features"
        else:       # a big dictionary on few tokens: the page's cost depends on latents, not tokens
            small_run, _ = make_run(root, 64, w, 65_536, 32)
            build_in_subprocess(small_run, ["max_tokens=65536", "top_contexts=10", "sample_size=32"])
            folder = small_run / "features"
        results["page"][str(w)] = page_timings(folder)
        print(w, json.dumps(results["page"][str(w)]), flush=True)
    (root / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {root / 'bench.json'}")


if __name__ == "__main__":
    main()
