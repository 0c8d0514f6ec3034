"""Stage 3: evaluation, export and the ablation (issue 5).

python -m evaluate run=...           reports on a run folder, a sweep folder or a Gemma Scope params.npz
python -m evaluate.export ...        Gemma Scope params.npz or a SAELens folder
python -m evaluate.ablation ...      the JumpReLU paper's comparison as one sweep, evaluated and compared

Modules: sources (what run= points at), heldout (the trainer's held-out sequences, read back),
reconstruction (MSE, FVU, L0, dead/dense, firing frequencies, error by position), delta_lm (delta LM
loss through harvest.sites.splice), evaluation (the two together, sharing reads), report and plots
(JSON, table, PNGs), gemmascope and saelens (file formats), export, ablation.
"""
