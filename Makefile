# Every target installs what it needs first (.venv in the repo). Variables a user sets:
#   MODEL DATA CACHE LAYERS SUBLAYERS TOKENS CTX NPROC   (harvest)
#   LAYER SUBLAYER RUN                                   (train / sweep / eval)
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
LAYER     ?= 2
SUBLAYER  ?= mlp_out
TOKENS    ?=
CTX       ?=
FORMAT    ?= gemmascope
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
LAUNCH       = $(if $(filter-out 1,$(NPROC)),$(PY) -m accelerate.commands.launch --multi_gpu --num_machines 1 --num_processes $(NPROC) --mixed_precision no --dynamo_backend no -m,$(PY) -m)

.PHONY: help install demo harvest train sweep eval export ablation tiny-model test bench clean

help:
	@echo "make demo | harvest | train | sweep | eval | export | ablation | tiny-model | test | bench  (see README.md)"

install: $(STAMP)

# Without CUDA, pin the local CPU build of torch first so that no CUDA packages are pulled.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

harvest: $(STAMP)
	$(LAUNCH) harvest $(HARVEST_ARGS) $(ARGS)

train: $(STAMP)
	$(PY) -m train $(TRAIN_ARGS) "run_dir='$(RUN)'" $(ARGS)

sweep: $(STAMP)
	$(PY) -m train.sweep $(TRAIN_ARGS) "run_dir='$(SWEEP_DIR)'" $(ARGS)

eval: $(STAMP)
	$(PY) -m evaluate "run='$(RUN)'" $(ARGS)

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

test: $(STAMP) $(VENV)/.saelens
	$(PY) -m pytest -q -ra tests

bench: $(STAMP)
	$(PY) -m harvest.bench
	$(PY) -m train.bench
	$(PY) -m kernels.bench

clean:
	rm -rf caches runs exports bench_out .cache
