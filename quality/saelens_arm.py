"""Peers' recipes, trained by SAELens itself (`sae-lens`, the optional extra) on the batches our loader
serves: the same cache rows in the same order and the same token budget as our trainer sees.

Each arm is SAELens's own TrainingSAE and SAETrainer with SAELens's defaults except what the arm's
config sets (and the budget's learning rate, warm-ups and batch size). The trained SAE is saved with
`save_inference_model` and loaded back with `SAE.load_from_disk`, as a SAELens user would load it
(BatchTopK becomes a JumpReLU there), and evaluated through `SAELensAdapter`, which gives it the
encode/decode interface of ours.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import tempfile
import time
from typing import Callable, Iterator

import torch
from torch import nn

# preset -> (module, training class, config class, fixed config fields)
PRESETS = {
    "jumprelu_step": ("jumprelu_sae", "JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig",
                      {"jumprelu_sparsity_loss_mode": "step"}),
    "jumprelu_tanh": ("jumprelu_sae", "JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig",
                      {"jumprelu_sparsity_loss_mode": "tanh"}),
    "jumprelu_quadratic": ("jumprelu_sae", "JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig",
                           {"jumprelu_sparsity_loss_mode": "quadratic"}),
    "topk": ("topk_sae", "TopKTrainingSAE", "TopKTrainingSAEConfig", {}),
    "batchtopk": ("batchtopk_sae", "BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig", {}),
}
INT_KNOBS = {"k"}


def available() -> bool:
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    """The installed sae-lens version, kept beside each SAELens row (pyproject pins it; the arm's
    identity leaves it out so that kept results survive a deliberate upgrade)."""
    from importlib.metadata import version as installed
    return installed("sae-lens")


class SAELensAdapter(nn.Module):
    """A SAELens inference SAE behind our SAEs' evaluation interface (encode, decode, W_dec, sizes)."""

    def __init__(self, sae, label: str):
        super().__init__()
        self.sae, self.architecture, self.label = sae.eval(), "saelens", label
        self.d_in, self.d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)

    @property
    def W_dec(self) -> torch.Tensor:
        return self.sae.W_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(f)

    def forward(self, x):
        return self.decode(self.encode(x))


def train_saelens(preset: str, knob: str, level: float, overrides: dict, batches: Iterator[torch.Tensor],
                  d_in: int, d_sae: int, steps: int, batch_size: int, lr: float, lr_warmup_steps: int,
                  sparsity_warmup_steps: int, device: str, seed: int,
                  same_batches: Callable[[], Iterator[torch.Tensor]] | None = None) -> tuple[SAELensAdapter, dict]:
    """Train one SAELens SAE on `steps` batches of `batches` (raw activations); (adapter, timing).
    With normalize_activations=expected_average_only_in, SAELens's own estimate of the scale is taken
    from `same_batches()` (`batches` again, from the start): its trainer would take its 1,000 batches
    from `batches` and train on those after them, not on the ones every other trainer sees."""
    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    if preset not in PRESETS:
        raise ValueError(f"SAELens preset {preset!r}: choose one of {', '.join(PRESETS)}")
    module, train_cls, cfg_cls, fixed = PRESETS[preset]
    mod = importlib.import_module(f"sae_lens.saes.{module}")
    value = int(level) if knob in INT_KNOBS else float(level)
    fields = {**fixed, **overrides, knob: value}
    if preset.startswith("jumprelu"):
        fields.setdefault("l0_warm_up_steps", sparsity_warmup_steps)
    sae_cfg = getattr(mod, cfg_cls)(d_in=d_in, d_sae=d_sae, device=device, **fields)
    torch.manual_seed(seed)
    sae = getattr(mod, train_cls)(sae_cfg)
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size,
                                   lr=lr, lr_end=lr / 10, lr_warm_up_steps=lr_warmup_steps, device=device,
                                   n_checkpoints=0)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
    if sae_cfg.normalize_activations == "expected_average_only_in":
        if same_batches is None:
            raise ValueError("normalize_activations=expected_average_only_in needs same_batches for its estimate")
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            trainer.activation_scaler.estimate_scaling_factor(d_in, same_batches(), trainer_cfg.n_batches_for_norm_estimate)
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):     # its own progress bar, per run
        trained = trainer.fit()
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        loaded = SAE.load_from_disk(tmp, device=device)
    return SAELensAdapter(loaded, f"saelens {preset}"), {"train_seconds": seconds,
                                                          "ms_per_step": 1000 * seconds / steps}
