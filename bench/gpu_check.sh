#!/usr/bin/env bash
# make gpu-check: the CUDA checks, on an NVIDIA machine with torch and triton preinstalled and no network
# (nothing is installed).  Runs the kernel, backend and varlen tests on CUDA (bf16
# included), the kernel benchmark, attention per SDPA backend, the variable-length benchmark and a reduced
# training-step benchmark; results (device.txt, tests.txt with the failures' tracebacks, tests-log.txt with
# every test's result, kernels.*, attention.*, varlen.*, train_step.*) go to $RESULTS_DIR (default
# bench/results/<device>); with GPU_CHECK_ARCHIVE=path.tgz they are also packed into one archive, refreshed
# after every part, so a run cut short keeps what it measured; on a lent machine whose $OUT alone comes back,
# RESULTS_DIR=$OUT/results: with $OUT set the archive defaults to $OUT/gpu-check.tgz (such a machine returns a
# few files only: 8 on 2026-11-28, which dropped a sampling.json).  Each part runs under a time limit of its own.
# GPU_CHECK_PARTS picks parts (default: "tests kernels attention varlen train_step", the kernel benchmark without
# its launch-parameter rows; their limits add up to 12.8 minutes, more than one 10-minute device command:
# split them over two).  Optional parts: "ksweep" (the kernel benchmark with its launch-parameter rows, into
# $RESULTS_DIR/ksweep: about 3.5 minutes on an H100), "profile", "sampling", "sdpa" (the step with each
# attention kernel, into $RESULTS_DIR/sdpa-*), "asweep" (the Triton attention kernel's launch settings,
# attention_sweep.*), "tattn" (the step with the project's Triton attention kernel alone, into
# $RESULTS_DIR/tattn), "keep" (the triton step with the LayerNorm outputs kept, into $RESULTS_DIR/keep),
# "split" (the triton step with the LayerNorm backwards' rows in two column blocks, into $RESULTS_DIR/split),
# "variants" (bench/step_variants.py's default variants against the base step in one run, interleaved: the
# gelu_gemm forward/backward/both, the kept LayerNorm outputs, and both of those: step_variants.*), "res512"
# (XL/2 at 512x512, batch 64, into $RESULTS_DIR/res512), "compile" (whole-network compiled steps, into
# $RESULTS_DIR/compile-<model>-<backend>) and "gemm" (the MLP's GELU in its products' epilogues, kernels.gelu_gemm: its CUDA tests, its
# kernel rows with their launch settings, the step and eager sampling with and without it, into
# $RESULTS_DIR/gemm).
# pytest, if the machine lacks it, is taken from .gpu-deps (`make gpu-deps`).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if ! $PY -c "import pytest" 2>/dev/null && [ -d .gpu-deps ]; then export PYTHONPATH="$PYTHONPATH:$PWD/.gpu-deps"; fi
SLUG=$($PY -c "from bench.common import device_slug, environment; print(device_slug(environment()))")
RESULTS_DIR=${RESULTS_DIR:-bench/results/$SLUG}
PARTS=" ${GPU_CHECK_PARTS:-tests kernels attention varlen train_step} "
mkdir -p "$RESULTS_DIR"
status=0

GPU_CHECK_ARCHIVE=${GPU_CHECK_ARCHIVE:-${OUT:+$OUT/gpu-check.tgz}}
pack() {  # one file to bring back (a remote runner may return only a few files)
  if [ -n "${GPU_CHECK_ARCHIVE:-}" ]; then  # (not itself, should it lie in $RESULTS_DIR)
    tar czf "$GPU_CHECK_ARCHIVE" --exclude="./$(basename "$GPU_CHECK_ARCHIVE")" -C "$RESULTS_DIR" .
  fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "from bench.common import environment; e = environment(); print(*(f'{k} {e[k]}' for k in ('python', 'torch', 'triton', 'cuda')))"
} | tee "$RESULTS_DIR/device.txt"
pack
if [[ $PARTS == *" tests "* ]]; then
  if $PY -c "import pytest" 2>/dev/null; then
    # the tests compile a few hundred kernel specialisations: spread them over processes when xdist is there
    XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
    PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 100")
    timeout 180 $PY -m pytest -v -rfE --tb=short -p no:cacheprovider $XDIST $PER_TEST \
      tests/kernels tests/test_backends.py tests/test_varlen.py tests/test_cuda_graphs.py > "$RESULTS_DIR/tests-log.txt" 2>&1
    status=$?
    # the summary and the failures (the log's end), then every test's outcome line
    { grep -E "^(FAILED|ERROR)|passed|failed" "$RESULTS_DIR/tests-log.txt" | tail -60
      echo "exit status $status (124: cut at the time limit)"; } | tee "$RESULTS_DIR/tests.txt"
  else
    echo "pytest is not installed here and .gpu-deps is missing: CUDA tests skipped" | tee "$RESULTS_DIR/tests.txt"
    status=1
  fi
  pack
fi
if [[ $PARTS == *" kernels "* ]]; then
  timeout 150 $PY bench/kernels.py --no-config-sweep --out "$RESULTS_DIR" || status=1; pack
fi
if [[ $PARTS == *" ksweep "* ]]; then  # (the step rows are the kernels part's)
  timeout 300 $PY bench/kernels.py --step-batch 0 --out "$RESULTS_DIR/ksweep" || status=1; pack
fi
if [[ $PARTS == *" attention "* ]]; then timeout 150 $PY bench/attention.py --out "$RESULTS_DIR" || status=1; pack; fi
if [[ $PARTS == *" varlen "* ]]; then timeout 50 $PY bench/varlen.py --out "$RESULTS_DIR" || status=1; pack; fi
if [[ $PARTS == *" train_step "* ]]; then
  timeout 240 $PY bench/train_step.py --quick --out "$RESULTS_DIR" || status=1; pack
fi
# optional parts (not in the default list): where a step's time goes (batch 32, both backends; batch 256,
# triton: GPU time by kind of kernel), and sampling throughput
if [[ $PARTS == *" profile "* ]]; then
  timeout 90 $PY bench/profile_step.py --out "$RESULTS_DIR" || status=1; pack
  timeout 120 $PY bench/profile_step.py --backends triton --batch 256 --out "$RESULTS_DIR/profile-256" || status=1; pack
fi
# (rows saved as they come: a compilation cut short by the limit leaves the rows before it)
if [[ $PARTS == *" sampling "* ]]; then  # eager and blocks compiled, then (minutes of compiling) whole networks compiled
  timeout 150 $PY bench/sampling.py --impls eager regional --out "$RESULTS_DIR" || status=1; pack
  timeout 240 $PY bench/sampling.py --impls compile --out "$RESULTS_DIR/sampling-compile" || status=1; pack
fi
# the training step at batch 256 with each SDPA kernel forced, FlexAttention, and the project's Triton kernel
# (the quick run above has PyTorch's choice)
if [[ $PARTS == *" sdpa "* ]]; then
  for k in cudnn flash efficient flex triton; do
    timeout 90 $PY bench/train_step.py --models MaskDiT-XL/2 DiT-XL/2 --impls triton --batches 256 --warmup 3 \
      --steps 20 --sdpa-backend $k --out "$RESULTS_DIR/sdpa-$k" || status=1; pack
  done
fi
# the Triton attention kernel's launch settings at the MaskDiT encoder and decoder shapes (attention_sweep.*)
if [[ $PARTS == *" asweep "* ]]; then
  timeout 150 $PY bench/attention.py --sweep --out "$RESULTS_DIR" || status=1; pack
fi
# the triton step at batch 256 with the project's Triton attention kernel (kernels/attention.py) for every layer
if [[ $PARTS == *" tattn "* ]]; then
  timeout 120 $PY bench/train_step.py --models MaskDiT-XL/2 DiT-XL/2 --impls triton --batches 256 --warmup 3 \
    --steps 20 --sdpa-backend triton --out "$RESULTS_DIR/tattn" || status=1; pack
fi
# the triton step at batch 256 with the modulated LayerNorm outputs kept (DiT.set_keep_norm_outputs)
if [[ $PARTS == *" keep "* ]]; then
  timeout 90 $PY bench/train_step.py --models MaskDiT-XL/2 DiT-XL/2 --impls triton --batches 256 --warmup 3 \
    --steps 20 --keep-norm-outputs --out "$RESULTS_DIR/keep" || status=1; pack
fi
# the triton step at batch 256 with the LayerNorm backwards' rows in two column blocks (BWD_SPLIT_COLUMNS)
if [[ $PARTS == *" split "* ]]; then
  timeout 90 $PY bench/train_step.py --models MaskDiT-XL/2 DiT-XL/2 --impls triton --batches 256 --warmup 3 \
    --steps 20 --kernel-constant ln_modulate.BWD_SPLIT_COLUMNS=True gated_residual.BWD_SPLIT_COLUMNS=True \
    --out "$RESULTS_DIR/split" || status=1; pack
fi
# bench/step_variants.py's default variants (gelu_gemm forward/backward/both, the kept LayerNorm outputs, both)
# against the defaults, MaskDiT-XL/2 and DiT-XL/2 at batch 256, timed in rotated rounds within one run
if [[ $PARTS == *" variants "* ]]; then
  timeout 300 $PY bench/step_variants.py --out "$RESULTS_DIR" || status=1; pack
fi
# XL/2 at 512x512 (64x64x4 latents, 1024 tokens), batch 64
if [[ $PARTS == *" res512 "* ]]; then
  timeout 240 $PY bench/train_step.py --models MaskDiT-XL/2 DiT-XL/2 --impls torch torch+regional triton \
    triton+regional --batches 64 --input-size 64 --warmup 3 --steps 20 --out "$RESULTS_DIR/res512" || status=1; pack
fi
# whole-network torch.compile at batch 256 of each model of GPU_CHECK_COMPILE_MODELS (default MaskDiT-XL/2;
# DiT-XL/2's torch backend compiled whole ran out of memory at batch 256 on an H100, fits on an H200) with each backend of
# GPU_CHECK_COMPILE_BACKENDS (default "torch triton"), each beside an eager torch row (its speed-up over eager
# torch, measured in the same run), each model and backend in its own run under GPU_CHECK_COMPILE_LIMIT seconds
# (default 280: a compile that overruns leaves the others their rows). With empty caches the torch backend's
# first compiled step took 119 s on the H100 and 146 s on the H200 (2026-11-28), the triton backend's 56 s on the
# H200 (before kernels/inductor.py it never finished); DiT-XL/2's 107 s and 49 s on the H200
# (GPU_CHECK_COMPILE_MODELS=DiT-XL/2 GPU_CHECK_COMPILE_BACKENDS="triton torch" GPU_CHECK_COMPILE_LIMIT=215: 253 s
# for both). The first step's Python stacks go to first_step_stacks.txt every 30 s.
if [[ $PARTS == *" compile "* ]]; then
  for model in ${GPU_CHECK_COMPILE_MODELS:-MaskDiT-XL/2}; do
    for impl in ${GPU_CHECK_COMPILE_BACKENDS:-torch triton}; do
      timeout "${GPU_CHECK_COMPILE_LIMIT:-280}" $PY bench/train_step.py --models "$model" --impls torch $impl+compile \
        --batches 256 --warmup 2 --steps 20 --stack-dumps 30 \
        --out "$RESULTS_DIR/compile-$(echo "$model" | tr 'A-Z/' 'a-z-')-$impl" || status=1; pack
    done
  done
fi
# kernels.gelu_gemm (its inference forward on by default, training off): its tests on CUDA (bf16 included), its
# kernel rows against cuBLAS and the separate GELU passes with each launch setting, the step with and without it
# (interleaved; forward and backward each alone too) and eager sampling without and with its inference forward
# (time limits: 590 s in all; on a fresh H200, 2026-11-28, the tests took over 90 s, the part 357 s with them cut)
if [[ $PARTS == *" gemm "* ]]; then
  mkdir -p "$RESULTS_DIR/gemm"
  timeout 150 $PY -m pytest -q -rfE --tb=short -p no:cacheprovider -k gelu tests/kernels/test_gelu_gemm.py \
    tests/test_backends.py > "$RESULTS_DIR/gemm/tests.txt" 2>&1 || status=1; pack
  timeout 150 $PY bench/kernels.py --ops linear_gelu linear_gelu_output gelu_grad_gemm --step-batch 0 \
    --out "$RESULTS_DIR/gemm" || status=1; pack
  timeout 200 $PY bench/step_variants.py --variants base "gelu_gemm:gelu_gemm.FORWARD=True+gelu_gemm.BACKWARD=True" \
    "gelu_gemm forward:gelu_gemm.FORWARD=True" "gelu_gemm backward:gelu_gemm.BACKWARD=True" \
    --out "$RESULTS_DIR/gemm" || status=1; pack
  for fused in False True; do  # eager bf16 sampling without and with it (inference: the forward's kernel alone)
    timeout 45 $PY bench/sampling.py --impls eager --precisions bf16 --kernel-constant gelu_gemm.INFERENCE=$fused \
      --out "$RESULTS_DIR/gemm/sampling-$fused" || status=1; pack
  done
fi
exit $status
