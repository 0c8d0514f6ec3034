"""Triton backend of `kernels.jumprelu_sae`: the fused forward and the sparse STE backward.

Sparse path (L0 small against the width):
  forward   jumprelu_encode.py   encoder GEMM; epilogue: b_enc, threshold, firing counts, pre stored
                                 at the active and near-threshold entries only, keep bitmask (no scans)
            list_compact.py      per-token lists of the kept latents, from the bitmask
            sparse_decode.py     x_hat = f W_dec + b_dec by gathering decoder rows; residual, error
  backward  entry_grad.py        df = g W_dec^T at the kept entries only
            latent_transpose.py  per-latent token lists by a counting sort without atomics, written
                                 over the per-token lists (dead by then)
            latent_grads.py      dW_enc, dW_dec, db_enc, dtheta per latent, fixed summation order
Dense path (most latents on, e.g. at initialisation): the encoder also writes f (never pre) and
lists only near-threshold entries; decode and the weight gradients are tensor-core GEMMs with fused
epilogues (dense_matmul.py); dtheta still comes from the near-threshold lists.
Both: db_dec = sum_b g and the loss scalars are fixed-order torch reductions.

Which path: `mode="sparse"|"dense"` forces one. "auto" (default) on CUDA *measures* both on the
first call for a given shape and observed density bucket, and keeps the faster; the density is the
previous call's L0 for the same threshold tensor, read back through pinned memory only once the
copy has landed (never waiting on the device). No `.item()`, no allocation sized by device values:
a training step does not synchronise with the host (except that one-off measurement, as Triton's
own autotuner does). Same inputs, same bits: no atomics anywhere.

Matmul precision: "bf16" (default on CUDA: bf16 operands, fp32 accumulation), "fp16", "tf32", or
"fp32" (IEEE; the default off CUDA, i.e. under TRITON_INTERPRET=1). Set it with
`set_matmul_precision`, the environment variable JUMPSCOPE_MATMUL_PRECISION, or the keyword
argument. Parameters stay in their own dtype (fp32 master weights); gradients come back in it.
g, the operand of every backward product, is rounded to the operand precision (and, on the dense
path, f and dpre too, as operands of its GEMMs).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402

from .dense_matmul import EPILOGUE_DECODE, EPILOGUE_MASK, dense_matmul
from .entry_grad import entry_grad
from .jumprelu_encode import jumprelu_encode
from .latent_grads import latent_grads
from .list_compact import list_compact
from .latent_transpose import latent_transpose
from .reference import threshold_grad
from .sparse_decode import sparse_decode

PRECISIONS = {  # name -> (operand dtype, tl.dot input_precision)
    "bf16": (torch.bfloat16, "ieee"),
    "fp16": (torch.float16, "ieee"),
    "tf32": (torch.float32, "tf32"),
    "fp32": (torch.float32, "ieee"),
}
MODES = ("auto", "sparse", "dense")
_matmul_precision: str | None = os.environ.get("JUMPSCOPE_MATMUL_PRECISION") or None
_mode: str = os.environ.get("JUMPSCOPE_KERNEL_MODE") or "auto"

# Off CUDA there is nothing to measure: "auto" takes the dense path above this L0 / width.
CPU_DENSE_ABOVE = 0.25

# Tests set this to fill every buffer the kernels allocate with garbage (NaN, or -7777 for
# integers) so that an element a kernel forgot to write cannot pass as a plausible value.
POISON_BUFFERS = False


def set_matmul_precision(name: str | None) -> None:
    if name is not None and name not in PRECISIONS:
        raise ValueError(f"matmul precision {name!r}: choose one of {sorted(PRECISIONS)}")
    global _matmul_precision
    _matmul_precision = name


def set_mode(name: str) -> None:
    if name not in MODES:
        raise ValueError(f"mode {name!r}: choose one of {MODES}")
    global _mode
    _mode = name


def _alloc(shape, dtype, device):
    if not POISON_BUFFERS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -7777
    return torch.full(shape, fill, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Blocks:
    enc_m: int
    enc_n: int
    enc_k: int
    enc_warps: int
    enc_stages: int
    entries: int      # list entries per chunk in the gather kernels
    words: int        # keep-bitmask words (32 latents each) per chunk: list_compact, latent_transpose
    feat: int         # features per program / chunk in the gather kernels
    tokens: int       # tokens per chunk in the per-latent reduction
    latents: int      # latents per program in the per-latent reduction
    gather_warps: int
    mm_m: int         # dense GEMM tiles (plain epilogue)
    mm_n: int
    mm_k: int
    mm_group: int
    mm_warps: int
    mm_stages: int
    mm_epi_n: int     # column tile of the dense GEMMs with a decode or mask epilogue


# Chosen from `python -m kernels.compile_check` (sm_90 compiler report, no GPU needed): the
# largest tiles whose epilogues do not spill. The encoder (bitmask epilogue) does not spill at
# 64x128 (bf16 or tf32 operands); the tile against 128x128 and 128x256 is for a GPU to decide
# (kernels/README.md). The fused-epilogue GEMMs at 128x128 spilled 200-300 B, at 128x64 none;
# latent_grads with 32 tokens x 256 features 72 B, with 16 x 128 none. Not yet timed on a GPU.
CUDA_BLOCKS = Blocks(enc_m=64, enc_n=128, enc_k=64, enc_warps=8, enc_stages=3,
                     entries=32, words=8, feat=128, tokens=16, latents=16, gather_warps=4,
                     mm_m=128, mm_n=128, mm_k=64, mm_group=8, mm_warps=8, mm_stages=3, mm_epi_n=64)
# Small blocks so that the CPU tests exercise several tiles, segments and chunks (the encoder's
# column tile is at least one 32-latent bitmask word).
INTERPRETER_BLOCKS = Blocks(enc_m=16, enc_n=32, enc_k=16, enc_warps=4, enc_stages=1,
                            entries=8, words=1, feat=16, tokens=8, latents=4, gather_warps=4,
                            mm_m=16, mm_n=16, mm_k=16, mm_group=2, mm_warps=4, mm_stages=1,
                            mm_epi_n=16)


def _blocks(B: int, D: int, W: int, device: torch.device) -> tuple[Blocks, int]:
    """Block sizes and the number of column segments of the encoder grid."""
    if _interpreting() or device.type != "cuda":
        return INTERPRETER_BLOCKS, 2
    blocks = CUDA_BLOCKS
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    n_rb = triton.cdiv(B, blocks.enc_m)
    # Enough (row block, segment) programs to fill the chip twice; each segment walks its tiles.
    n_seg = max(1, min(triton.cdiv(W, blocks.enc_n), triton.cdiv(2 * n_sm, n_rb)))
    return blocks, n_seg


# --------------------------------------------------------------------------- forward / backward


def _forward(x, W_enc, b_enc, theta, W_dec, b_dec, bandwidth, lam, precision, ste_to_input, threshold_pool,
             mode):
    """Returns (loss, mse, l0, x_hat, firings, l0_tokens, fire_counts) and the state the backward needs."""
    op_dtype, input_precision = PRECISIONS[precision]
    B, D = x.shape
    W = W_enc.shape[1]
    blocks, n_seg = _blocks(B, D, W, x.device)
    dense = mode == "dense"
    x_op = x.to(op_dtype).contiguous()
    w_dec_op = W_dec.to(op_dtype).contiguous()
    theta_c = theta.contiguous()
    enc = jumprelu_encode(x_op, W_enc.to(op_dtype), b_enc.contiguous(), theta_c, bandwidth,
                          n_seg=n_seg, block_m=blocks.enc_m, block_n=blocks.enc_n,
                          block_k=blocks.enc_k, input_precision=input_precision,
                          num_warps=blocks.enc_warps, num_stages=blocks.enc_stages,
                          dense_f=dense, alloc=_alloc)
    list_compact(enc, block_w=blocks.words, num_warps=blocks.gather_warps, alloc=_alloc)
    out_dtype = W_dec.dtype
    if dense:
        x_hat, sq_err = dense_matmul(
            enc["f"], w_dec_op, out_dtype=out_dtype, epilogue=EPILOGUE_DECODE,
            bias=b_dec.contiguous(), x=x, block_m=blocks.mm_m, block_n=blocks.mm_epi_n,
            block_k=blocks.mm_k, group_m=blocks.mm_group, input_precision=input_precision,
            num_warps=blocks.mm_warps, num_stages=blocks.mm_stages, alloc=_alloc)
        l0_tok = (enc["f"] != 0).sum(1, dtype=torch.int32)   # f > 0 exactly where active (theta > 0)
    else:
        x_hat, sq_err, l0_tok = sparse_decode(enc, theta_c, w_dec_op, b_dec.contiguous(), x,
                                              block_e=blocks.entries, block_d=blocks.feat,
                                              num_warps=blocks.gather_warps, out_dtype=out_dtype,
                                              alloc=_alloc)
    mse = (sq_err.sum() / B).to(out_dtype)
    firings = enc["fire_cnt"].sum(0, dtype=torch.int64)
    l0 = (firings.sum().to(torch.float32) / B).to(out_dtype)
    loss = mse + lam * l0
    state = dict(x=x, x_op=x_op, x_hat=x_hat, theta=theta_c, w_dec_op=w_dec_op, enc=enc,
                 bandwidth=bandwidth, lam=lam, blocks=blocks, dense=dense, ste_to_input=ste_to_input,
                 threshold_pool=threshold_pool,
                 input_precision=input_precision, op_dtype=op_dtype)
    return (loss, mse, l0, x_hat, firings, l0_tok.to(out_dtype), firings.to(out_dtype)), state


def _backward(st, g_loss, g_mse, g_l0, g_xhat, g_l0_tokens=None, g_fire_counts=None):
    """Gradients (dW_enc, db_enc, dtheta, dW_dec, db_dec) in float32."""
    x, x_hat, enc, blocks = st["x"], st["x_hat"], st["enc"], st["blocks"]
    B, D = x.shape
    W = st["theta"].shape[0]
    zero = x_hat.new_zeros((), dtype=torch.float32)
    g_loss = zero if g_loss is None else g_loss.float()
    g_mse = zero if g_mse is None else g_mse.float()
    g_l0 = zero if g_l0 is None else g_l0.float()
    g = ((g_loss + g_mse) * (2.0 / B)) * (x_hat.float() - x.float())
    if g_xhat is not None:
        g = g + g_xhat.float()
    # g is an operand of every backward product: rounded to the operand dtype like x and W_dec
    # (fp32 accumulation throughout). In bf16 this also cuts the bytes the per-latent gathers move.
    g_op = g.to(st["op_dtype"]).contiguous()
    c0 = ((g_loss * st["lam"] + g_l0) / B).reshape(1)
    df = entry_grad(enc, g_op, st["w_dec_op"], block_e=blocks.entries, block_d=blocks.feat,
                    num_warps=blocks.gather_warps, alloc=_alloc)
    # entry_grad was the last reader of the per-token lists: the per-latent lists take their
    # memory (B x W slots each, so this saves 4 bytes per (token, latent) slot).
    list_buffer = enc.pop("list_idx")
    if POISON_BUFFERS:              # an unwritten slot must not pass as a stale latent index
        list_buffer.fill_(-7777)
    latent_src, col_ptr, col_tot = latent_transpose(enc, W, block_w=blocks.words,
                                                    num_warps=blocks.gather_warps,
                                                    out=list_buffer, alloc=_alloc)
    dense = st["dense"]
    t = None if g_l0_tokens is None else g_l0_tokens.float().contiguous()
    u = None if g_fire_counts is None else g_fire_counts.float().contiguous()
    dw_enc, dw_dec, db_enc, near_df, near_coef = latent_grads(
        latent_src, col_ptr, col_tot, enc, df, st["theta"], c0, st["x_op"], g_op,
        st["bandwidth"], block_l=blocks.latents, block_t=blocks.tokens, block_d=blocks.feat,
        num_warps=blocks.gather_warps, weight_grads=not dense, ste_to_input=st["ste_to_input"],
        t=t, u=u, alloc=_alloc)
    if st["threshold_pool"] is not None:
        near_df, near_coef = st["threshold_pool"](near_df, near_coef)
    dtheta = threshold_grad(st["theta"].float(), near_df, near_coef, st["bandwidth"])
    if dense:
        mm = dict(block_m=blocks.mm_m, block_n=blocks.mm_n, block_k=blocks.mm_k,
                  group_m=blocks.mm_group, input_precision=st["input_precision"],
                  num_warps=blocks.mm_warps, num_stages=blocks.mm_stages, alloc=_alloc)
        f = enc["f"]
        dpre, db_part = dense_matmul(g_op, st["w_dec_op"].t(), out_dtype=st["op_dtype"],
                                     epilogue=EPILOGUE_MASK, mask=f,
                                     **{**mm, "block_n": blocks.mm_epi_n})
        dw_enc_mask = dense_matmul(st["x_op"].t(), dpre, **mm)
        dw_dec = dense_matmul(f.t(), g_op, **mm)
        if st["ste_to_input"]:      # the near-threshold lists gave the straight-through parts
            dw_enc, db_enc = dw_enc_mask + dw_enc, db_part.sum(0) + db_enc
        else:
            dw_enc, db_enc = dw_enc_mask, db_part.sum(0)
    return dw_enc, db_enc, dtheta, dw_dec, g.sum(0)


class JumpReLUSAETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, theta, W_dec, b_dec, bandwidth, lam, precision, ste_to_input,
                threshold_pool, mode):
        outputs, state = _forward(x, W_enc, b_enc, theta, W_dec, b_dec, bandwidth, lam,
                                  precision, ste_to_input, threshold_pool, mode)
        # Parameters go through save_for_backward so that an in-place update between forward and
        # backward is caught; the kernels' own buffers ride on ctx.
        ctx.save_for_backward(theta, W_dec)
        ctx.state = state
        ctx.dtypes = (W_enc.dtype, b_enc.dtype, theta.dtype, W_dec.dtype, b_dec.dtype)
        ctx.mark_non_differentiable(outputs[4])
        return outputs

    @staticmethod
    def backward(ctx, g_loss, g_mse, g_l0, g_xhat, g_firings, g_l0_tokens, g_fire_counts):
        ctx.saved_tensors  # noqa: B018  (raises if a parameter was modified in place)
        if ctx.state is None:
            raise RuntimeError("the fused JumpReLU SAE op supports one backward per forward (its "
                               "buffers are consumed); run the forward again instead of "
                               "retain_graph=True")
        grads = _backward(ctx.state, g_loss, g_mse, g_l0, g_xhat, g_l0_tokens, g_fire_counts)
        ctx.state = None
        grads = [gr.to(dt) for gr, dt in zip(grads, ctx.dtypes)]
        return (None, *grads, None, None, None, None, None, None)


# --------------------------------------------------------------------------- path selection


class _Density:
    """L0 / width of the previous calls, per SAE, read without waiting on the device:
    the newest value whose device-to-host copy has landed (two pinned buffers, used in turn)."""

    def __init__(self):
        self.slots: dict = {}   # key -> [buffers, events, index of newest, width]

    def get(self, key):
        slot = self.slots.get(key)
        if slot is None:
            return None
        buffers, events, newest, width = slot
        for i in (newest, 1 - newest):
            if events[i] is None:
                continue
            if events[i] is True or events[i].query():
                return float(buffers[i][0]) / width
        return None

    def put(self, key, l0, width):
        cuda = l0.device.type == "cuda"
        slot = self.slots.get(key)
        if slot is None and len(self.slots) >= 256:        # forget the oldest SAE
            self.slots.pop(next(iter(self.slots)))
        if slot is None or slot[3] != width:
            buffers = [torch.empty(1, dtype=torch.float32, pin_memory=cuda) for _ in range(2)]
            slot = self.slots[key] = [buffers, [None, None], 1, width]
        i = 1 - slot[2]
        slot[0][i].copy_(l0.detach().float().reshape(1), non_blocking=cuda)
        if cuda:
            event = torch.cuda.Event()
            event.record()
            slot[1][i] = event
        else:
            slot[1][i] = True
        slot[2] = i


_density = _Density()
_decisions: dict = {}


def _density_bucket(density):
    if density is None:
        return None
    return round(math.log2(max(density, 1e-6)) * 2) / 2   # half-octave buckets


def _measure(args) -> str:
    """Time forward + backward of both paths on these inputs; return the faster."""
    times = {}
    for mode in ("sparse", "dense"):
        def step():
            outputs, state = _forward(*args[:-1], None, mode)   # no pooling while measuring
            ones = outputs[0].new_ones(())
            _backward(state, ones, None, None, None)
        step()                                   # compiles
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(3):
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        times[mode] = sorted(samples)[1]
    return min(times, key=times.get)


def _sae_key(W_enc):
    # W_enc is a parameter updated in place: its storage identifies the SAE across steps (the
    # threshold may be recomputed every step, e.g. exp of a log parametrisation).
    return (W_enc.data_ptr(), W_enc.device, tuple(W_enc.shape))


def _choose_mode(x, W_enc, args) -> str:
    W = W_enc.shape[1]
    density = _density.get(_sae_key(W_enc))
    if not x.is_cuda:
        return "dense" if density is not None and density > CPU_DENSE_ABOVE else "sparse"
    key = (x.shape[0], x.shape[1], W, args[-3], args[-2], x.device.index, _density_bucket(density))
    if key not in _decisions:
        _decisions[key] = _measure(args)
    return _decisions[key]


def jumprelu_sae_triton(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth=1e-3, lam=0.0,
                        precision: str | None = None, mode: str | None = None,
                        return_firings: bool = False, ste_to_input: bool = False,
                        return_counts: bool = False, threshold_pool=None):
    """(loss, mse, l0, x_hat), and firings (int64 [W]: tokens on which each latent fired) with
    return_firings, and the differentiable counts (l0_tokens [B], fire_counts [W]) with
    return_counts (kernels/reference.py); differentiable in W_enc, b_enc, threshold, W_dec, b_dec."""
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, d_in], got shape {tuple(x.shape)}")
    if not (bandwidth > 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be positive and finite, got {bandwidth}")
    if x.shape[0] == 0:
        from .reference import jumprelu_sae_reference
        return jumprelu_sae_reference(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth, lam,
                                      return_firings=return_firings, ste_to_input=ste_to_input,
                                      return_counts=return_counts, threshold_pool=threshold_pool)
    precision = precision or _matmul_precision or ("bf16" if x.is_cuda else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision {precision!r}: choose one of {sorted(PRECISIONS)}")
    mode = mode or _mode
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {MODES}")
    args = (x, W_enc, b_enc, threshold, W_dec, b_dec, float(bandwidth), float(lam), precision, bool(ste_to_input),
            threshold_pool)
    if mode == "auto":
        with torch.no_grad():
            mode = _choose_mode(x, W_enc, args)
    out = JumpReLUSAETriton.apply(*args, mode)
    _density.put(_sae_key(W_enc), out[2], W_enc.shape[1])
    if return_counts:
        return out
    return out[:5] if return_firings else out[:4]
