# harmony-pipe: every target works on a fresh clone (each depends on `setup`).
SHELL := /bin/bash
# The variables a user sets (`make help`, docs/). A value given on the command line or in the environment is data, kept
# as written: make never expands it, so `$(shell ...)`, `$USER` or `$$` in it reach the program as they are (`override`:
# only so can a makefile redefine a variable of the command line).
USER_VARIABLES := PYTHON DATASET URL_LIST OUT RAW PROCESSES THREADS DISTRIBUTOR SAMPLES_PER_SHARD DOWNLOAD_ARGS \
	SHARDS_ARGS ARGS CONFIG NPROC TORCHRUN_ARGS RUN TRAIN_ARGS TRAIN_SHARDS MIX_WEIGHTS EVAL_DATA ZEROSHOT_DATA \
	ZEROSHOT_LABELS TEMPLATES RETRIEVAL_DATA RETRIEVAL_IMAGES PROBE_TRAIN PROBE_TEST PROBE_TRAIN_LABELS \
	PROBE_TEST_LABELS EVAL_DEVICE EXCLUDE METHODS BUDGET SCALE COMPARE_NAME EVAL_POINTS STAGING OUT_DIR N \
	PYTEST_ARGS SEEDS REFERENCE COMPARE_EXECUTOR SLURM_ARGS ACCEPT_CHANGES COMPARE_WAIT COMPARE_PUBLISH SPARK_MASTER
$(foreach name,$(USER_VARIABLES),$(if $(filter command line environment,$(origin $(name))),\
	$(eval override $(name) := $$(value $(name)))))
# A variable given on the command line that this Makefile does not know is a typo until shown otherwise (`make pretrain
# CONFG=clip` would train the demo): make stops at once, naming the closest known variable.
KNOWN_VARIABLES := $(USER_VARIABLES) PY VENV ARGS
UNKNOWN_VARIABLES := $(filter-out $(KNOWN_VARIABLES),$(foreach name,$(.VARIABLES),\
	$(if $(filter command line,$(origin $(name))),$(name))))
ifneq ($(UNKNOWN_VARIABLES),)
$(error $(or $(shell python3 -m tools.closest_name "$(UNKNOWN_VARIABLES)" $(KNOWN_VARIABLES) 2>/dev/null),\
	$(UNKNOWN_VARIABLES): not variables of this Makefile (`make help` lists them)))
endif

## Variables, given after the target (make pretrain CONFIG=clip/cc3m NPROC=8); docs/ says more of each:
##   data        DATASET=demo|cc3m|cc12m URL_LIST=<file> OUT=shards/<DATASET> RAW=<OUT>/raw STAGING PROCESSES THREADS
##               DISTRIBUTOR=multiprocessing|pyspark SPARK_MASTER SAMPLES_PER_SHARD EXCLUDE=<eval images> DOWNLOAD_ARGS
##               SHARDS_ARGS (docs/data.md, docs/spark.md)
##   training    CONFIG=<preset> RUN=runs/<CONFIG, / as _> NPROC=<ranks> TORCHRUN_ARGS TRAIN_ARGS="key=value ..."
##               TRAIN_SHARDS MIX_WEIGHTS (docs/training.md, docs/config.md)
##   evaluation  EVAL_DATA ZEROSHOT_DATA ZEROSHOT_LABELS TEMPLATES RETRIEVAL_DATA RETRIEVAL_IMAGES PROBE_TRAIN
##               PROBE_TEST PROBE_TRAIN_LABELS PROBE_TEST_LABELS EVAL_DEVICE (docs/evaluation.md)
##   comparison  METHODS SEEDS BUDGET SCALE COMPARE_NAME EVAL_POINTS REFERENCE COMPARE_EXECUTOR SLURM_ARGS
##               ACCEPT_CHANGES COMPARE_WAIT COMPARE_PUBLISH (docs/compare.md)
##   other       PYTHON (the interpreter .venv is built with) PYTEST_ARGS N (bench-scale rows) OUT_DIR (gpu-check)
## Read more: README.md and docs/ (getting started, data, training, evaluation, comparing methods, reuse, config).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

DATASET ?= demo
URL_LIST ?=
OUT ?= shards/$(DATASET)
# make shards reads img2dataset's output from RAW: point it at a download you already have.
RAW ?= $(OUT)/raw
PROCESSES ?= 2
THREADS ?= 16
DISTRIBUTOR ?= multiprocessing
# DISTRIBUTOR=pyspark: the Spark master make shards' build runs on (empty: the environment's SPARK_MASTER, spark-defaults.conf, else
# local[*]; docs/spark.md). make download's Spark session is img2dataset's own.
SPARK_MASTER ?=
SAMPLES_PER_SHARD ?= $(if $(filter demo,$(DATASET)),500,10000)
# Further options: img2dataset's own for `make download`, datapipe.shards build's for `make shards`.
DOWNLOAD_ARGS ?=
SHARDS_ARGS ?=
ifneq ($(strip $(ARGS)),)
$(error ARGS is split in two: DOWNLOAD_ARGS="..." for make download (any img2dataset option, by its own name) and SHARDS_ARGS="..." for make shards)
endif
CONFIG ?= harmony/demo
NPROC ?= 1
# torchrun forwards SIGUSR1 (slurm's --signal) as well as SIGTERM to the trainer, then waits for its checkpoint.
TORCHRUN_ARGS ?= --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=120
RUN ?= runs/$(subst /,_,$(CONFIG))
TRAIN_ARGS ?=
# The shards make pretrain and make compare train on (data.shards, data.mix_weights): $(OUT)/train by default, or
# any folder, s3://, gs:// or hf:// location, or a list of them with one weight each (docs/data.md, "Mixing datasets by
# weight"): TRAIN_SHARDS='[shards/cc3m/train, s3://bucket/cc12m/train]' MIX_WEIGHTS='[1, 2]'.
TRAIN_SHARDS ?= $(OUT)/train
MIX_WEIGHTS ?=
# `make eval` data: the demo's held-out splits by default; point these at your own (any may be left empty),
# in any layout evaluation/datasets.py reads (docs/evaluation.md).
EVAL_DATA ?= $(OUT)/source
empty :=
space := $(empty) $(empty)
existing = $(wildcard $(subst $(space),\ ,$(1)))# a path that exists, spaces allowed; else nothing
ZEROSHOT_DATA ?= $(call existing,$(EVAL_DATA)/heldout)
ZEROSHOT_LABELS ?=
TEMPLATES ?=
RETRIEVAL_DATA ?= $(call existing,$(EVAL_DATA)/heldout_pairs)
RETRIEVAL_IMAGES ?=
PROBE_TRAIN ?= $(call existing,$(EVAL_DATA)/probe_train)
PROBE_TEST ?= $(call existing,$(EVAL_DATA)/heldout)
PROBE_TRAIN_LABELS ?=
PROBE_TEST_LABELS ?=
EVAL_DEVICE ?= auto# auto: a CUDA device when there is one | cpu | cuda[:N]
# An option and the variable named $(2) as its value, read from the recipe's environment (data, never shell
# code), or nothing when the variable is empty.
option = $(if $($(2)),$(1) "$$$(2)")
EVAL_ARGS = $(call option,--zeroshot,ZEROSHOT_DATA) $(call option,--zeroshot-labels,ZEROSHOT_LABELS) \
	$(call option,--templates,TEMPLATES) $(call option,--retrieval,RETRIEVAL_DATA) \
	$(call option,--retrieval-images,RETRIEVAL_IMAGES) \
	$(if $(and $(PROBE_TRAIN),$(PROBE_TEST)),--probe-train "$$PROBE_TRAIN" --probe-test "$$PROBE_TEST" \
	  $(call option,--probe-train-labels,PROBE_TRAIN_LABELS) $(call option,--probe-test-labels,PROBE_TEST_LABELS)) \
	$(call option,--device,EVAL_DEVICE)
# Evaluation images the training shards must not contain: folders, images or .tar shards, ':' between them.
# The demo excludes its own held-out splits (once `make download` has made them).
EXCLUDE ?= $(if $(and $(filter demo,$(DATASET)),$(call existing,$(EVAL_DATA)/heldout)),$(EVAL_DATA)/heldout:$(EVAL_DATA)/probe_train:$(EVAL_DATA)/heldout_pairs)

# make compare: each method's preset (train/configs/<method>_$(SCALE).yaml; demo.yaml is harmony) on
# the same shards, seed and budget, evaluated alike along the way (docs/compare.md). METHODS empty:
# every method with a preset. BUDGET: epochs:N, flops:X, flops:<method>@<epochs> or time:<seconds>.
# The demo's default is small enough for every method on 2 CPU cores (docs/compare.md).
METHODS ?=
BUDGET ?= $(if $(filter demo,$(DATASET)),epochs:1,epochs:8)
SCALE ?= $(DATASET)
COMPARE_NAME ?= $(DATASET)
EVAL_POINTS ?= $(if $(filter demo,$(DATASET)),2,4)
# Each method once per seed in SEEDS; the report gives mean +- std over them and each method's difference to
# REFERENCE with a 95% interval. NPROC ranks per run (torchrun). COMPARE_EXECUTOR: local (one run after another
# here), slurm (one Slurm job per run through submitit, SLURM_ARGS="partition=... account=... time=<minutes>
# nodes=N"; COMPARE_WAIT=1 waits for them) or submitit_local. ACCEPT_CHANGES=1 keeps runs trained with other
# settings or code (marked in the report) instead of refusing them.
SEEDS ?= 0
REFERENCE ?= clip
COMPARE_EXECUTOR ?= local
SLURM_ARGS ?=
ACCEPT_CHANGES ?=
COMPARE_WAIT ?=
# A folder that also receives the report and its charts (docs/compare/<name>: the docs show reports as written).
COMPARE_PUBLISH ?=

# Recipes read these from their environment ("$$RAW"), so that a value is data for the program, never shell
# code; {NAME_ARGS} words are split by tools/make_args.py with shell quoting rules, and nothing else.
EXPORTED := DATASET URL_LIST OUT RAW PROCESSES THREADS DISTRIBUTOR SAMPLES_PER_SHARD DOWNLOAD_ARGS SHARDS_ARGS CONFIG \
	NPROC TORCHRUN_ARGS RUN TRAIN_ARGS ZEROSHOT_DATA RETRIEVAL_DATA PROBE_TRAIN PROBE_TEST EXCLUDE N PYTEST_ARGS \
	ZEROSHOT_LABELS TEMPLATES RETRIEVAL_IMAGES PROBE_TRAIN_LABELS PROBE_TEST_LABELS METHODS BUDGET SCALE COMPARE_NAME \
	EVAL_POINTS EVAL_DEVICE TRAIN_SHARDS MIX_WEIGHTS SEEDS REFERENCE COMPARE_EXECUTOR SLURM_ARGS COMPARE_PUBLISH \
	SPARK_MASTER
export $(EXPORTED)
RUN_WITH_ARGS := $(PY) -m tools.make_args
# DATASET=demo without a URL_LIST: the built-in demo set, generated and served by demo/download.py.
DOWNLOADER = $(if $(and $(filter demo,$(DATASET)),$(if $(URL_LIST),,no-list)),demo.download,datapipe.fetch.download)

.PHONY: help setup download shards verify pretrain eval docs test lint bench bench-shards bench-data bench-memory bench-step bench-comm bench-scale bench-dedup crops data plot clean gpu-kit gpu-check compare

.DEFAULT_GOAL := help
help: ## this list: every target and the variables
	@printf '%s\n\n%s\n' "harmony-pipe: make <target> [VARIABLE=value ...]" "Targets:"
	@awk -F ':[^#]*## ' '/^[a-z-]+:.*## / {printf "  %-13s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))
	@printf '\n'
	@sed -n 's/^## \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

setup: $(STAMP) ## build .venv from pyproject.toml and constraints.txt (every target does this first)

# Rebuilt only when pyproject.toml or constraints.txt (the exact versions the suite runs on) changes. The spark
# extra is installed so DISTRIBUTOR=pyspark works out of the box (it also needs Java 17+).
$(STAMP): export PYTHON := $(PYTHON)
$(STAMP): pyproject.toml constraints.txt
	@command -v "$$PYTHON" >/dev/null || { printf '%s\n' "error: $$PYTHON not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	@test -x $(PY) || { printf '%s\n' "$$PYTHON -m venv $(VENV)" && "$$PYTHON" -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint constraints.txt -e '.[dev,spark]'
	touch $(STAMP)

# Locations in object storage (s3://, gs://, hf://).
REMOTE_OUT = $(filter s3://% gs://% gcs://% hf://%,$(OUT))
REMOTE_RAW = $(filter s3://% gs://% gcs://% hf://%,$(RAW))

download: setup ## fetch a url list into raw WebDataset shards with img2dataset (the demo set offline)
	@$(RUN_WITH_ARGS) $(PY) -m $(DOWNLOADER) --dataset "$$DATASET" --out "$$RAW" \
	  $(if $(URL_LIST),--url-list "$$URL_LIST") --processes "$$PROCESSES" --threads "$$THREADS" \
	  --distributor "$$DISTRIBUTOR" $(if $(REMOTE_RAW),--staging "$$STAGING") {DOWNLOAD_ARGS}

# OUT in object storage (s3://, gs://, hf://): make shards builds in STAGING, then publishes the shards, the
# manifest last (datapipe.shards.publish); raw shards in object storage are copied to STAGING first. make verify
# checks a local copy of the published shards.
STAGING ?= shards/.staging/$(notdir $(OUT))
BUILD_RAW = $(if $(REMOTE_RAW),$(STAGING)/raw,$(RAW))
BUILD_OUT = $(if $(REMOTE_OUT),$(STAGING),$(OUT))
export STAGING BUILD_RAW BUILD_OUT

shards: setup ## validate, clean, de-duplicate, decontaminate and re-shard RAW into OUT/train
	@$(if $(REMOTE_RAW),$(RUN_WITH_ARGS) $(PY) -m datapipe.shards.publish get "$$RAW" "$$BUILD_RAW")
	@$(RUN_WITH_ARGS) $(PY) -m datapipe.shards build "$$BUILD_RAW" "$$BUILD_OUT/train" --processes "$$PROCESSES" \
	  --samples-per-shard "$$SAMPLES_PER_SHARD" $(if $(EXCLUDE),--exclude "$$EXCLUDE") \
	  $(if $(filter pyspark,$(DISTRIBUTOR)),--distributor pyspark $(call option,--spark-master,SPARK_MASTER)) {SHARDS_ARGS}
	@$(if $(REMOTE_OUT),$(RUN_WITH_ARGS) $(PY) -m datapipe.shards.publish put "$$BUILD_OUT/train" "$$OUT/train")

verify: setup ## re-check every training shard against its manifest
	@$(if $(REMOTE_OUT),$(RUN_WITH_ARGS) $(PY) -m datapipe.shards.publish get "$$OUT/train" "$$STAGING/published/train")
	@$(RUN_WITH_ARGS) $(PY) -m datapipe.shards verify "$(if $(REMOTE_OUT),$$STAGING/published,$$OUT)/train"

# A sub-make works its defaults out again: the demo's EXCLUDE and evaluation data name the held-out splits
# only once the download has made them, so what this Makefile defaulted is not handed down as environment.
SUBMAKE = env $(foreach name,EXCLUDE ZEROSHOT_DATA RETRIEVAL_DATA PROBE_TRAIN PROBE_TEST TRAIN_SHARDS,\
	$(if $(filter file,$(origin $(name))),-u $(name))) $(MAKE) --no-print-directory

# Training shards, downloaded and built first when missing (shards in object storage, and TRAIN_SHARDS given, are
# read as they are).
data: setup ## download and build the shards when they are missing
ifeq ($(REMOTE_OUT)$(filter-out file,$(origin TRAIN_SHARDS)),)
	@test -f "$$RAW/00000_stats.json" || $(SUBMAKE) download
	@test -f "$$OUT/train/manifest.json" || $(SUBMAKE) shards
endif

# MIX_WEIGHTS as a config override, or nothing when it is empty.
MIX_WEIGHTS_OVERRIDE = $(if $(MIX_WEIGHTS),"data.mix_weights=$$MIX_WEIGHTS")

# Pretraining under torchrun (NPROC processes on this machine; docs/training.md for several nodes and Slurm). The config
# is checked first, so a bad one gets one message and torchrun never starts; train.launch is torchrun ending with the
# trainers' one-line errors and exit code instead of its ChildFailedError report. The demo ends with `make eval` on the
# demo's held-out splits.
pretrain: data ## train CONFIG under torchrun on NPROC ranks, then evaluate (the demo)
	@$(RUN_WITH_ARGS) $(PY) -m train.config --config "$$CONFIG" "data.shards=$$TRAIN_SHARDS" $(MIX_WEIGHTS_OVERRIDE) \
		"run.out_dir=$$(dirname -- "$$RUN")" "run.name=$$(basename -- "$$RUN")" {TRAIN_ARGS}
	@$(RUN_WITH_ARGS) $(PY) -m train.launch --standalone --nproc_per_node="$$NPROC" {TORCHRUN_ARGS} \
		-m train.pretrain --config "$$CONFIG" "data.shards=$$TRAIN_SHARDS" $(MIX_WEIGHTS_OVERRIDE) \
		"run.out_dir=$$(dirname -- "$$RUN")" "run.name=$$(basename -- "$$RUN")" {TRAIN_ARGS}
	@if [ -n "$$ZEROSHOT_DATA$$RETRIEVAL_DATA$$PROBE_TRAIN" ]; then $(SUBMAKE) eval; fi

# Zero-shot, retrieval, linear probe and k-NN: each whose data is set (see EVAL_DATA above).
eval: setup ## zero-shot, retrieval, linear probe and k-NN of RUN
	@$(RUN_WITH_ARGS) $(PY) -m evaluation.run --run "$$RUN" $(EVAL_ARGS)

# Methods side by side (the variables are with the others at the top: docs/compare.md).
compare: data ## train and evaluate METHODS side by side, SEEDS each, under one BUDGET
	@$(RUN_WITH_ARGS) $(PY) -m comparison.run --name "$$COMPARE_NAME" --methods "$$METHODS" --scale "$$SCALE" \
		--budget "$$BUDGET" --shards "$$TRAIN_SHARDS" $(call option,--mix-weights,MIX_WEIGHTS) \
		--eval-points "$$EVAL_POINTS" --seeds "$$SEEDS" --reference "$$REFERENCE" --nproc "$$NPROC" \
		--executor "$$COMPARE_EXECUTOR" --slurm-args "$$SLURM_ARGS" $(if $(ACCEPT_CHANGES),--accept-changes) \
		$(if $(COMPARE_WAIT),--wait) $(call option,--publish,COMPARE_PUBLISH) $(EVAL_ARGS) \
		$(if $(strip $(TRAIN_ARGS)),--train-args {TRAIN_ARGS}) \
		$(if $(filter-out 1,$(NPROC)),--torchrun-args "$$TORCHRUN_ARGS")

docs: setup ## regenerate docs/config.md, the reference of every config setting
	$(PY) -m train.config_reference --out docs/config.md

plot: setup ## redraw RUN's loss and schedule plots
	@$(RUN_WITH_ARGS) $(PY) -m train.log "$$RUN"

# The tests run make themselves: they get neither this make's defaults (a `RAW ?=` in the tests' make would keep
# this one's shards/demo/raw) nor its level (their make must say `make:`, not `make[1]:`).
TEST_ENV = env -u MAKELEVEL -u MAKEFLAGS -u MFLAGS $(foreach name,$(EXPORTED) STAGING BUILD_RAW BUILD_OUT OUT_DIR,\
	$(if $(filter file,$(origin $(name))),-u $(name)))
test: setup ## the test suite (PYTEST_ARGS)
	@$(RUN_WITH_ARGS) $(TEST_ENV) $(PY) -m pytest {PYTEST_ARGS}

lint: setup ## ruff
	$(PY) -m ruff check .

bench: bench-shards bench-scale bench-dedup bench-data bench-memory bench-step bench-comm ## every benchmark, then BENCHMARKS.md
	$(PY) -m tools.bench.report --results runs/bench --out BENCHMARKS.md --charts docs/benchmarks

bench-shards: setup ## make shards' throughput against plain Pillow decoding
	$(PY) -m tools.bench.shards --out runs/bench

bench-data: data ## loader samples/s of every view recipe (DALI, torch, object storage)
	@$(RUN_WITH_ARGS) $(PY) -m tools.bench.datapipe --shards "$$OUT/train" --out runs/bench
	@$(RUN_WITH_ARGS) $(PY) -m tools.bench.remote_shards --shards "$$OUT/train" --out runs/bench

bench-memory: setup ## activation memory of per-objective backward against one backward
	$(PY) -m tools.bench.backward_memory --out runs/bench

bench-step: setup ## Harmony's step cost against CLIP alone
	$(PY) -m tools.bench.step --out runs/bench

bench-comm: setup ## bytes each rank sends per step, by purpose
	$(PY) -m tools.bench.communication --out runs/bench

# Validating on a bare, offline GPU machine (docs/gpu.md): make gpu-kit here
# downloads and packs what that machine lacks; make gpu-check runs there with its own python3 (no .venv).
gpu-kit: setup ## pack what a bare offline GPU machine lacks (docs/gpu.md)
	$(PY) -m tools.gpu.kit

OUT_DIR ?= runs/gpu-check
export OUT_DIR
gpu-check: ## on the GPU machine: install the kit, validate and measure
	@python3 -m tools.make_args python3 -m tools.gpu.check --out "$$OUT_DIR"

# make shards and the loader at CC3M-like scale: N url-list rows (about 80% downloaded), generated locally.
N ?= 60000
bench-dedup: setup ## how well make shards finds near duplicates, and its cost
	$(PY) -m tools.bench.near_duplicates --out runs/bench

bench-scale: setup ## make shards and the loader at N url-list rows
	@$(RUN_WITH_ARGS) $(PY) -m tools.bench.scale --rows "$$N" --out runs/bench

crops: data ## a PNG grid of the crops the model is fed
	@$(RUN_WITH_ARGS) $(PY) -m tools.show_crops --shards "$$OUT/train" --out runs/crops.png

clean: ## remove runs/ and built shards
	rm -rf runs/ .pytest_cache
	find shards -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
