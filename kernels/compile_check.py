"""Compile every kernel for Hopper (sm_90) without a GPU and report what the compiler says.

`python -m kernels.compile_check` runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin, with the ptxas that ships in Triton's wheel) for each kernel at the block sizes
jumprelu_triton.py uses on CUDA, and prints per variant: registers, spill stores/loads, stack
frame, shared memory, and whether the matrix products became Hopper warp-group MMAs (wgmma in
the PTX). It catches what the interpreter cannot (type errors of compiled Triton, shared memory
over the limit, spills) at no device time. It says nothing about speed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED_LIMIT = 227 * 1024          # per block on H100/H200


def _variants():
    """(label, kernel, signature, constexprs, options) at the CUDA block sizes."""
    from . import dense_matmul, entry_grad, jumprelu_encode, latent_grads, latent_transpose
    from . import list_compact, sparse_decode
    from .jumprelu_triton import CUDA_BLOCKS as bk
    i32, f32 = "i32", "fp32"
    out = []
    for op, prec in (("bf16", "ieee"), ("fp32", "tf32")):
        for dense in (False, True):
            sig = dict(x_ptr=f"*{op}", w_ptr=f"*{op}", b_ptr="*fp32", theta_ptr="*fp32",
                       pre_ptr="*fp32", keep_ptr="*i32", col_cnt_ptr="*i32",
                       fire_cnt_ptr="*i32", f_ptr=f"*{op}", B=i32, D=i32, W=i32, seg_width=i32,
                       half_bandwidth=f32, stride_xb=i32, stride_xd=i32, stride_wd=i32,
                       stride_wn=i32)
            const = dict(DENSE_F=dense, BLOCK_M=bk.enc_m, BLOCK_N=bk.enc_n,
                         BLOCK_K=bk.enc_k, INPUT_PRECISION=prec)
            out.append((f"jumprelu_encode {op}{' dense_f' if dense else ''}",
                        jumprelu_encode.jumprelu_encode_kernel, sig, const,
                        dict(num_warps=bk.enc_warps, num_stages=bk.enc_stages)))
    for op in ("bf16", "fp32"):
        sig = dict(list_idx_ptr="*i32", pre_ptr="*fp32", list_cnt_ptr="*i32",
                   theta_ptr="*fp32", w_dec_ptr=f"*{op}", b_dec_ptr="*fp32", x_ptr="*fp32",
                   x_hat_ptr="*fp32", sq_err_ptr="*fp32", D=i32, W=i32,
                   stride_wn=i32, stride_wd=i32, stride_xb=i32, stride_xd=i32,
                   stride_hb=i32, stride_hd=i32)
        gather = dict(num_warps=bk.gather_warps)
        out.append((f"sparse_decode {op}", sparse_decode.sparse_decode_kernel, sig,
                    dict(BLOCK_E=bk.entries, BLOCK_D=bk.feat), gather))
        sig = dict(list_idx_ptr="*i32", list_cnt_ptr="*i32", g_ptr=f"*{op}", w_dec_ptr=f"*{op}",
                   df_ptr="*fp32", D=i32, W=i32,
                   stride_gb=i32, stride_gd=i32, stride_wn=i32, stride_wd=i32)
        out.append((f"entry_grad {op}", entry_grad.entry_grad_kernel, sig,
                    dict(BLOCK_E=bk.entries, BLOCK_D=bk.feat), gather))
        for weights in (True, False):
            sig = dict(latent_src_ptr="*i32", col_ptr_ptr="*i32", col_tot_ptr="*i32",
                       pre_ptr="*fp32", df_ptr="*fp32", theta_ptr="*fp32",
                       c0_ptr="*fp32", x_ptr=f"*{op}", g_ptr=f"*{op}", dw_enc_ptr="*fp32",
                       dw_dec_ptr="*fp32", db_enc_ptr="*fp32", dtheta_ptr="*fp32", D=i32, W=i32,
                       half_bandwidth=f32, inv_bandwidth=f32,
                       stride_xb=i32, stride_xd=i32, stride_gb=i32, stride_gd=i32)
            out.append((f"latent_grads {op}{'' if weights else ' dtheta only'}",
                        latent_grads.latent_grads_kernel, sig,
                        dict(WEIGHT_GRADS=weights, BLOCK_L=bk.latents, BLOCK_T=bk.tokens,
                             BLOCK_D=bk.feat), gather))
    sig = dict(keep_ptr="*i32", list_idx_ptr="*i32", list_cnt_ptr="*i32", W=i32, n_words=i32)
    out.append(("list_compact", list_compact.list_compact_kernel, sig,
                dict(BLOCK_W=bk.words), dict(num_warps=bk.gather_warps)))
    sig = dict(keep_ptr="*i32", col_start_ptr="*i32", latent_src_ptr="*i32", B=i32, W=i32,
               n_words=i32)
    out.append(("latent_transpose", latent_transpose.latent_transpose_kernel, sig,
                dict(ROWS_PER_BLOCK=bk.enc_m, BLOCK_W=bk.words),
                dict(num_warps=bk.gather_warps)))
    for op, prec in (("bf16", "ieee"), ("fp32", "tf32")):
        for epi, name in ((dense_matmul.EPILOGUE_DECODE, "decode"),
                          (dense_matmul.EPILOGUE_MASK, "mask"),
                          (dense_matmul.EPILOGUE_PLAIN, "plain")):
            c = "*fp32" if epi != dense_matmul.EPILOGUE_MASK else f"*{op}"
            sig = dict(a_ptr=f"*{op}", b_ptr=f"*{op}", c_ptr=c, bias_ptr="*fp32", x_ptr="*fp32",
                       mask_ptr=f"*{op}", part_ptr="*fp32", M=i32, N=i32, K=i32,
                       stride_am=i32, stride_ak=i32, stride_bk=i32, stride_bn=i32,
                       stride_cm=i32, stride_cn=i32, stride_xm=i32, stride_xn=i32,
                       stride_mm=i32, stride_mn=i32)
            block_n = bk.mm_n if epi == dense_matmul.EPILOGUE_PLAIN else bk.mm_epi_n
            out.append((f"dense_matmul {op} {name}", dense_matmul.dense_matmul_kernel, sig,
                        dict(EPILOGUE=epi, INPUT_PRECISION=prec, BLOCK_M=bk.mm_m,
                             BLOCK_N=block_n, BLOCK_K=bk.mm_k, GROUP_M=bk.mm_group),
                        dict(num_warps=bk.mm_warps, num_stages=bk.mm_stages)))
    return out


def _resource_usage(cubin: bytes) -> dict:
    import triton
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        usage[key.lower()] = int(m.group(1)) if m else None
    return usage


def compile_all(arch: int = 90) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    rows = []
    for label, kernel, sig, const, options in _variants():
        names = list(kernel.arg_names)
        missing = set(names) - set(sig) - set(const)
        assert not missing, (label, missing)
        src = ASTSource(fn=kernel, signature={n: sig.get(n, "constexpr") for n in names},
                        constexprs={(names.index(k),): v for k, v in const.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                           compiled.asm.get("ptxas_log", "") or "")
        row = dict(kernel=label, shared=compiled.metadata.shared, wgmma="wgmma" in ptx,
                   mma=bool(re.search(r"\bmma\.sync", ptx)), **_resource_usage(compiled.asm["cubin"]))
        if spills:
            row.update(spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))
        rows.append(row)
    return rows


def main() -> int:
    # The interpreter must be off before triton is first imported; importing this package may
    # already have switched it on (no CUDA here), so run again in a fresh process.
    if os.environ.get("JUMPSCOPE_NO_INTERPRET") != "1":
        env = dict(os.environ, JUMPSCOPE_NO_INTERPRET="1", TRITON_INTERPRET="0")
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        return subprocess.run([sys.executable, "-m", "kernels.compile_check", *sys.argv[1:]],
                              env=env).returncode
    rows = compile_all()
    if "--json" in sys.argv:
        print("JSON " + json.dumps(rows))
    print(f"{'kernel':<36} {'regs':>5} {'stack':>6} {'local':>6} {'shared':>7} {'wgmma':>6}")
    for r in rows:
        print(f"{r['kernel']:<36} {r['reg']!s:>5} {r['stack']!s:>6} {r['local']!s:>6} "
              f"{r['shared']:>7} {str(r['wgmma']):>6}")
    bad = [r["kernel"] for r in rows if r["shared"] > SHARED_LIMIT]
    if bad:
        print("over the shared-memory limit:", bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
