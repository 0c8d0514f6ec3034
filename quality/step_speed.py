"""One training step of ours against SAELens's, side by side on the same batches (CPU or GPU):
`python -m quality.step_speed [--shapes 64x512 256x4096] [--batch 1024] [--steps 30]`.

Ours: `train.member.Member.step` (the trainer's whole step: forward, backward, Adam, decoder
constraint, latent statistics) with the default JumpReLU recipe (conf/sae/jumprelu.yaml,
conf/optim/jumprelu.yaml); SAELens: `SAETrainer.step` with its JumpReLU (`step` loss), which also does
its whole step. Ours holds `--dead-fraction` of its latents dead, so that the default's pre-activation
loss does the work it does in training. Alternated in rounds; medians of ms per step,
and their ratio (SAELens / ours: above 1, ours is faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf


def ours_step(d: int, width: int, batch: int, device: str, dead_fraction: float = 0.0):
    from train.config import Config
    from train.member import Member
    from train.members import optim_preset, sae_preset
    sae = OmegaConf.merge(sae_preset("jumprelu"), {"width": width})         # the default of `make train`
    optim = OmegaConf.merge(optim_preset("jumprelu"), {"lr": 1e-3})
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"sae": sae, "optim": optim})
    # median_norm: the unit of the default's constants, which does not change the work of a step
    member = Member("ours", Path("unused"), cfg, d, 10**6, torch.device(device), "auto", median_norm=1.0)
    if dead_fraction > 0:             # the pre-activation loss's work: that fraction of latents dead throughout
        dead = torch.arange(width, device=device) < int(dead_fraction * width)
        member.stats.dead_mask = lambda: dead
    v = torch.tensor(1.0, device=device)
    state = {"step": 0}

    def step(x):
        member.step(x, state["step"], v)
        state["step"] += 1
    return step


def saelens_step(d: int, width: int, batch: int, device: str):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=width, device=device))
    trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=batch, lr=1e-3,
                                              lr_end=1e-4, device=device, n_checkpoints=0),
                         sae=sae, data_provider=iter(()))

    def step(x):
        trainer.step(x)
        trainer.n_training_steps += 1
    return step


def measure(d: int, width: int, batch: int, steps: int, rounds: int, device: str, dead_fraction: float = 0.0) -> dict:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, d, generator=g).to(device) for _ in range(4)]
    fns = {"ours": ours_step(d, width, batch, device, dead_fraction), "saelens": saelens_step(d, width, batch, device)}
    for fn in fns.values():                      # warm-up (allocations, first-call paths)
        for x in xs:
            fn(x)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(steps):
                fn(xs[i % len(xs)])
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(1000 * (time.perf_counter() - t) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"d": d, "width": width, "batch": batch, "ms_per_step": med, "rounds": times,
            "saelens_over_ours": med["saelens"] / med["ours"], "threads": torch.get_num_threads(),
            "dead_fraction": dead_fraction}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["64x512", "256x4096"])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dead-fraction", type=float, default=0.1,
                    help="latents held dead for ours (its pre-activation loss acts on them; the quality runs "
                         "end with 0-8%% dead in the training window)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="bench_out/quality/step_speed.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for shape in args.shapes:
        d, width = (int(v) for v in shape.split("x"))
        row = measure(d, width, args.batch, args.steps, args.rounds, device, args.dead_fraction)
        rows.append(row)
        print(f"d={d} W={width} B={args.batch} ({device}, {row['threads']} threads): ours "
              f"{row['ms_per_step']['ours']:.2f} ms, SAELens {row['ms_per_step']['saelens']:.2f} ms per step; "
              f"SAELens / ours = {row['saelens_over_ours']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
