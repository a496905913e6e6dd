# tfllm tasks. Every target installs what it needs first (idempotent; seconds once done).
#   make demo    prepare the built-in corpus, pretrain the tiny config under horovodrun -np 2
#   make test    the whole test suite, multi-process tests included
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
NP ?= 2
export TFLLM_VENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo test test-fast gpu-build-check bench bench-cluster bench-prepare bench-quantize bench-distill bench-downstream cluster-down clean

install:
	@bash .ci/install.sh

DEMO_STEPS ?= 1500

# The tiny config, trained longer than CI trains it so that the sample looks like Python.
demo: install
	horovodrun -np $(NP) -H localhost:$(NP) --gloo $(PY) -m pipelines.pretrain \
	  --flagfile=flags/tiny.cfg --model_dir=$(RUN_DIR)/model --data_dir=$(RUN_DIR)/data \
	  --train_steps=$(DEMO_STEPS) --eval_every=500 --checkpoint_every=500 --log_every=100 \
	  2> >($(PY) -m tfllm.console >&2)
	$(PY) -m pipelines.generate --model_dir=$(RUN_DIR)/model --prompt="def " --max_new_tokens=120 \
	  --strategy=top_k --top_k=10 --temperature=0.8 --sampling_seed=0
	@echo "Open TensorBoard: $(VENV)/bin/tensorboard --logdir $(RUN_DIR)/model/tb --port 6006, then http://localhost:6006"

test: install
	@bash .ci/test-tools.sh
	$(PY) -m pytest -q tests

test-fast: install
	@bash .ci/test-tools.sh
	$(PY) -m pytest -q tests -m "not slow"

# Compile-only proof of the GPU recipe the Dockerfile uses (needs nvcc; no GPU needed).
gpu-build-check: install
	bash .ci/install.sh --gpu-wheel $(CURDIR)/build/gpu-wheel

# The figures of the README's Performance section (about 4 minutes on 2 cores). The N-rank run
# takes one slice per rank: its ranks share this machine's cores (the flagfile's two are for one process).
BENCH_FLAGS ?= --flagfile=flags/shakespeare_char.cfg
bench: install
	mkdir -p .bench
	$(PY) -m pipelines.benchmark $(BENCH_FLAGS) --mode=step --bench_steps=100 --output_json=.bench/step1.json --tb_dir=.bench/tb
	horovodrun -np $(NP) -H localhost:$(NP) --gloo $(PY) -m pipelines.benchmark $(BENCH_FLAGS) --mode=step --bench_steps=100 \
	  --parallel_slices=1 --baseline_json=.bench/step1.json --output_json=.bench/step$(NP).json --tb_dir=.bench/tb
	$(PY) -m pipelines.benchmark $(BENCH_FLAGS) --mode=overhead --bench_steps=100 --output_json=.bench/overhead.json
	$(PY) -m pipelines.benchmark $(BENCH_FLAGS) --mode=variants --bench_steps=40 --output_json=.bench/variants.json
	$(PY) -m pipelines.benchmark --flagfile=flags/gpt2_124m.cfg --bench_vocab=50304 --mode=costmodel \
	  --calibration_json=.bench/step$(NP).json --plot=.bench/scaling.png --output_json=.bench/costmodel.json

# Data preparation: tokens/s, MB/s and peak RSS for 1 and 2 workers and 2 ranks, SentencePiece BPE and
# WordPiece of 8,000 tokens, on IMDB and on ~1 GB of it built in a scratch directory (about 12 minutes).
bench-prepare: install
	mkdir -p .bench
	$(PY) tests/benchmarks/prepare_bench.py --output_json=.bench/prepare.json

# CPU generation latency and weights of float and int8 SavedModels (baby GPT and 10x; ~10 min).
bench-quantize: install
	mkdir -p .bench
	$(PY) tests/benchmarks/quantize_bench.py --repeats=5 --output_json=.bench/quantize.json

# Distillation: a 6-layer Shakespeare teacher, its 2-layer student distilled and from scratch (~6 min).
bench-distill: install
	mkdir -p .bench
	$(PY) tests/benchmarks/distill_bench.py --run_dir=.bench/distill --output_json=.bench/distill.json

# Pretraining that pays off downstream: IMDB pretraining (about 55 minutes on 2 cores), then SST-2 and
# IMDB sentiment fine-tuned from it and from scratch, 3 seeds each (about 70 minutes more).
bench-downstream: install
	mkdir -p .bench
	$(PY) tests/benchmarks/downstream_bench.py --run_dir=.bench/downstream --output_json=.bench/downstream.json

# Step and allreduce times on 2 and 3 emulated hosts (network namespaces, root) over links shaped to
# 1 and 10 Gbit/s, and the cost model calibrated on 2 hosts against 3 (about 15 minutes on 2 cores).
bench-cluster: install
	@bash .ci/test-tools.sh
	mkdir -p .bench
	$(PY) tests/benchmarks/cluster_bench.py --output_json=.bench/cluster.json

# Removes every emulated cluster left on this machine (`python -m tests.cluster.emulated up` makes one).
cluster-down:
	$(PY) -m tests.cluster.emulated down

clean:
	rm -rf runs build .pytest_cache
