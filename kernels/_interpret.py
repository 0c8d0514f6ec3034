"""Import before `triton` in every kernel module: without CUDA, Triton kernels can only run
through Triton's interpreter (TRITON_INTERPRET=1).

Triton decides interpreted-or-compiled per @jit function when the function is defined, including
its own library functions (tl.sum, tl.cumsum, ...) when `triton` is first imported. If something
imported triton before us with the interpreter off (loading transformers' Gemma 2 classes does,
through torch._dynamo), those library functions are compiled-mode objects that an interpreted
kernel cannot call. In that case, without CUDA, rebuild them as interpreted functions.
JUMPSCOPE_NO_INTERPRET=1 keeps the interpreter off (kernels/compile_check.py compiles for a GPU
that is not there).
"""
import os
import sys

import torch


def _interpret_triton_library() -> None:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    import triton.language as tl

    namespaces = [m for n, m in list(sys.modules.items())
                  if m is not None and (n == "triton.language" or n.startswith("triton.language."))]
    namespaces.append(tl.core.tensor)                  # tensor methods such as x.sum()
    for ns in namespaces:
        for name, obj in list(vars(ns).items()):
            if isinstance(obj, JITFunction):
                setattr(ns, name, InterpretedFunction(obj.fn))


if (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
        and os.environ.get("JUMPSCOPE_NO_INTERPRET", "0") in ("", "0")):
    already_imported = "triton" in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"
    if already_imported:
        _interpret_triton_library()
