"""Compile every kernel for Hopper (sm_90) without a GPU and report what the compiler says.

`python -m kernels.compile_check` runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin, with the ptxas that ships in Triton's wheel) for each kernel at the block sizes
jumprelu_triton.py uses on CUDA, and prints per variant: registers, spill stores/loads, stack
frame, shared memory, whether the matrix products became Hopper warp-group MMAs (wgmma in the
PTX), and whether the main loop is software-pipelined: the depth of its multi-buffered shared
memory (leading dimension of the TTGIR's `ttg.local_alloc`), the async copies (`cp.async`, TMA
`cp.async.bulk`) in the PTX, and the most wgmma groups left in flight (`wgmma.wait_group N`).
It catches what the interpreter cannot (type errors of compiled Triton, shared memory over the
limit, spills, a main loop left unpipelined) at no device time. It says nothing about speed.

Each kernel is compiled for the specialization its launcher gets at the headline shape
(B=4096, d=2304, W=16384, contiguous operands): Triton's JIT turns an int argument equal to 1
into a constant and marks pointers and ints divisible by 16 as such (`tt.divisibility`). That
matters: without it a unit stride is unknown, every bf16 element is a separate 2-byte load,
cp.async (4, 8 or 16 bytes) cannot carry it, and the pipeliner leaves the GEMM main loops
single-buffered (32 KB of shared memory for the encoder instead of 72 KB). `--generic` compiles
the unspecialized kernels, for comparison.
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
# The headline shape (kernels/README.md); int arguments take their launch values at it.
B, D, W = 4096, 2304, 16384


def _launch_specialization(names, sig, const, ints):
    """Signature, constexprs and attrs as JITFunction builds them for these arguments (default
    specialization: no kernel here uses do_not_specialize): ints equal to 1 become constexprs,
    ints divisible by 16 and pointers get tt.divisibility 16 (the launchers pass whole torch
    allocations, 256-byte aligned, or transposed views of them). Floats are not specialized."""
    const = dict(const)
    attrs = {}
    for i, n in enumerate(names):
        if n in const:
            continue
        if sig[n].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif sig[n] == "i32":
            v = ints[n]
            if v == 1:
                const[n] = 1
            elif v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return {n: "constexpr" if n in const else sig[n] for n in names}, const, attrs


def _variants():
    """(label, kernel, signature, constexprs, options, int arguments at launch) at the CUDA
    block sizes."""
    from . import dense_matmul, entry_grad, jumprelu_encode, latent_grads, latent_transpose
    from . import list_compact, oracle_matmul, sparse_decode
    from .jumprelu_triton import CUDA_BLOCKS as bk
    i32, f32 = "i32", "fp32"
    out = []
    # The encoder grid on a 132-SM H100 (jumprelu_triton._blocks, jumprelu_encode).
    def cdiv(a, b):
        return -(-a // b)
    n_seg = max(1, min(cdiv(W, bk.enc_n), cdiv(2 * 132, cdiv(B, bk.enc_m))))
    seg_width = cdiv(cdiv(W, n_seg), bk.enc_n) * bk.enc_n
    for op, prec in (("bf16", "ieee"), ("fp32", "tf32")):
        for dense in (False, True):
            sig = dict(x_ptr=f"*{op}", w_ptr=f"*{op}", b_ptr="*fp32", theta_ptr="*fp32",
                       pre_ptr="*fp32", keep_ptr="*i32", col_cnt_ptr="*i32",
                       fire_cnt_ptr="*i32", f_ptr=f"*{op}", B=i32, D=i32, W=i32, seg_width=i32,
                       half_bandwidth=f32, stride_xb=i32, stride_xd=i32, stride_wd=i32,
                       stride_wn=i32)
            const = dict(DENSE_F=dense, BLOCK_M=bk.enc_m, BLOCK_N=bk.enc_n,
                         BLOCK_K=bk.enc_k, INPUT_PRECISION=prec)
            ints = dict(B=B, D=D, W=W, seg_width=seg_width, stride_xb=D, stride_xd=1,
                        stride_wd=W, stride_wn=1)
            out.append((f"jumprelu_encode {op}{' dense_f' if dense else ''}",
                        jumprelu_encode.jumprelu_encode_kernel, sig, const,
                        dict(num_warps=bk.enc_warps, num_stages=bk.enc_stages), ints))
    for op in ("bf16", "fp32"):
        sig = dict(list_idx_ptr="*i32", pre_ptr="*fp32", list_cnt_ptr="*i32",
                   theta_ptr="*fp32", w_dec_ptr=f"*{op}", b_dec_ptr="*fp32", x_ptr="*fp32",
                   x_hat_ptr="*fp32", sq_err_ptr="*fp32", l0_tok_ptr="*i32", D=i32, W=i32,
                   stride_wn=i32, stride_wd=i32, stride_xb=i32, stride_xd=i32,
                   stride_hb=i32, stride_hd=i32)
        gather = dict(num_warps=bk.gather_warps)
        ints = dict(D=D, W=W, stride_wn=D, stride_wd=1, stride_xb=D, stride_xd=1,
                    stride_hb=D, stride_hd=1)
        out.append((f"sparse_decode {op}", sparse_decode.sparse_decode_kernel, sig,
                    dict(BLOCK_E=bk.entries, BLOCK_D=bk.feat), gather, ints))
        sig = dict(list_idx_ptr="*i32", list_cnt_ptr="*i32", g_ptr=f"*{op}", w_dec_ptr=f"*{op}",
                   df_ptr="*fp32", D=i32, W=i32,
                   stride_gb=i32, stride_gd=i32, stride_wn=i32, stride_wd=i32)
        ints = dict(D=D, W=W, stride_gb=D, stride_gd=1, stride_wn=D, stride_wd=1)
        out.append((f"entry_grad {op}", entry_grad.entry_grad_kernel, sig,
                    dict(BLOCK_E=bk.entries, BLOCK_D=bk.feat), gather, ints))
        # The paper's recipe (sparse and dense paths), and the straight-through gradient to the
        # inputs with per-token and per-latent coefficients (Anthropic; Gemma Scope 2's penalties).
        for weights, ste, coefs in ((True, False, False), (False, False, False), (True, True, True),
                                    (False, True, True)):
            sig = dict(latent_src_ptr="*i32", col_ptr_ptr="*i32", col_tot_ptr="*i32",
                       pre_ptr="*fp32", df_ptr="*fp32", theta_ptr="*fp32",
                       c0_ptr="*fp32", t_ptr="*fp32", u_ptr="*fp32", x_ptr=f"*{op}", g_ptr=f"*{op}",
                       dw_enc_ptr="*fp32", dw_dec_ptr="*fp32", db_enc_ptr="*fp32", near_df_ptr="*fp32",
                       near_coef_ptr="*fp32",
                       D=i32, W=i32, half_bandwidth=f32, inv_bandwidth=f32,
                       stride_xb=i32, stride_xd=i32, stride_gb=i32, stride_gd=i32)
            name = (f"latent_grads {op}{'' if weights else ' dtheta only'}"
                    f"{' +ste_to_input +coefficients' if ste else ''}")
            out.append((name, latent_grads.latent_grads_kernel, sig,
                        dict(WEIGHT_GRADS=weights, STE_TO_INPUT=ste, HAS_T=coefs, HAS_U=coefs,
                             BLOCK_L=bk.latents, BLOCK_T=bk.tokens, BLOCK_D=bk.feat), gather,
                        dict(D=D, W=W, stride_xb=D, stride_xd=1, stride_gb=D, stride_gd=1)))
    sig = dict(keep_ptr="*i32", list_idx_ptr="*i32", list_cnt_ptr="*i32", W=i32, n_words=i32)
    out.append(("list_compact", list_compact.list_compact_kernel, sig,
                dict(BLOCK_W=bk.words), dict(num_warps=bk.gather_warps),
                dict(W=W, n_words=W // 32)))
    sig = dict(keep_ptr="*i32", col_start_ptr="*i32", latent_src_ptr="*i32", B=i32, W=i32,
               n_words=i32)
    out.append(("latent_transpose", latent_transpose.latent_transpose_kernel, sig,
                dict(ROWS_PER_BLOCK=bk.enc_m, BLOCK_W=bk.words),
                dict(num_warps=bk.gather_warps), dict(B=B, W=W, n_words=W // 32)))
    # The yardstick: the plain tutorial matmul at the encoder's tiles, dtypes, warps and stages.
    sig = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*fp32", M=i32, N=i32, K=i32,
               stride_am=i32, stride_ak=i32, stride_bk=i32, stride_bn=i32, stride_cm=i32,
               stride_cn=i32)
    out.append(("oracle_matmul bf16 (encoder tiles)", oracle_matmul.oracle_matmul_kernel, sig,
                dict(BLOCK_M=bk.enc_m, BLOCK_N=bk.enc_n, BLOCK_K=bk.enc_k, GROUP_M=8),
                dict(num_warps=bk.enc_warps, num_stages=bk.enc_stages),
                dict(M=B, N=W, K=D, stride_am=D, stride_ak=1, stride_bk=W, stride_bn=1,
                     stride_cm=W, stride_cn=1)))
    # The dense path's four products, with their operands' layouts (jumprelu_triton.py):
    # (name, epilogue, M, N, K, strides of A, B, C), the unused x/mask pointers being C.
    products = (
        ("decode", dense_matmul.EPILOGUE_DECODE, B, D, W, (W, 1), (D, 1), (D, 1)),   # f W_dec
        ("mask", dense_matmul.EPILOGUE_MASK, B, W, D, (D, 1), (1, D), (W, 1)),       # g W_dec^T
        ("plain x^T dpre", dense_matmul.EPILOGUE_PLAIN, D, W, B, (1, D), (W, 1), (W, 1)),
        ("plain f^T g", dense_matmul.EPILOGUE_PLAIN, W, D, B, (1, W), (D, 1), (D, 1)),
    )
    for op, prec in (("bf16", "ieee"), ("fp32", "tf32")):
        for name, epi, m, n, k, sa, sb, sc in products:
            c = "*fp32" if epi != dense_matmul.EPILOGUE_MASK else f"*{op}"
            sig = dict(a_ptr=f"*{op}", b_ptr=f"*{op}", c_ptr=c, bias_ptr="*fp32", x_ptr="*fp32",
                       mask_ptr=f"*{op}", part_ptr="*fp32", M=i32, N=i32, K=i32,
                       stride_am=i32, stride_ak=i32, stride_bk=i32, stride_bn=i32,
                       stride_cm=i32, stride_cn=i32, stride_xm=i32, stride_xn=i32,
                       stride_mm=i32, stride_mn=i32)
            ints = dict(M=m, N=n, K=k, stride_am=sa[0], stride_ak=sa[1], stride_bk=sb[0],
                        stride_bn=sb[1], stride_cm=sc[0], stride_cn=sc[1], stride_xm=sc[0],
                        stride_xn=sc[1], stride_mm=sc[0], stride_mn=sc[1])
            block_n = bk.mm_n if epi == dense_matmul.EPILOGUE_PLAIN else bk.mm_epi_n
            out.append((f"dense_matmul {op} {name}", dense_matmul.dense_matmul_kernel, sig,
                        dict(EPILOGUE=epi, INPUT_PRECISION=prec, BLOCK_M=bk.mm_m,
                             BLOCK_N=block_n, BLOCK_K=bk.mm_k, GROUP_M=bk.mm_group),
                        dict(num_warps=bk.mm_warps, num_stages=bk.mm_stages), ints))
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


def _pipelining(ttgir: str, ptx: str) -> dict:
    """Evidence of a software-pipelined main loop: buffers = the deepest multi-buffered shared
    allocation (leading dimension of a rank-3 memdesc; 0 when every allocation is a single
    tile), cp_async = async global->shared copies in the PTX (cp.async or TMA cp.async.bulk),
    wgmma_pending = the most wgmma groups a wait leaves in flight (> 0: the next k-step's MMAs
    overlap the previous ones instead of draining the tensor cores every step)."""
    bufs = [int(m) for m in re.findall(r"ttg\.local_alloc[^\n]*?memdesc<(\d+)x\d+x\d+x", ttgir)]
    waits = [int(m) for m in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    copies = re.findall(r"\bcp\.async\.(?:ca|cg|bulk)\.(?:shared|tensor)", ptx)
    return dict(buffers=max(bufs, default=0), cp_async=len(copies),
                wgmma_pending=max(waits, default=0))


def compile_all(arch: int = 90, generic: bool = False) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    rows = []
    for label, kernel, sig, const, options, ints in _variants():
        names = list(kernel.arg_names)
        missing = set(names) - set(sig) - set(const)
        assert not missing, (label, missing)
        if generic:
            signature, attrs = {n: sig.get(n, "constexpr") for n in names}, {}
        else:
            signature, const, attrs = _launch_specialization(names, sig, const, ints)
        src = ASTSource(fn=kernel, signature=signature,
                        constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                           compiled.asm.get("ptxas_log", "") or "")
        row = dict(kernel=label, shared=compiled.metadata.shared, wgmma="wgmma" in ptx,
                   mma=bool(re.search(r"\bmma\.sync", ptx)), num_stages=options.get("num_stages"),
                   **_pipelining(compiled.asm["ttgir"], ptx),
                   **_resource_usage(compiled.asm["cubin"]))
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
    rows = compile_all(generic="--generic" in sys.argv)
    if "--json" in sys.argv:
        print("JSON " + json.dumps(rows))
    print(f"{'kernel':<36} {'regs':>5} {'stack':>6} {'local':>6} {'shared':>7} {'wgmma':>6} "
          f"{'bufs':>5} {'cp.async':>8} {'wg_pend':>7}")
    for r in rows:
        print(f"{r['kernel']:<36} {r['reg']!s:>5} {r['stack']!s:>6} {r['local']!s:>6} "
              f"{r['shared']:>7} {str(r['wgmma']):>6} {r['buffers']:>5} {r['cp_async']:>8} "
              f"{r['wgmma_pending']:>7}")
    bad = [r["kernel"] for r in rows if r["shared"] > SHARED_LIMIT]
    if bad:
        print("over the shared-memory limit:", bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
