# lorabench command index: `make help`.
PYTHON ?= python
GLUE_DIR ?= $(abspath ../shared/data/glue)
export GLUE_DIR

.PHONY: help install test test-slow test-gpu test-all bench bench-eval bench-scaling profile train train-ddp sweep plan report clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## torch 2.13.0 (the CPU wheel here) first, then lorabench with dev extras, editable
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## the CI suite (fast, offline; needs GLUE_DIR for the real-data tests)
	$(PYTHON) -m pytest -q

test-slow:  ## long checks: real training runs (accuracy vs PEFT), benchmarks
	$(PYTHON) -m pytest -q -m slow

test-gpu:  ## CUDA mixed-precision tests (on a machine with a GPU)
	$(PYTHON) -m pytest -q -m gpu

test-all:  ## everything but GPU tests
	$(PYTHON) -m pytest -q -m "not gpu"

bench:  ## step-time / memory benchmark (writes bench/results/)
	$(PYTHON) bench/step_time.py

bench-eval:  ## eval forward (merged / unmerged) vs the backbone (writes bench/results/)
	$(PYTHON) bench/eval_time.py

bench-scaling:  ## step time and memory vs sequence, batch and backbone (writes bench/results/scaling_cpu.md)
	$(PYTHON) bench/scaling.py --axis all

profile:  ## op table of one configuration's training step (override: make profile ARGS="dora floor")
	$(PYTHON) bench/profile_step.py $(or $(ARGS),lora)

train:  ## a quick LoRA run on RTE (override: make train ARGS="method=dora task=mrpc")
	$(PYTHON) -m train method=lora task=rte trainer=debug $(ARGS)

train-ddp:  ## the quick run on 2 CPU processes, one job (torchrun, gloo; override ARGS)
	torchrun --standalone --nproc_per_node=2 -m train method=lora task=rte trainer=debug model=tiny $(ARGS)

plan:  ## steps and estimated time of a sweep, training nothing (override ARGS)
	$(PYTHON) -m train -m method=lora,dora_dynamic task=rte,mrpc,sst2 seed=1,2,3 +plan=true $(ARGS)

sweep:  ## a small sweep + report (override ARGS)
	$(PYTHON) -m train -m method=lora task=rte,wnli seed=1,2 trainer=debug logger=none $(ARGS)

report:  ## aggregate a sweep: make report DIR=runs/multirun/<time>
	$(PYTHON) -m report $(DIR)

clean:  ## remove run outputs and caches
	rm -rf runs outputs multirun .pytest_cache
