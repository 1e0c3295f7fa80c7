# dropup: `make help` lists the targets. Every target sets up .venv first if needed (make install, idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.DEFAULT_GOAL := help
.PHONY: help install run data test test-slow test-slurm slurm-up slurm-down bench gpu-wheels bench-data bench-convert info table1 table2 table8 figures status mini mini-seeds mini-seeds-scored followup mini-report granular balancing

SCALE ?= smoke
LAUNCHER ?= local
JOBS ?= 1
SWEEP = $(PY) -m analysis.sweep --scale $(SCALE) --launcher $(LAUNCHER) --jobs $(JOBS) $(foreach o,$(OVERRIDES),--override $(o))
# clients of the local test cluster (make slurm-up) find it here; a real cluster's own config wins if set
ifneq ($(wildcard .slurm/slurm.conf),)
export SLURM_CONF ?= $(CURDIR)/.slurm/slurm.conf
endif

# The main job: Drop-Upcycling's r-sweep at the default (smoke) scale, dense seed included.
RUN_ARGS ?= -m init=drop ratio=0.0,0.1,0.25,0.5,0.75,1.0

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv: torch pinned first (a CPU build here), then the project (-e)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch (directly or via lightning) pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install ## the r-sweep at the default scale (python run.py -m init=drop ratio=0.0,...,1.0)
	$(PY) run.py $(RUN_ARGS)

data: install ## build the default ja/en/code corpus and tokenizer into data/ (run.py does this on first use)
	$(PY) -m dropup.data.build

info: install ## parameter and FLOPs accounting of a preset: make info ARGS="model=3.7b moe=mixtral"
	$(PY) run.py stage=info $(ARGS) hydra.run.dir=outputs/info

table1: install ## launch Table 1's missing runs (SCALE=smoke|mini|152m|1.5b|3.7b, LAUNCHER=local|slurm), render results/$(SCALE)/table1.*
	$(SWEEP) table1

table2: install ## the same for Table 2 (MoE vs dense: parameters, tokens, FLOPs)
	$(SWEEP) table2

table8: install ## the same for Table 8 (router initialization of naive Upcycling)
	$(SWEEP) table8

figures: install ## Figs. 3, 4, 5 (and 6-8) into results/$(SCALE)/, launching missing runs
	$(SWEEP) figures

mini: install ## the CPU mini reproduction: Table 1 and Figs. 3-5 at SCALE=mini (resumable; about 2 h per seed)
	$(MAKE) table1 figures SCALE=mini
	$(PY) -m analysis.report update docs/mini-reproduction.md

mini-seeds: install ## FS, NU, DU r=0.25..1 over 3 seeds, 12 M MoE tokens (resumable; ~9 h on 2 cores; one GPU: JOBS=9 OVERRIDES=trainer=gpu)
	$(PY) -m analysis.sweep seeds --scale mini-seeds --launcher $(LAUNCHER) --jobs $(JOBS) $(foreach o,$(OVERRIDES),--override $(o))
	$(PY) -m analysis.report update docs/mini-reproduction.md

mini-seeds-scored: install ## NU and DU r=0.5 over 3 seeds on the current data streams, scored on eval=proxy during training (Fig. 3's bottom row; ~4 h on 2 cores); the other methods' version-1 rows come from the report's CSV
	$(PY) -m analysis.sweep seeds --scale mini-seeds --only NU --only DU-0.5 --launcher $(LAUNCHER) --jobs $(JOBS) \
	  --keep docs/mini-reproduction/mini-seeds-v1-runs.csv \
	  --override eval=proxy --override eval.in_training=true $(foreach o,$(OVERRIDES),--override $(o))
	$(PY) -m analysis.report update docs/mini-reproduction.md

followup: install ## a mini follow-up: NU, DU r=0.5, r=1 at SCALE=mini-low-lr or mini-strong-seed (~30-50 min on 2 cores)
	$(PY) -m analysis.sweep followup --scale $(SCALE) --launcher $(LAUNCHER) --jobs $(JOBS) $(foreach o,$(OVERRIDES),--override $(o))

# The ablations beyond the paper run at the cut mini budget in fp32 (what a 2-core CPU without native bf16 runs);
# ABLATION_SCALE=mini-shared for mini's full bf16 recipe (add OVERRIDES=trainer=gpu on a GPU).
ABLATION_SCALE ?= mini-fp32
ABLATE = $(PY) -m analysis.sweep --scale $(ABLATION_SCALE) --launcher $(LAUNCHER) --jobs $(JOBS) $(foreach o,$(OVERRIDES),--override $(o))

granular: install ## beyond the paper: G=4 experts without/with virtual groups (NU, DU r=0.5) vs G=1 (~40 min on 2 cores)
	$(ABLATE) granular
	$(PY) -m analysis.report update docs/mini-reproduction.md

balancing: install ## beyond the paper: NU, DU r=0.5 x pooled / global-batch (2-process DDP) / aux-free balancing (~50 min)
	$(ABLATE) balancing
	$(PY) -m analysis.report update docs/mini-reproduction.md

mini-report: install ## copy the mini scales' runs.csv and figures into docs/mini-reproduction/, re-render its tables
	$(PY) -m analysis.report update docs/mini-reproduction.md

status: install ## done / failed / missing runs per artefact at SCALE
	$(PY) -m analysis.sweep --status --scale $(SCALE)

BENCH_TMP ?= /tmp/dropup-bench
bench-data: install ## corpus preparation on a 2 GB synthetic corpus: tokens/s vs raw tokenizers, peak memory (~45 min; GB=0.2 for a look)
	$(PY) benchmarks/data_prep.py --gb $(or $(GB),2) --scratch $(BENCH_TMP)/data

bench-convert: install ## dropup-upcycle at the 3.7B shape: peak RSS, GB/s vs disk (~50 GB free in BENCH_TMP; LAYERS=N for fewer)
	$(PY) benchmarks/convert.py --scratch $(BENCH_TMP) $(if $(LAYERS),--layers $(LAYERS))

test: install ## the test suite (about 4.5 minutes on 2 cores; prints the 15 slowest tests)
	$(PY) -m pytest -q --durations=15

slurm-up: install ## install (if missing) and start a single-node SLURM cluster, configs in .slurm/ (root, Debian)
	$(PY) -m dropup.cluster up

slurm-down: install ## stop every daemon slurm-up started
	$(PY) -m dropup.cluster down

test-slurm: install ## the SLURM tests on a local cluster (up, test, down); skips where it cannot run
	$(PY) -m pytest -q -m slurm tests/test_slurm.py; status=$$?; $(PY) -m dropup.cluster down; \
	  if [ $$status -eq 5 ]; then exit 0; else exit $$status; fi

test-slow: install ## the slow tests too
	$(PY) -m pytest -q -m "slow"

MOE_SHAPE = --tokens 4096 --d-model 512 --d-ff 2048 --experts 8 --top-k 2
bench: install ## MoE layer vs transformers vs the ideal GEMM (bf16 where native, fp32), the fallbacks, MoE vs dense step, init memory
	$(PY) benchmarks/moe_layer.py $(MOE_SHAPE) --dtype bf16
	$(PY) benchmarks/moe_layer.py $(MOE_SHAPE) --dtype fp32
	@echo "# where no grouped GEMM runs: the alternatives, uneven loads (skew 1: busiest expert ~1.9x the mean)"
	$(PY) benchmarks/moe_layer.py $(MOE_SHAPE) --dtype fp32 --skew 1 --also sliced,padded,loop --reps 8
	$(PY) benchmarks/train_step.py --model small --moe mixtral --compare-dense
	@echo "# host memory from start to the first step, upcycling into FSDP shards on 1, 2, 4 CPU ranks (0.4 GiB MoE)"
	$(PY) benchmarks/init_memory.py --ranks 1,2,4 --d-model 256 --d-ff 1024

gpu-wheels: install ## the wheels benchmarks/gpu.sh needs on the GPU image (hydra-core, omegaconf), into .whl/ (Python 3.12)
	mkdir -p .whl && $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux2014_x86_64 -d .whl \
	  hydra-core==1.3.2 omegaconf==2.3.0
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only: a pure-Python wheel built here

scaling: install ## memory, micro-batch, communication and run time under FSDP (ARGS="experiment=paper_8x3.7b gpus=64 gpu_mem_gib=80"; without ARGS: rewrite docs/scaling.md's tables)
	$(PY) -m dropup.scaling $(or $(ARGS),--docs)
