"""Tensor-core GEMM C = A @ B with the epilogues of the dense (high-L0) path.

Used when f is too dense for gathers to pay (jumprelu_triton.py measures which path is faster):
    EPILOGUE_DECODE  x_hat = f @ W_dec + b_dec; writes x_hat and, per (token, column tile), the
                     partial squared error of x_hat - x
    EPILOGUE_MASK    dpre = (g @ W_dec^T) * H(pre - theta), H read as f != 0; writes dpre in C's
                     dtype and, per (row tile, latent), the partial column sum (for db_enc)
    EPILOGUE_PLAIN   C = A @ B in fp32 (dW_enc = x^T dpre, dW_dec = f^T g)
Transposed operands are strided views, no copies. One program per output tile with the whole K
loop (no split-K), so every element has one fixed summation order: same inputs, same bits.
"""
from __future__ import annotations

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl

EPILOGUE_PLAIN, EPILOGUE_DECODE, EPILOGUE_MASK = 0, 1, 2


@triton.jit
def dense_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, x_ptr, mask_ptr, part_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_xm, stride_xn, stride_mm, stride_mn,
    EPILOGUE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each column tile of B while it sits in L2.
    pid = tl.program_id(0)
    n_tm = tl.cdiv(M, BLOCK_M)
    n_tn = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_tn)
    first_m = group * GROUP_M
    group_size = tl.minimum(n_tm - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_tn)) % group_size
    pid_n = (pid % (GROUP_M * n_tn)) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = (k0 + ks).to(tl.int64)
        k_ok = k < K
        a = tl.load(a_ptr + rm64[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + rn64[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out_ok = m_ok[:, None] & n_ok[None, :]
    c_off = rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    if EPILOGUE == 1:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        x_hat = acc + bias[None, :]
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rn64[None, :] * stride_xn,
                    mask=out_ok, other=0.0).to(tl.float32)
        resid = tl.where(out_ok, x_hat - x, 0.0)
        tl.store(c_ptr + c_off, x_hat.to(c_ptr.dtype.element_ty), mask=out_ok)
        tl.store(part_ptr + rm64 * n_tn + pid_n, tl.sum(resid * resid, axis=1), mask=m_ok)
    elif EPILOGUE == 2:
        f = tl.load(mask_ptr + rm64[:, None] * stride_mm + rn64[None, :] * stride_mn,
                    mask=out_ok, other=0.0)
        dpre = tl.where(out_ok & (f != 0.0), acc, 0.0).to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + c_off, dpre, mask=out_ok)
        # db_enc is the column sum of dpre as stored (rounded), so it matches dW_enc's operand.
        tl.store(part_ptr + pid_m.to(tl.int64) * N + rn64, tl.sum(dpre.to(tl.float32), axis=0),
                 mask=n_ok)
    else:
        tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=out_ok)


def dense_matmul(a, b, *, out_dtype=torch.float32, epilogue=EPILOGUE_PLAIN, bias=None, x=None,
                 mask=None, block_m=128, block_n=128, block_k=64, group_m=8,
                 input_precision="ieee", num_warps=8, num_stages=3, alloc=torch.empty):
    """C = a @ b (+ epilogue). Returns C, and for DECODE/MASK also the partial sums."""
    M, K = a.shape
    K2, N = b.shape
    assert K == K2, (a.shape, b.shape)
    dev = a.device
    c = alloc((M, N), dtype=out_dtype, device=dev)
    n_tm, n_tn = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    part = None
    if epilogue == EPILOGUE_DECODE:
        part = alloc((M, n_tn), dtype=torch.float32, device=dev)
    elif epilogue == EPILOGUE_MASK:
        part = alloc((n_tm, N), dtype=torch.float32, device=dev)
    dummy = c
    xx = x if x is not None else dummy
    mm = mask if mask is not None else dummy
    dense_matmul_kernel[(n_tm * n_tn,)](
        a, b, c, bias if bias is not None else dummy, xx, mm, part if part is not None else dummy,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        xx.stride(0), xx.stride(1), mm.stride(0), mm.stride(1),
        EPILOGUE=epilogue, INPUT_PRECISION=input_precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages,
    )
    return c if part is None else (c, part)


def dense_matmul_reference(a, b):
    return a.double() @ b.double()
