# Every target installs what it needs first (.venv in the repo). Variables a user sets:
#   MODEL DATA CACHE LAYERS SUBLAYERS TOKENS CTX NPROC   (harvest; CACHE may be s3://... or gs://...)
#   NODES NODE_RANK MAIN_ADDR MAIN_PORT                   (harvest on several machines)
#   LAYER SUBLAYER RUN                                   (train / sweep / eval)
#   SHARDS                                               (sweep: one Hydra job per shard, e.g. on Slurm)
#   FORMAT OUT                                           (export)
#   ARGS: any further Hydra override, e.g. ARGS="sae.sparsity_coeff=3 train.total_tokens=1e8"
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

MODEL     ?= tiny
DATA      ?= bundled
LAYERS    ?= all
SUBLAYERS ?= all
NPROC     ?= 1
NODES     ?= 1
NODE_RANK ?= 0
MAIN_ADDR ?=
MAIN_PORT ?= 29500
LAYER     ?= 2
SUBLAYER  ?= mlp_out
TOKENS    ?=
CTX       ?=
FORMAT    ?= gemmascope
SHARDS    ?=
ARGS      ?=

slug      = $(subst /,_,$(1))
CACHE     ?= caches/$(call slug,$(MODEL))
RUN       ?= runs/$(call slug,$(MODEL))/layer_$(LAYER)_$(SUBLAYER)
SWEEP_DIR ?= runs/$(call slug,$(MODEL))/sweep_layer_$(LAYER)_$(SUBLAYER)
OUT       ?= exports/$(notdir $(RUN))_$(FORMAT)

# MODEL / DATA: a name in conf/, else a local path, else a Hugging Face id.
MODEL_ARGS = $(if $(wildcard conf/model/$(MODEL).yaml),model=$(MODEL),model=custom "model.path='$(MODEL)'")
DATA_ARGS  = $(if $(wildcard conf/data/$(DATA).yaml),data=$(DATA),$(if $(wildcard $(DATA)),data=local "data.path='$(abspath $(DATA))'",data=hub "data.dataset='$(DATA)'"))
HARVEST_ARGS = $(MODEL_ARGS) $(DATA_ARGS) "cache='$(CACHE)'" "layers='$(LAYERS)'" "sublayers='$(SUBLAYERS)'" \
               $(if $(TOKENS),n_tokens=$(TOKENS)) $(if $(CTX),context_length=$(CTX))
TRAIN_ARGS   = "cache='$(CACHE)'" layer=$(LAYER) sublayer=$(SUBLAYER)
SHARD_ARGS   = $(if $(SHARDS),hydra.mode=MULTIRUN sweep.num_shards=$(SHARDS) sweep.shard=$(shell seq -s, 0 $$(( $(SHARDS) - 1 ))))
# NPROC processes on each of NODES machines (accelerate's --num_processes counts them all).
LAUNCH       = $(if $(filter-out 1,$(NPROC) $(NODES)),$(PY) -m accelerate.commands.launch --multi_gpu \
               --num_machines $(NODES) --machine_rank $(NODE_RANK) --num_processes $$(( $(NPROC) * $(NODES) )) \
               $(if $(MAIN_ADDR),--main_process_ip $(MAIN_ADDR) --main_process_port $(MAIN_PORT)) \
               --mixed_precision no --dynamo_backend no -m,$(PY) -m)
# What a target needs beyond `make install`: obstore for an object-store CACHE (or a run trained on
# one), the submitit launcher for Slurm sweeps.
NEEDS_S3     = $(if $(findstring ://,$(CACHE) $(ARGS) $(shell grep -hs '"cache": "[a-z0-9]*://' $(RUN)/sae.json $(RUN)/*/sae.json)),$(VENV)/.s3)
NEEDS_SLURM  = $(if $(findstring submitit,$(ARGS))$(findstring launcher=slurm,$(ARGS)),$(VENV)/.slurm)

.PHONY: help install demo harvest train sweep eval features export ablation tiny-model quality chromium test bench clean

help:
	@echo "make demo | harvest | train | sweep | eval | features | export | ablation | tiny-model | test | bench  (see README.md)"

install: $(STAMP)

# Without CUDA, pin the local CPU build of torch first so that no CUDA packages are pulled.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

harvest: $(STAMP) $(NEEDS_S3)
	$(LAUNCH) harvest $(HARVEST_ARGS) $(ARGS)

train: $(STAMP) $(NEEDS_S3)
	$(PY) -m train $(TRAIN_ARGS) "run_dir='$(RUN)'" $(ARGS)

sweep: $(STAMP) $(NEEDS_S3) $(NEEDS_SLURM)
	$(PY) -m train.sweep $(TRAIN_ARGS) "run_dir='$(SWEEP_DIR)'" $(SHARD_ARGS) $(ARGS)

eval: $(STAMP) $(NEEDS_S3)
	$(PY) -m evaluate "run='$(RUN)'" $(ARGS)

# A static HTML feature browser of one SAE (a run folder, a sweep member, a params.npz or a SAELens
# folder) in RUN/features/index.html, opened from disk; settings: conf/features.yaml.
features: $(STAMP) $(NEEDS_S3)
	$(PY) -m evaluate.browser "run='$(RUN)'" $(ARGS)

export: $(STAMP)
	$(PY) -m evaluate.export "run='$(RUN)'" format=$(FORMAT) "out='$(OUT)'" $(ARGS)

ablation: $(STAMP)
	$(PY) -m evaluate.ablation $(TRAIN_ARGS) "run_dir='runs/$(call slug,$(MODEL))/ablation_layer_$(LAYER)_$(SUBLAYER)'" $(ARGS)

# Rebuild the embedded model (tiny_gemma/checkpoint, harvest/corpus/bundled.jsonl) from its corpus:
# about 35 minutes on 2 cores, resumable. ARGS: any override of conf/tiny_gemma.yaml.
tiny-model: $(STAMP)
	$(PY) -m tiny_gemma $(ARGS)

# The whole pipeline on the embedded tiny model, on a CPU in a few minutes. Run again, each stage
# resumes (and finds its work done).
DEMO_CACHE := caches/demo
DEMO_RUN   := runs/demo/layer_2_mlp_out
DEMO_TRAIN := train.total_tokens=1e6 loader.batch_size=1024 loader.buffer_tokens=65536 \
              loader.heldout_fraction=0.05 sae.expansion=8 sae.sparsity_coeff=5e-3 optim.lr=1e-3 \
              optim.lr_warmup_steps=50 optim.lambda_warmup_steps=300 train.checkpoint_every_steps=250 \
              train.log_every_steps=50 train.dead_window_tokens=1e5
demo: $(STAMP)
	$(MAKE) --no-print-directory harvest MODEL=tiny CACHE=$(DEMO_CACHE) TOKENS=65536
	$(MAKE) --no-print-directory train CACHE=$(DEMO_CACHE) LAYER=2 SUBLAYER=mlp_out RUN=$(DEMO_RUN) ARGS="$(DEMO_TRAIN)"
	$(MAKE) --no-print-directory eval RUN=$(DEMO_RUN)

# sae-lens is optional (its tests skip without it); CI installs it so that SAELens itself checks our exports.
$(VENV)/.saelens: $(STAMP)
	$(PY) -m pip install -q -e '.[saelens]' || echo "sae-lens could not be installed: its tests will be skipped"
	touch $@

$(VENV)/.s3: $(STAMP)
	$(PY) -m pip install -q -e '.[s3]'
	touch $@

$(VENV)/.slurm: $(STAMP)
	$(PY) -m pip install -q -e '.[slurm]'
	touch $@

# The object-store and Slurm tests skip cleanly where their packages cannot be installed.
$(VENV)/.remote-tests: $(STAMP)
	$(PY) -m pip install -q -e '.[test-remote]' || echo "obstore/moto/submitit could not be installed: the remote tests will be skipped"
	touch $@

# Debian's chromium renders the feature browser in its tests; they skip, saying so, where it cannot be installed.
chromium:
	@command -v chromium >/dev/null 2>&1 || { S=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
	  $$S env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $$S apt-get update -q >/dev/null 2>&1 && $$S env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } || \
	  echo "chromium could not be installed: the feature browser's rendering tests will be skipped"; }

test: $(STAMP) $(VENV)/.saelens $(VENV)/.remote-tests chromium
	$(PY) -m pytest -q -ra tests

# SAE quality: ours against SAELens on the same data (conf/quality.yaml: six caches, two budgets;
# about 10 CPU-minutes per arm and cache on one core). ARGS="only_regimes=[basic]" for one cache,
# ARGS="--config-name quality_recipes" for the recipe study; a one-step speed comparison beside it.
quality: $(STAMP) $(VENV)/.saelens
	$(PY) -m quality $(ARGS)
	$(PY) -m quality.step_speed

bench: $(STAMP) chromium $(VENV)/.remote-tests
	$(PY) -m harvest.bench
	$(PY) -m train.bench
	$(PY) -m kernels.bench
	$(PY) -m evaluate.browser.bench
	$(PY) scripts/bench_object_store.py

clean:
	rm -rf caches runs exports bench_out .cache
