"""Import before `triton` in every kernel module: without CUDA, Triton kernels can only run
through Triton's interpreter (TRITON_INTERPRET=1), which must be on before they are defined."""
import os

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "1"
