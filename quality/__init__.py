"""The SAE quality benchmark: our trainer against SAELens on the same data (synthetic caches with known
features, harvested LM caches), side by side in one run (`make quality`, conf/quality.yaml)."""
