"""The feature browser (`make features RUN=...`): a static HTML page per SAE showing every latent's
firing statistics, top-activating held-out contexts, samples from lower activation quantiles,
activation histogram and logit lens, opened from disk with no server.

Modules: config (the schema of conf/features.yaml), topk and histogram (per-latent streaming state),
collect (the one pass over held-out tokens), logit_lens (decoder directions through the unembedding),
site (the data files and page), build (the command), bench (time and memory at 16k latents and 1M
tokens; the page's sort and filter times at 16k and 131k latents), assets/ (the page itself).
"""
