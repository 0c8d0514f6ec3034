"""Device memory of the fused op's sparse bookkeeping, counted from its allocation code.

`python -m kernels.memory` prints, at the benchmark shapes and the CUDA block sizes, the bytes
the Triton backend allocates for the encoder's outputs, the per-token lists, df and the per-latent
lists: per (token, latent) slot and in total. The buffers are allocated on the meta device by the
same functions the launchers call (`*_buffers`), so the count cannot drift from the code. Not
counted: operands and outputs the op shares with eager (x, weights and their casts, x_hat,
gradients, and f on the dense path), and the int64 temporaries of the two small prefix sums.
Every buffer counted here is alive at once in the backward (the peak).
"""
from __future__ import annotations

import sys

import torch

SHAPES = [(4096, 2304, 16384), (4096, 3584, 131072)]
H100_SMS = 132


def list_buffers(B: int, D: int, W: int, n_sm: int = H100_SMS) -> dict[str, torch.Tensor]:
    """The op's list buffers at these shapes (meta tensors), by name."""
    from . import _interpret  # noqa: F401  (before triton)
    import triton
    from .entry_grad import entry_grad_buffers
    from .jumprelu_encode import encode_buffers
    from .jumprelu_triton import CUDA_BLOCKS as bk
    from .list_compact import compact_buffers
    dev = "meta"
    enc = encode_buffers(B, W, block_m=bk.enc_m, dtype=torch.bfloat16, device=dev)
    out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    out.update(compact_buffers(B, W, device=dev))   # list_idx, later the per-latent lists too
    out["df"] = entry_grad_buffers(B, W, device=dev)
    index_dtype = torch.int32 if B * W < 2**31 else torch.int64
    n_rb = triton.cdiv(B, bk.enc_m)
    out["col_start"] = torch.empty((n_rb, W), dtype=index_dtype, device=dev)
    out["col_ptr"] = torch.empty((W,), dtype=index_dtype, device=dev)
    out["col_tot"] = torch.empty((W,), dtype=index_dtype, device=dev)
    return out


def report(B: int, D: int, W: int) -> dict:
    bufs = list_buffers(B, D, W)
    sizes = {k: v.numel() * v.element_size() for k, v in bufs.items()}
    total = sum(sizes.values())
    return dict(B=B, D=D, W=W, bytes=total, bytes_per_slot=total / (B * W), buffers=sizes)


def main() -> int:
    for B, D, W in SHAPES:
        r = report(B, D, W)
        print(f"B={B} d={D} W={W}: {r['bytes'] / 1e9:.3f} GB ({r['bytes'] / 2**30:.3f} GiB), "
              f"{r['bytes_per_slot']:.4f} B per (token, latent) slot")
        for name, n in r["buffers"].items():
            print(f"    {name:<10} {n / 1e6:10.1f} MB  {n / (B * W):.4f} B/slot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
