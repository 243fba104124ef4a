# paralab — `make help` lists the targets.
PY      := .venv/bin/python
STAMP   := .venv/.installed
SWEEP   ?= $(lastword $(sort $(wildcard outputs/sweeps/*)))
ARGS    ?=
STRATEGY ?= ddp
WORLD   ?= 2
HOST    ?= localhost

.DEFAULT_GOAL := help
.PHONY: help install run test test-full test-slurm gpu-check mutants sweep compare parity bench plan calibrate plan-bench tensorboard lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,optuna]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install paralab with its dev tools and the optuna extra

run: $(STAMP) ## run the default experiment (DDP, 2 ranks via torchrun, MLP on synthetic data); ARGS=overrides
	$(PY) train.py $(ARGS)

# Three pytest workers keep both cores busy: a launched job spends much of its time starting processes.
test: $(STAMP) ## run the test suite (real processes, gloo, tiny models, 3 pytest workers; < 8 min on 2 cores)
	$(PY) -m pytest -q -m "not full" -n 3 --dist worksteal $(ARGS)

test-full: $(STAMP) ## run every test, including the 8-process and slow cases
	$(PY) -m pytest -q $(ARGS)

test-slurm: $(STAMP) ## preemption under a real one-node SLURM: scancel and rerun a sweep, a time limit's requeue (root: .ci/slurm-up installs and starts slurm-wlm, munge)
	$(PY) -m pip install -q -e '.[slurm]'
	.ci/slurm-up
	$(PY) -m pytest -q -m full tests/test_slurm.py $(ARGS)

gpu-check: $(STAMP) ## on a CUDA machine: NCCL for ddp/fsdp/tp/pp/fsdp_tp, CUDA memory vs theory, MFU, bf16, bubble; one PASS/FAIL line each (on CPU: says it needs a GPU, exits 0)
	$(PY) -m experiments.report.gpu_check

mutants: $(STAMP) ## run test selections under deliberately broken implementations; fails unless every mutant is caught (ARGS="--only tp_noop")
	$(PY) -m tests.mutants.run $(ARGS)

parity: $(STAMP) ## check a setting against single-process training: make parity STRATEGY=fsdp_tp WORLD=4 [ARGS=...]
	$(PY) -m experiments.report.parity strategy=$(STRATEGY) launcher.nproc_per_node=$(WORLD) $(ARGS)

sweep: $(STAMP) ## sweep strategies × world sizes (ARGS to override)
	$(PY) train.py -m strategy=single,ddp launcher.nproc_per_node=1,2 $(ARGS)

compare: $(STAMP) ## report on a sweep (table, CSV, plots): make compare [SWEEP=outputs/sweeps/<dir>], default the newest
	$(PY) -m experiments.report.compare $(SWEEP)

bench: $(STAMP) ## paralab vs hand-written ddp/fsdp/tp loops, small and compute-bound, 2 ranks: prints median wall times, hand/paralab throughput ratio vs target, sampled steps' share of the time vs < 2%; then compiled vs eager for ddp and fsdp (ARGS="--strategies ddp --sizes small --repeats 3")
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m experiments.report.bench $(ARGS)

plan: $(STAMP) ## which parallelism, and what it costs: every runnable config predicted and ranked (ARGS="model=llama3_8b dataset=tokens dataset.seq_len=8192 dataset.vocab_size=128256 cluster=h100_8 cluster.nodes=8"; ARGS="check=<sweep>": predicted vs measured)
	$(PY) -m experiments.report.plan $(ARGS)

calibrate: $(STAMP) ## measure this machine for the advisor: matmuls and attention by shape, per-op and framework overheads, each collective's α-β (ARGS="cluster=<name>" on a GPU node)
	$(PY) -m experiments.report.calibrate $(ARGS)

plan-bench: $(STAMP) ## the advisor against this machine: sweep experiment=plan_check (every strategy at 1 and 2 ranks, two sizes), step-time MAPE, Spearman, memory error vs targets
	$(PY) -m experiments.report.plan_bench $(ARGS)

tensorboard: $(STAMP) ## serve TensorBoard over every run and sweep in outputs/, on localhost (HOST=0.0.0.0 to serve other machines)
	$(PY) -m tensorboard.main --logdir outputs --host $(HOST)

lint: $(STAMP) ## ruff: lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
