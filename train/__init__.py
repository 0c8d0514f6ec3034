"""Stage 2: JumpReLU SAE training from an activation cache."""
import kernels as _kernels

# Hugging Face publishes an unrelated package that is also imported as `kernels`; refuse to train
# against it rather than fail later with a puzzling AttributeError.
if not getattr(_kernels, "IS_JUMPSCOPE_KERNELS", False):
    raise ImportError(
        f"`import kernels` found {getattr(_kernels, '__file__', _kernels)!r}, not this project's kernels/ "
        "package (Hugging Face's `kernels` shadows it?). Run from the repository root or "
        "`pip uninstall kernels`.")
