# harmony-pipe: every target works on a fresh clone (each depends on `setup`).
SHELL := /bin/bash
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
SAMPLES_PER_SHARD ?= $(if $(filter demo,$(DATASET)),500,10000)
# Further options: img2dataset's own for `make download`, datapipe.shards build's for `make shards`.
DOWNLOAD_ARGS ?=
SHARDS_ARGS ?=
ifneq ($(strip $(ARGS)),)
$(error ARGS is split in two: DOWNLOAD_ARGS="..." for make download (any img2dataset option, by its own name) and SHARDS_ARGS="..." for make shards)
endif
CONFIG ?= demo
NPROC ?= 1
# torchrun forwards SIGUSR1 (slurm's --signal) as well as SIGTERM to the trainer, then waits for its checkpoint.
TORCHRUN_ARGS ?= --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=120
RUN ?= runs/$(CONFIG)
TRAIN_ARGS ?=
# `make eval` data: the demo's held-out splits by default; point these at your own (any may be left empty),
# in any layout tools/eval/datasets.py reads (README: "Evaluate on standard benchmarks").
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
option = $(if $(2),$(1) "$(2)")# an option and its value, or nothing when the value is empty
EVAL_ARGS = $(call option,--zeroshot,$(ZEROSHOT_DATA)) $(call option,--zeroshot-labels,$(ZEROSHOT_LABELS)) \
	$(call option,--templates,$(TEMPLATES)) $(call option,--retrieval,$(RETRIEVAL_DATA)) \
	$(call option,--retrieval-images,$(RETRIEVAL_IMAGES)) \
	$(if $(and $(PROBE_TRAIN),$(PROBE_TEST)),--probe-train "$(PROBE_TRAIN)" --probe-test "$(PROBE_TEST)" \
	  $(call option,--probe-train-labels,$(PROBE_TRAIN_LABELS)) $(call option,--probe-test-labels,$(PROBE_TEST_LABELS)))
# Evaluation images the training shards must not contain: folders, images or .tar shards, ':' between them.
# The demo excludes its own held-out splits (once `make download` has made them).
EXCLUDE ?= $(if $(and $(filter demo,$(DATASET)),$(call existing,$(EVAL_DATA)/heldout)),$(EVAL_DATA)/heldout:$(EVAL_DATA)/probe_train:$(EVAL_DATA)/heldout_pairs)

.PHONY: setup download shards verify pretrain eval compare test lint bench bench-shards bench-data bench-memory bench-step bench-comm bench-scale bench-dedup crops data plot clean

setup: $(STAMP)

# Rebuilt only when pyproject.toml changes. The spark extra is installed so DISTRIBUTOR=pyspark
# works out of the box (it also needs Java 17+).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,spark]'
	touch $(STAMP)

download: setup
	$(PY) -m datapipe.download --dataset $(DATASET) --out "$(RAW)" \
	  $(if $(URL_LIST),--url-list "$(URL_LIST)") --processes $(PROCESSES) --threads $(THREADS) \
	  --distributor $(DISTRIBUTOR) $(DOWNLOAD_ARGS)

shards: setup
	$(PY) -m datapipe.shards build "$(RAW)" "$(OUT)/train" --processes $(PROCESSES) \
	  --samples-per-shard $(SAMPLES_PER_SHARD) $(if $(EXCLUDE),--exclude "$(EXCLUDE)") $(SHARDS_ARGS)

verify: setup
	$(PY) -m datapipe.shards verify "$(OUT)/train"

# Training shards, downloaded and built first when missing.
data: setup
	@test -f "$(RAW)/00000_stats.json" || $(MAKE) --no-print-directory download
	@test -f "$(OUT)/train/manifest.json" || $(MAKE) --no-print-directory shards

# Pretraining under torchrun (NPROC processes on this machine; see README for multi-node).
# The demo ends with `make eval` on the demo's held-out splits.
pretrain: data
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) $(TORCHRUN_ARGS) -m train.pretrain --config $(CONFIG) \
		"data.shards=$(OUT)/train" "run.out_dir=$$(dirname "$(RUN)")" "run.name=$$(basename "$(RUN)")" $(TRAIN_ARGS)
	@if [ -n "$(ZEROSHOT_DATA)$(RETRIEVAL_DATA)$(PROBE_TRAIN)" ]; then $(MAKE) --no-print-directory eval; fi

# Zero-shot, retrieval, linear probe and k-NN: each whose data is set (see EVAL_DATA above).
eval: setup
	$(PY) -m tools.eval.run --run "$(RUN)" $(EVAL_ARGS)

# Methods side by side: each method's preset (train/configs/<method>_$(SCALE).yaml; demo.yaml is harmony) on
# the same shards, seed and budget, evaluated alike along the way (README: Compare methods). METHODS empty:
# every method with a preset. BUDGET: epochs:N, flops:X, flops:<method>@<epochs> or time:<seconds>.
METHODS ?=
BUDGET ?= epochs:8
SCALE ?= $(DATASET)
COMPARE_NAME ?= $(DATASET)
EVAL_POINTS ?= 4
compare: data
	$(PY) -m tools.compare.run --name "$(COMPARE_NAME)" --methods "$(METHODS)" --scale "$(SCALE)" \
		--budget "$(BUDGET)" --shards "$(OUT)/train" --eval-points $(EVAL_POINTS) $(EVAL_ARGS) \
		$(if $(strip $(TRAIN_ARGS)),--train-args $(TRAIN_ARGS))

plot: setup
	$(PY) -m train.log "$(RUN)"

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

bench: bench-shards bench-scale bench-dedup bench-data bench-memory bench-step bench-comm
	$(PY) -m tools.bench.report --results runs/bench --out BENCHMARKS.md --charts docs/benchmarks

bench-shards: setup
	$(PY) -m tools.bench.shards --out runs/bench

bench-data: data
	$(PY) -m tools.bench.datapipe --shards "$(OUT)/train" --out runs/bench

bench-memory: setup
	$(PY) -m tools.bench.backward_memory --out runs/bench

bench-step: setup
	$(PY) -m tools.bench.step --out runs/bench

bench-comm: setup
	$(PY) -m tools.bench.communication --out runs/bench

# make shards and the loader at CC3M-like scale: N url-list rows (about 80% downloaded), generated locally.
N ?= 60000
bench-dedup: setup
	$(PY) -m tools.bench.near_duplicates --out runs/bench

bench-scale: setup
	$(PY) -m tools.bench.scale --rows $(N) --out runs/bench

crops: data
	$(PY) -m tools.show_crops --shards "$(OUT)/train" --out runs/crops.png

clean:
	rm -rf runs/ .pytest_cache
	find shards -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
