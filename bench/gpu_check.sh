#!/usr/bin/env bash
# make gpu-check: the CUDA checks, on an NVIDIA machine with torch and triton preinstalled and no network
# (nothing is installed), within 8 minutes.  Runs the kernel, backend and varlen tests on CUDA (bf16
# included), the kernel benchmark, the variable-length benchmark and a reduced training-step benchmark;
# results (tests.txt, kernels.*, varlen.*, train_step.*) go to $RESULTS_DIR (default
# bench/results/<device>); with GPU_CHECK_ARCHIVE=path.tgz also packed into one archive.  pytest, if the
# machine lacks it, is taken from .gpu-deps (`make gpu-deps`).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=".:${PYTHONPATH:-}"
if ! $PY -c "import pytest" 2>/dev/null && [ -d .gpu-deps ]; then export PYTHONPATH="$PYTHONPATH:$PWD/.gpu-deps"; fi
SLUG=$($PY -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
RESULTS_DIR=${RESULTS_DIR:-bench/results/$SLUG}
mkdir -p "$RESULTS_DIR"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS_DIR/device.txt"
if $PY -c "import pytest" 2>/dev/null; then
  # the tests compile a few hundred kernel specialisations: spread them over processes when xdist is there
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  timeout 150 $PY -m pytest -q -p no:cacheprovider $XDIST tests/kernels tests/test_backends.py tests/test_varlen.py 2>&1 \
    | tail -40 \
    | tee "$RESULTS_DIR/tests.txt"
  status=${PIPESTATUS[0]}
else
  echo "pytest is not installed here and .gpu-deps is missing: CUDA tests skipped" | tee "$RESULTS_DIR/tests.txt"
  status=1
fi
timeout 120 $PY bench/kernels.py --out "$RESULTS_DIR" || status=1
timeout 60 $PY bench/varlen.py --out "$RESULTS_DIR" || status=1
timeout 150 $PY bench/train_step.py --quick --out "$RESULTS_DIR" || status=1
# one file to bring back (a remote runner may return only a few files)
if [ -n "${GPU_CHECK_ARCHIVE:-}" ]; then tar czf "$GPU_CHECK_ARCHIVE" -C "$RESULTS_DIR" .; fi
exit $status
