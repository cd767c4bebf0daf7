# make install | test | train | sample | lint        (see README.md)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
RUN    ?= runs/digits
# pytest-xdist processes of `make test` (each interpreted kernel test keeps one core busy)
TEST_WORKERS ?= 2

.PHONY: install test train sample lint bench bench-kernels quality gpu-check gpu-deps clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Without a CUDA GPU install the CPU build of torch first, so that the bare torch requirement
	@# below is already satisfied and pip does not fetch a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==$(TORCH_CPU_VERSION); fi
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# A second `make train` continues the run in $(RUN) (to its --steps) instead of starting over.
train: install
	$(PY) train.py $(if $(wildcard $(RUN)/checkpoint-*.pt),--resume $(RUN),--out $(RUN))

sample: install
	$(PY) sample.py --ckpt $(RUN) --num-per-class 8 --out $(RUN)/sample

# The CUDA checks (tests with bf16, kernel benchmark) with the machine's own python; see bench/gpu_check.sh.
gpu-check:
	bash bench/gpu_check.sh

# pytest as plain files for a GPU machine without network: carry .gpu-deps with the working tree.
gpu-deps:
	$(PYTHON) -m pip install -q --target .gpu-deps pytest pytest-xdist

# Compute table (anywhere), training-step, sampling and kernel benchmarks (full tables need CUDA).
bench: install
	@# The counting benchmarks (nothing timed) side by side: the activation count (minutes of compiling XL
	@# graphs on a CPU) beside the compute table and the compiled backward; then the timed ones, alone.
	log=$$(mktemp); $(PY) bench/activation_memory.py > $$log 2>&1 & pid=$$!; \
	$(PY) bench/compute_table.py && $(PY) bench/compiled_backward.py; status=$$?; \
	wait $$pid || status=1; cat $$log; rm -f $$log; exit $$status
	$(PY) bench/host_overhead.py
	$(PY) bench/train_step.py
	$(PY) bench/sampling.py
	$(PY) bench/kernels.py
	$(PY) bench/attention.py
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $(PY) bench/varlen.py; \
	else echo "bench/varlen.py: the variable-length benchmark needs CUDA (skipped)"; fi

# Time to quality on the digits: DiT vs MaskDiT, same wall-clock budget, the digits metric over time.
quality: install
	$(PY) bench/quality.py

bench-kernels: install
	$(PY) bench/kernels.py

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info .gpu-deps
