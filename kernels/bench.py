"""Benchmark of the fused JumpReLU SAE op (`make bench` runs `python -m kernels.bench`).

For each shape of DESIGN.md ("The kernel contract") it measures, in one run:
  - forward+backward of the fused op (auto path, and each of the sparse and dense paths)
    against PyTorch eager autograd of the same function (kernels.reference) and `torch.compile`
    of it, all with bf16 operands;
  - the floor: the encoder GEMM timed in cuBLAS (torch.matmul, bf16) plus reading W_enc and W_dec
    and writing their gradients once (fp32 master weights) at the measured copy bandwidth;
  - the whole training step (Adam with betas (0, 0.999), decoder gradient projection and row
    renormalisation) with the fused op (bf16) against eager (reference, fp32 master weights,
    TF32 matmuls allowed);
  - peak memory of each variant over a forward+backward.
Times are medians of many repetitions (triton.testing.do_bench, CUDA events). Results go to stdout
and to bench_out/kernels.json. Without a GPU it says so and exits 0; `--smoke` instead runs the
whole script on CPU at tiny shapes through Triton's interpreter (wall-clock medians, meaningless
as speeds) to check that the benchmark itself works.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

B = 4096
SHAPES = [  # (d, W, target L0)
    (2304, 16384, 20), (2304, 16384, 80), (2304, 16384, 200),
    (2304, 65536, 20), (2304, 65536, 80), (2304, 65536, 200),
    (3584, 131072, 80),
]
SMOKE_SHAPES = [(24, 96, 6), (24, 96, 40)]
SMOKE_B = 40
BANDWIDTH = 1e-3
LAM = 1e-3
TARGETS = {"vs_eager": 3.0, "vs_compile": 2.0, "vs_floor": 1.5}   # at d=2304, W=16384, L0~80


def make_sae(batch, d, width, l0, device, seed=0):
    """Gemma Scope initialisation (W_enc = W_dec^T, unit decoder rows) with thresholds set so that
    each latent fires on about l0/width of the tokens of a calibration batch."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, d, generator=g).to(device)
    x = x / x.pow(2).sum(-1).mean().sqrt()                       # E||x||^2 = 1
    W_dec = torch.randn(width, d, generator=g).to(device)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.contiguous()
    b_enc = torch.zeros(width, device=device)
    b_dec = torch.zeros(d, device=device)
    keep = max(1, round(batch * l0 / width))                      # tokens per latent above theta
    theta = torch.empty(width, device=device)
    step = 8192
    for n0 in range(0, width, step):
        pre = x @ W_enc[:, n0:n0 + step]
        theta[n0:n0 + step] = pre.kthvalue(max(1, batch - keep), dim=0).values
    theta.clamp_(min=1e-6)
    return x, [W_enc, b_enc, theta, W_dec, b_dec]


class Timer:
    def __init__(self, device, quick):
        self.cuda = device.type == "cuda"
        self.quick = quick

    def __call__(self, fn, grads=None):
        if self.cuda:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=50 if not self.quick else 5,
                                           rep=300 if not self.quick else 20,
                                           grad_to_none=grads, return_mode="median")
        samples = []
        for i in range(4 if self.quick else 8):
            for p in grads or ():
                p.grad = None
            t = time.perf_counter()
            fn()
            if i:                                                  # first run compiles
                samples.append((time.perf_counter() - t) * 1e3)
        return statistics.median(samples)

    def peak_mib(self, fn, grads=None):
        if not self.cuda:
            return None
        for p in grads or ():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        for p in grads or ():
            p.grad = None
        return peak / 2**20


def measure_ceilings(device, timer):
    """Copy bandwidth (bytes read + written per second) and the floor's encoder GEMM come from
    the device itself, not the datasheet."""
    if device.type != "cuda":
        return {"copy_GBps": None}
    n = 1 << 28                                                    # 1 GiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return {"copy_GBps": 2 * n * 4 / (ms * 1e-3) / 1e9}


def fused_fn(x, params, mode, precision):
    from .jumprelu_triton import jumprelu_sae_triton

    def run():
        loss = jumprelu_sae_triton(x, *params, BANDWIDTH, LAM, precision=precision, mode=mode)[0]
        loss.backward()
    return run


def reference_fn(x, params, compiled=None):
    from .reference import jumprelu_sae_reference
    op = compiled or jumprelu_sae_reference

    def run():
        loss = op(x, *params, BANDWIDTH, LAM)[0]
        loss.backward()
    return run


def training_step(x, params, backend, precision):
    """One optimizer step as the trainer takes it, with DESIGN.md's decoder-norm constraint."""
    from . import jumprelu_sae
    W_enc, b_enc, theta, W_dec, b_dec = params
    opt = torch.optim.Adam(params, lr=7e-5, betas=(0.0, 0.999), eps=1e-8)
    kw = {"precision": precision} if backend == "triton" else {}

    def run():
        if backend == "triton":
            from .jumprelu_triton import jumprelu_sae_triton
            loss = jumprelu_sae_triton(x, *params, BANDWIDTH, LAM, **kw)[0]
        else:
            loss = jumprelu_sae(x, *params, bandwidth=BANDWIDTH, sparsity_coeff=LAM,
                                backend="reference").loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            rows = W_dec / W_dec.norm(dim=1, keepdim=True)
            W_dec.grad -= (W_dec.grad * rows).sum(1, keepdim=True) * rows
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))
            theta.clamp_(min=1e-6)
    return run


def leaves(params, dtype):
    return [p.detach().to(dtype).clone().requires_grad_(True) for p in params]


def bench_shape(batch, d, width, l0, device, timer, ceilings, smoke):
    from . import jumprelu_triton as jt
    row = {"B": batch, "d": d, "W": width, "target_l0": l0}
    x, params = make_sae(batch, d, width, l0, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    op_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    master = leaves(params, torch.float32)
    with torch.no_grad():
        row["l0"] = jt.jumprelu_sae_triton(x, *master, BANDWIDTH, LAM, precision=precision)[2].item()
    times, peaks = {}, {}
    for mode in ("auto", "sparse", "dense"):
        fn = fused_fn(x, master, mode, precision)
        times[f"fused_{mode}"] = timer(fn, master)
        peaks[f"fused_{mode}"] = timer.peak_mib(fn, master)
    low = leaves(params, op_dtype)
    x_low = x.to(op_dtype)
    fn = reference_fn(x_low, low)
    times["eager"] = timer(fn, low)
    peaks["eager"] = timer.peak_mib(fn, low)
    try:
        from .reference import jumprelu_sae_reference
        compiled = torch.compile(jumprelu_sae_reference, backend="aot_eager" if smoke else "inductor")
        fn = reference_fn(x_low, low, compiled)
        times["compile"] = timer(fn, low)
        peaks["compile"] = timer.peak_mib(fn, low)
    except Exception as e:                                        # reported, not hidden
        times["compile"] = None
        row["compile_error"] = f"{type(e).__name__}: {e}"[:300]
    if device.type == "cuda":
        xe, we = x.to(torch.bfloat16), master[0].detach().to(torch.bfloat16)
        gemm_ms = timer(lambda: xe @ we)
        weight_bytes = 2 * d * width * 4                          # W_enc + W_dec, fp32
        io_ms = 2 * weight_bytes / (ceilings["copy_GBps"] * 1e9) * 1e3   # read + write grads
        row.update(encoder_gemm_ms=gemm_ms, encoder_gemm_TFLOPs=2 * batch * d * width / gemm_ms / 1e9,
                   weights_io_ms=io_ms)
        times["floor"] = gemm_ms + io_ms
    # Whole training step.
    step_master = leaves(params, torch.float32)
    times["step_fused"] = timer(training_step(x, step_master, "triton", precision))
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        step_master = leaves(params, torch.float32)
        times["step_eager"] = timer(training_step(x, step_master, "reference", None))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    row["ms"] = times
    row["peak_MiB"] = peaks
    f = times["fused_auto"]
    row["speedup"] = {
        "vs_eager": times["eager"] / f,
        "vs_compile": times["compile"] / f if times.get("compile") else None,
        "over_floor": f / times["floor"] if times.get("floor") else None,
        "step_vs_eager": times["step_eager"] / times["step_fused"],
    }
    return row


ENCODER_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first is the default
    (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
    (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
]


def breakdown(batch, d, width, l0, device, timer, smoke):
    """Time each stage of the fused op on its own (forward and backward kernels, casts, copies)
    and the encoder at several tile shapes, to see where the time goes and tune the encoder."""
    from . import jumprelu_triton as jt
    from .dense_matmul import EPILOGUE_DECODE, EPILOGUE_MASK, dense_matmul
    from .entry_grad import entry_grad
    from .jumprelu_encode import jumprelu_encode
    from .latent_grads import latent_grads
    from .latent_transpose import latent_transpose
    from .list_compact import list_compact
    from .sparse_decode import sparse_decode
    x, (W_enc, b_enc, theta, W_dec, b_dec) = make_sae(batch, d, width, l0, device)
    cuda = device.type == "cuda"
    op = torch.bfloat16 if cuda else torch.float32
    bk = jt.CUDA_BLOCKS if cuda else jt.INTERPRETER_BLOCKS
    blocks, n_seg = jt._blocks(batch, d, width, device)
    x_op, we, wd = x.to(op), W_enc.to(op), W_dec.to(op).contiguous()
    ms = {}
    ms["cast W_enc, W_dec to operand dtype"] = timer(lambda: (W_enc.to(op), W_dec.to(op)))
    if cuda:
        ms["cuBLAS x @ W_enc (bf16)"] = timer(lambda: x_op @ we)
    configs = ENCODER_CONFIGS if cuda else [(16, 32, 16, 4, 1), (32, 32, 16, 4, 1)]
    for bm, bn, bkk, warps, stages in configs:
        n_rb = -(-batch // bm)
        segs = max(1, min(-(-width // bn), -(-2 * (torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4) // n_rb)))
        try:
            ms[f"encode {bm}x{bn}x{bkk} w{warps} s{stages}"] = timer(lambda: jumprelu_encode(
                x_op, we, b_enc, theta, BANDWIDTH, n_seg=segs, block_m=bm, block_n=bn, block_k=bkk,
                num_warps=warps, num_stages=stages))
        except Exception as e:                                     # e.g. out of shared memory
            ms[f"encode {bm}x{bn}x{bkk} w{warps} s{stages}"] = f"{type(e).__name__}: {e}"[:120]
    enc_kw = dict(n_seg=n_seg, block_m=blocks.enc_m, block_n=blocks.enc_n, block_k=blocks.enc_k,
                  num_warps=blocks.enc_warps, num_stages=blocks.enc_stages)
    enc = jumprelu_encode(x_op, we, b_enc, theta, BANDWIDTH, **enc_kw)
    ms["list_compact"] = timer(lambda: list_compact(dict(enc), block_w=bk.words,
                                                    num_warps=bk.gather_warps))
    list_compact(enc, block_w=bk.words, num_warps=bk.gather_warps)
    enc_dense = jumprelu_encode(x_op, we, b_enc, theta, BANDWIDTH, dense_f=True, **enc_kw)
    ms["encode, dense f (default tiles)"] = timer(lambda: jumprelu_encode(
        x_op, we, b_enc, theta, BANDWIDTH, dense_f=True, **enc_kw))
    ms["sparse_decode"] = timer(lambda: sparse_decode(enc, theta, wd, b_dec, x, block_e=bk.entries,
                                                       block_d=bk.feat, num_warps=bk.gather_warps))
    mm = dict(block_m=bk.mm_m, block_k=bk.mm_k, group_m=bk.mm_group, num_warps=bk.mm_warps,
              num_stages=bk.mm_stages)
    ms["dense decode GEMM"] = timer(lambda: dense_matmul(enc_dense["f"], wd, epilogue=EPILOGUE_DECODE,
                                                         bias=b_dec, x=x, block_n=bk.mm_epi_n, **mm))
    g = torch.randn(batch, d, device=device) * 1e-4
    df = entry_grad(enc, g, wd, block_e=bk.entries, block_d=bk.feat, num_warps=bk.gather_warps)
    ms["entry_grad"] = timer(lambda: entry_grad(enc, g, wd, block_e=bk.entries, block_d=bk.feat,
                                                num_warps=bk.gather_warps))
    # (in the op the per-latent lists overwrite list_idx; here a separate buffer)
    latent = latent_transpose(enc, width, block_w=bk.words, num_warps=bk.gather_warps)
    ms["latent_transpose (+ scans)"] = timer(lambda: latent_transpose(
        enc, width, block_w=bk.words, num_warps=bk.gather_warps))
    c0 = torch.ones(1, device=device)
    ms["latent_grads"] = timer(lambda: latent_grads(*latent, enc, df, theta, c0, x_op, g, BANDWIDTH,
                                                    block_l=bk.latents, block_t=bk.tokens,
                                                    block_d=bk.feat,
                                                    num_warps=bk.gather_warps))
    g_op = g.to(op)
    ms["dense dpre GEMM (mask epilogue)"] = timer(lambda: dense_matmul(
        g_op, wd.t(), out_dtype=op, epilogue=EPILOGUE_MASK, mask=enc_dense["f"],
        block_n=bk.mm_epi_n, **mm))
    dpre = torch.randn(batch, width, device=device).to(op)
    ms["dense dW_enc GEMM"] = timer(lambda: dense_matmul(x_op.t(), dpre, block_n=bk.mm_n, **mm))
    ms["dense dW_dec GEMM"] = timer(lambda: dense_matmul(enc_dense["f"].t(), g_op, block_n=bk.mm_n, **mm))
    return {"B": batch, "d": d, "W": width, "target_l0": l0, "ms": ms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter: checks the script")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", type=int, default=None, help="index into the shape list")
    ap.add_argument("--skip-shapes", action="store_true", help="no per-shape comparison (with --breakdown)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each stage and encoder tile shapes at d=2304, W=16384, L0=80")
    ap.add_argument("--out", default="bench_out/kernels.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("kernels.bench: needs a CUDA GPU (none found); skipping. "
              "`python -m kernels.bench --smoke` checks the script on CPU.")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    batch, shapes = (SMOKE_B, SMOKE_SHAPES) if args.smoke else (B, SHAPES)
    if args.only is not None:
        shapes = [shapes[args.only]]
    if args.skip_shapes:
        shapes = []
    timer = Timer(device, args.quick or args.smoke)
    import triton
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "command": "python -m kernels.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "smoke": args.smoke, "bandwidth": BANDWIDTH, "lam": LAM}
    ceilings = measure_ceilings(device, timer)
    meta.update(ceilings)
    rows = []
    for d, width, l0 in shapes:
        row = bench_shape(batch, d, width, l0, device, timer, ceilings, args.smoke)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stages = None
    if args.breakdown:
        shape = (SMOKE_B, 24, 96, 6) if args.smoke else (B, 2304, 16384, 80)
        stages = breakdown(*shape, device, timer, args.smoke)
        print(json.dumps(stages), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows, "targets": TARGETS,
                               "breakdown": stages}, indent=2))
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}"
          + (f"  copy {ceilings['copy_GBps']:.0f} GB/s" if ceilings.get("copy_GBps") else ""))
    hdr = (f"{'d':>5} {'W':>7} {'L0':>6} | {'fused':>8} {'sparse':>8} {'dense':>8} {'eager':>8} "
           f"{'compile':>8} {'floor':>8} | {'x eager':>7} {'x comp':>7} {'/floor':>7} | "
           f"{'step f':>8} {'step e':>8} | {'MiB f':>7} {'MiB e':>7}")
    print(hdr)
    fmt = lambda v, w=8, p=3: f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
    for r in rows:
        t, s, m = r["ms"], r["speedup"], r["peak_MiB"]
        print(f"{r['d']:>5} {r['W']:>7} {r['l0']:>6.1f} | {fmt(t['fused_auto'])} {fmt(t['fused_sparse'])} "
              f"{fmt(t['fused_dense'])} {fmt(t['eager'])} {fmt(t.get('compile'))} {fmt(t.get('floor'))} | "
              f"{fmt(s['vs_eager'], 7, 2)} {fmt(s['vs_compile'], 7, 2)} {fmt(s['over_floor'], 7, 2)} | "
              f"{fmt(t['step_fused'])} {fmt(t['step_eager'])} | {fmt(m['fused_auto'], 7, 0)} {fmt(m['eager'], 7, 0)}")
    print(f"(times in ms, medians; targets at d=2304 W=16384 L0~80: >= {TARGETS['vs_eager']}x eager, "
          f">= {TARGETS['vs_compile']}x compile, <= {TARGETS['vs_floor']}x floor; wrote {out})")
    if stages:
        print(f"\nstages at B={stages['B']} d={stages['d']} W={stages['W']} L0~{stages['target_l0']} (ms):")
        for name, v in stages["ms"].items():
            print(f"  {name:<44} {v:>9.4f}" if isinstance(v, float) else f"  {name:<44} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
