"""The Triton backend of kernels.jumprelu_sae against the PyTorch reference computed in float64.

Without a GPU the kernels run through Triton's interpreter (kernels/_interpret.py switches it on):
fp32 and fp16 operands (the interpreter's bf16 dot is wrong, triton issue 11584). With a GPU the
same checks run compiled, plus bf16 and tf32.

Why the tolerances can be tight: operands are drawn already rounded to the operand precision, so
every product in the kernels is exact and the only error is fp32 accumulation, against a float64
reference on the very same values. The exception is by design: the backward rounds g (and the
dense path also f and dpre) to the operand precision, as operands of its products, so with fp16
or bf16 operands the bound is a few unit roundoffs of that precision (HALF_TOL) on every output
downstream of them; fp32 and tf32 keep the tight bound. Thresholds are placed (via b_enc) so that no pre-activation lies
within MARGIN of a decision boundary (theta, theta +- bandwidth/2), so no entry can flip sides
because of rounding; and so that some pre-activations fall inside the bandwidth window on both
sides of theta, which the threshold gradient must see.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import jumprelu_encode as enc_mod
from kernels import jumprelu_triton as jt
from kernels.reference import jumprelu_sae_reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")

BANDWIDTH = 0.25
MARGIN = 1e-3            # pre-activations are O(1); fp32 accumulation errors are ~1e-6
REL_TOL = 2e-5           # normwise relative error, fp32 accumulation of exact products
UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
HALF_TOL = 4             # x unit roundoff: g (and on the dense path f, dpre) rounded to fp16/bf16
OPERAND_DTYPE = {"fp32": torch.float16, "fp16": torch.float16, "tf32": torch.float16,
                 "bf16": torch.bfloat16}  # fp16-rounded values are exact in fp32 and tf32 too


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(torch.float32)


def make_problem(B, D, W, regime, precision, seed, device=DEVICE):
    """Random SAE inputs whose pre-activations keep MARGIN away from every decision boundary.

    regime: "none" (L0 = 0), "sparse" (~8% active), "half", "dense" (every latent active),
    "mixed" (a random active fraction per latent).
    """
    g = torch.Generator().manual_seed(seed)
    rdt = OPERAND_DTYPE[precision]
    x = rounded(torch.randn(B, D, generator=g), rdt)
    W_enc = rounded(torch.randn(D, W, generator=g) / D ** 0.5, rdt)
    W_dec = rounded(torch.randn(W, D, generator=g) / D ** 0.5, rdt)
    b_dec = torch.randn(D, generator=g) * 0.1
    theta = torch.rand(W, generator=g) * 0.2 + 0.05
    z = x.double() @ W_enc.double()
    half = BANDWIDTH / 2
    if regime == "none":
        # The largest pre lands inside the window but below theta: L0 = 0, dtheta still non-zero.
        target = z.max(0).values + half / 2
    elif regime == "dense":
        target = z.min(0).values - half / 2
    else:
        q = {"sparse": torch.full((W,), 0.08), "half": torch.full((W,), 0.5),
             "mixed": torch.rand(W, generator=g)}[regime]
        target = torch.stack([torch.quantile(z[:, i], 1 - q[i].item()) for i in range(W)])
    b_enc = (theta.double() - target).float()
    for i in range(W):
        for _ in range(200):
            u = z[:, i] + b_enc[i].double() - theta[i].double()
            if ((u.abs() > MARGIN) & ((u.abs() - half).abs() > MARGIN)).all():
                break
            b_enc[i] += (torch.rand((), generator=g).item() - 0.5) * 10 * MARGIN
        else:
            raise RuntimeError("could not place a threshold away from the boundaries")
    params = [W_enc, b_enc, theta, W_dec, b_dec]
    return x.to(device), [p.to(device) for p in params]


def objective_weights(B, D, seed):
    """Random weights on every output, so that each of the four incoming gradients is exercised."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(3, generator=g) + 0.5, torch.randn(B, D, generator=g) * 0.05


def run(fn, x, params, lam, weights, dtype, **kw):
    ps = [p.detach().to(dtype).requires_grad_(True) for p in params]
    (a, R) = weights
    loss, mse, l0, x_hat, firings = fn(x.to(dtype), *ps, BANDWIDTH, lam, return_firings=True, **kw)
    total = a[0] * loss + a[1] * mse + a[2] * l0 + (x_hat * R.to(x_hat)).sum()
    total.backward()
    return dict(loss=loss, mse=mse, l0=l0, x_hat=x_hat, firings=firings, W_enc=ps[0].grad, b_enc=ps[1].grad,
                threshold=ps[2].grad, W_dec=ps[3].grad, b_dec=ps[4].grad)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all(), "non-finite values (unwritten poisoned elements?)"
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(jt, "POISON_BUFFERS", True)


def tolerance(precision, mode, name):
    """Normwise relative tolerance of output `name`."""
    if precision not in UNIT_ROUNDOFF:
        return REL_TOL
    rounded_in_forward = mode == "dense"            # f rounded before the dense decode GEMM
    if name in ("loss", "mse", "x_hat") and not rounded_in_forward:
        return REL_TOL
    return HALF_TOL * UNIT_ROUNDOFF[precision]


def check_against_reference(B, D, W, regime, precision, seed, mode, lam=0.6):
    x, params = make_problem(B, D, W, regime, precision, seed)
    weights = objective_weights(B, D, seed)
    got = run(jt.jumprelu_sae_triton, x, params, lam, weights, torch.float32, precision=precision,
              mode=mode)
    want = run(jumprelu_sae_reference, x.cpu(), [p.cpu() for p in params], lam, weights,
               torch.float64)
    # L0 and the firings per latent are counts: they must be exact, and in the regime asked for.
    assert got["l0"].item() == pytest.approx(want["l0"].item(), abs=1e-6)
    assert got["firings"].dtype == torch.int64 and torch.equal(got["firings"].cpu(), want["firings"])
    if regime == "none":
        assert want["l0"].item() == 0
    if regime == "dense":
        assert want["l0"].item() == W
    # The threshold gradient must come from real window entries, else the check is vacuous.
    assert want["threshold"].abs().max() > 0
    for name in ("loss", "mse", "x_hat", "W_enc", "b_enc", "threshold", "W_dec", "b_dec"):
        if name in ("W_enc", "b_enc", "W_dec") and regime == "none":
            assert got[name].abs().max().item() == 0, name  # nothing active: exactly zero
            continue
        err, tol = rel_err(got[name], want[name]), tolerance(precision, mode, name)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"
    for name in ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"):
        assert got[name].shape == want[name].shape and got[name].dtype == torch.float32


# Shapes deliberately not multiples of the interpreter's 16-wide blocks or 8-long chunks.
CPU_CASES = [
    (37, 19, 70, "none", 1), (29, 23, 53, "sparse", 2), (41, 17, 67, "half", 3),
    (23, 21, 45, "dense", 4), (33, 18, 61, "mixed", 5),
]


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("B,D,W,regime,seed", CPU_CASES)
def test_triton_matches_float64_reference(poisoned, B, D, W, regime, seed, precision, mode):
    check_against_reference(B, D, W, regime, precision, seed, mode)


def run_with_counts(fn, x, params, lam, weights, dtype, ste_to_input, **kw):
    """Like `run`, with the per-token L0 and per-latent firing counts also in the objective (random
    weights T, U: the coefficients quadratic and frequency penalties hand the kernel) and the
    straight-through gradient to the inputs on or off."""
    ps = [p.detach().to(dtype).requires_grad_(True) for p in params]
    (a, R), (T, U) = weights
    loss, mse, l0, x_hat, firings, l0_tokens, fire_counts = fn(
        x.to(dtype), *ps, BANDWIDTH, lam, return_counts=True, ste_to_input=ste_to_input, **kw)
    total = (a[0] * loss + a[1] * mse + a[2] * l0 + (x_hat * R.to(x_hat)).sum()
             + (l0_tokens * T.to(l0_tokens)).sum() + (fire_counts * U.to(fire_counts)).sum())
    total.backward()
    return dict(loss=loss, x_hat=x_hat, l0_tokens=l0_tokens, fire_counts=fire_counts, W_enc=ps[0].grad,
                b_enc=ps[1].grad, threshold=ps[2].grad, W_dec=ps[3].grad, b_dec=ps[4].grad)


@pytest.mark.parametrize("ste_to_input", [False, True])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("B,D,W,regime,seed", [(33, 18, 61, "mixed", 5)])
def test_triton_counts_and_ste_to_input_match_float64_reference(poisoned, B, D, W, regime, seed, mode,
                                                                 ste_to_input):
    x, params = make_problem(B, D, W, regime, "fp32", seed)
    g = torch.Generator().manual_seed(seed + 2)
    weights = (objective_weights(B, D, seed), (torch.randn(B, generator=g), torch.randn(W, generator=g)))
    got = run_with_counts(jt.jumprelu_sae_triton, x, params, 0.4, weights, torch.float32, ste_to_input,
                          precision="fp32", mode=mode)
    want = run_with_counts(kernels.jumprelu_sae_reference, x.cpu(), [p.cpu() for p in params], 0.4, weights,
                           torch.float64, ste_to_input)
    assert torch.equal(got["l0_tokens"].cpu().double(), want["l0_tokens"])
    assert torch.equal(got["fire_counts"].cpu().double(), want["fire_counts"])
    for name in ("loss", "x_hat", "W_enc", "b_enc", "threshold", "W_dec", "b_dec"):
        err = rel_err(got[name], want[name])
        assert err < REL_TOL, f"{name}: relative error {err:.3g}"
    if ste_to_input:   # the straight-through term must reach the encoder, or this checks nothing new
        plain = run_with_counts(kernels.jumprelu_sae_reference, x.cpu(), [p.cpu() for p in params], 0.4,
                                weights, torch.float64, False)
        assert rel_err(plain["W_enc"], want["W_enc"]) > 1e-3


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_triton_is_deterministic(poisoned, mode):
    x, params = make_problem(31, 19, 58, "mixed", "fp32", 7)
    weights = objective_weights(31, 19, 7)
    a = run(jt.jumprelu_sae_triton, x, params, 0.3, weights, torch.float32, mode=mode)
    b = run(jt.jumprelu_sae_triton, x, params, 0.3, weights, torch.float32, mode=mode)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_auto_mode_follows_previous_density(monkeypatch):
    """Off CUDA, "auto" picks the path from the previous call's L0 / width of this SAE, also when
    the threshold tensor is a new one every call (log parametrisation)."""
    chosen = []
    forward = jt._forward
    monkeypatch.setattr(jt, "_forward", lambda *a: chosen.append(a[-1]) or forward(*a))
    x, params = make_problem(20, 17, 40, "dense", "fp32", 9)
    log_theta = params[2].log()
    for _ in range(2):
        jt.jumprelu_sae_triton(x, params[0], params[1], log_theta.exp(), *params[3:], BANDWIDTH,
                               0.1, mode="auto")
    x, sparse_params = make_problem(20, 17, 40, "none", "fp32", 9)
    params[1].copy_(sparse_params[1])   # same SAE, now nothing fires
    for _ in range(2):
        jt.jumprelu_sae_triton(x, params[0], params[1], log_theta.exp(), *params[3:], BANDWIDTH,
                               0.1, mode="auto")
    assert chosen == ["sparse", "dense", "dense", "sparse"]


def test_public_api_dispatches_to_triton(poisoned):
    x, params = make_problem(21, 17, 40, "sparse", "fp32", 11)
    out = kernels.jumprelu_sae(x, *params, bandwidth=BANDWIDTH, sparsity_coeff=0.5,
                               backend="triton")
    ref = kernels.jumprelu_sae(x.cpu().double(), *[p.cpu().double() for p in params],
                               bandwidth=BANDWIDTH, sparsity_coeff=0.5, backend="reference")
    assert rel_err(out.x_hat, ref.x_hat) < REL_TOL
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=REL_TOL)
    assert torch.equal(out.firings.cpu(), ref.firings) and ref.firings.sum() > 0


def test_encoder_lists(poisoned):
    """The encoder stores pre at exactly the active or near-threshold entries and marks them in its
    bitmask; the compacted per-token lists and the per-latent token lists hold exactly those
    entries, in increasing order."""
    from kernels.latent_transpose import latent_transpose
    from kernels.list_compact import list_compact
    x, (W_enc, b_enc, theta, _, _) = make_problem(35, 22, 75, "mixed", "fp32", 13)
    B, W = x.shape[0], W_enc.shape[1]
    enc = enc_mod.jumprelu_encode(x, W_enc, b_enc, theta, BANDWIDTH, n_seg=2, block_m=16,
                                  block_n=32, block_k=16, alloc=jt._alloc)
    list_compact(enc, block_w=1, alloc=jt._alloc)
    pre, active, kept = enc_mod.jumprelu_encode_reference(x, W_enc, b_enc, theta, BANDWIDTH)
    pre, active, kept = pre.cpu(), active.cpu(), kept.cpu()
    assert kept[:, 31::32].any(), "the sign bit of the bitmask words is not exercised"
    words = enc["keep"].cpu().long() & 0xFFFFFFFF
    bits = (words[:, :, None] >> torch.arange(32)) & 1
    assert torch.equal(bits.flatten(1)[:, :W].bool(), kept)
    assert not bits.flatten(1)[:, W:].any()
    assert torch.allclose(enc["pre"].cpu().double()[kept], pre[kept], atol=1e-5)
    assert torch.equal(enc["col_cnt"].cpu().sum(0), kept.sum(0).int())
    assert torch.equal(enc["fire_cnt"].cpu().sum(0), active.sum(0).int())
    assert torch.equal(enc["list_cnt"].cpu(), kept.sum(1).int())
    for b in range(B):
        n = enc["list_cnt"][b].item()
        assert torch.equal(enc["list_idx"][b, :n].cpu().long(), torch.nonzero(kept[b]).flatten())
    src, col_ptr, col_tot = latent_transpose(enc, W, block_w=1, out=enc["list_idx"],
                                             alloc=jt._alloc)
    assert torch.equal(col_tot.cpu(), kept.sum(0).to(col_tot.dtype))
    for n in range(W):
        tokens = src[col_ptr[n]:col_ptr[n] + col_tot[n]].cpu().long()
        assert torch.equal(tokens, torch.nonzero(kept[:, n]).flatten())


def test_list_memory_per_slot():
    """The op's bookkeeping costs 12 bytes per (token, latent) slot (pre, df, and one index list
    that holds the per-token lists in the forward and the per-latent lists in the backward) plus
    a bitmask and per-(row block, latent) counts: 12.31 bytes at the CUDA block sizes. The scan
    epilogue it replaced cost 16.4 (list_idx, list_pre, list_rank, latent_src)."""
    from kernels import memory
    for B, D, W in memory.SHAPES:
        r = memory.report(B, D, W)
        assert r["bytes_per_slot"] == pytest.approx(12.3145, abs=2e-3), r
    r = memory.report(4096, 2304, 16384)
    assert r["bytes"] < 0.83e9


def test_second_backward_raises():
    x, params = make_problem(12, 17, 20, "half", "fp32", 23)
    ps = [p.detach().requires_grad_(True) for p in params]
    loss = jt.jumprelu_sae_triton(x, *ps, BANDWIDTH, 0.1)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_empty_batch_falls_back():
    x, params = make_problem(3, 17, 20, "sparse", "fp32", 17)
    loss, mse, l0, x_hat = jt.jumprelu_sae_triton(x[:0], *params, BANDWIDTH, 0.1)
    assert x_hat.shape == (0, 17) and l0.item() == 0


def test_rejects_unknown_precision():
    x, params = make_problem(3, 17, 20, "sparse", "fp32", 19)
    with pytest.raises(ValueError):
        jt.jumprelu_sae_triton(x, *params, BANDWIDTH, 0.1, precision="int8")


# --- GPU: compiled kernels, production block sizes, bf16 and tf32 -------------------------------

GPU_CASES = [
    (300, 200, 1000, "sparse", 21), (517, 129, 700, "half", 22), (64, 2304, 3000, "mixed", 23),
    (130, 96, 333, "dense", 24), (257, 150, 900, "none", 25),
]


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "tf32", "fp32", "fp16"])
@pytest.mark.parametrize("B,D,W,regime,seed", GPU_CASES)
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_triton_matches_float64_reference_gpu(poisoned, B, D, W, regime, seed, precision, mode):
    # Operands drawn already bf16/fp16-rounded, so bf16 and tf32 dots are exact products with
    # fp32 accumulation; what is rounded to bf16/fp16 on purpose (g, and f and dpre on the dense
    # path) is held to 4 unit roundoffs of that precision, the rest to 2e-5 (tolerance()).
    check_against_reference(B, D, W, regime, precision, seed, mode)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sparse", "dense", "auto"])
def test_triton_gpu_deterministic_and_no_host_sync(poisoned, mode):
    x, params = make_problem(1000, 256, 2048, "mixed", "bf16", 31)
    a_w, R = objective_weights(1000, 256, 31)
    weights = (a_w.to(DEVICE), R.to(DEVICE))
    for _ in range(2):  # compile, and let "auto" measure and see the density once
        run(jt.jumprelu_sae_triton, x, params, 0.3, weights, torch.float32, mode=mode)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = run(jt.jumprelu_sae_triton, x, params, 0.3, weights, torch.float32, mode=mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    b = run(jt.jumprelu_sae_triton, x, params, 0.3, weights, torch.float32, mode=mode)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.skipif(ON_GPU, reason="checks the no-GPU behaviour")
def test_bench_without_gpu_exits_cleanly():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "kernels.bench"], capture_output=True, text=True,
                       timeout=120, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr
    assert "needs a CUDA GPU" in r.stdout
