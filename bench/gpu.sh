#!/usr/bin/env bash
# The GPU proof in one command: every kernel built, checked against the reference and timed.
#
#   bash bench/gpu.sh OUTDIR [1|2|3|4|all|STEP,STEP,...] [--dry-run]
#
# Part 1 (< 8 minutes on an H100/H200): versions, the CUDA extension's just-in-time build for this
# GPU (in the background, beside the Triton tests), the Triton, backend-agreement and CUDA tests on
# the GPU, bench.gpu_check (every backend against the reference at Llama-3.1-8B, Qwen2.5-7B and
# soft-capped Gemma-2-2B head shapes, then time as a multiple of T_gemm3, peak memory, copy
# bandwidth; every row bounded), bench.cuda_check (row step against the copy
# bandwidth, decode, pairwise) and bench.consumer_gpu (one Llama-3.1-8B LoRA step under 24 GB,
# fused loss vs the authors' full logits, then eager decoding, 8 adapters in one batch and serving).
# Part 2 (< 6 minutes): compute-sanitizer memcheck and racecheck on small shapes, gradient
# filtering at the Llama-3.1-8B head (bench.grad_filter: random and peaked policies, the gradient
# against float64, the filtered product alone: dense GEMM, gathered GEMMs, the kept-blocks kernel),
# the wheel with the compiled extension (built, installed into a temporary target, imported) and
# decoding.
# Part 3 (< 7 minutes): the quantized base. bitsandbytes, which the GPU machine lacks, travels with
# the tree: build bench/carry first (`python -m bench.carry`, an ignored folder of about 4 MiB: the
# package with its CUDA 13.0 library) and carry it; its site/ goes first on PYTHONPATH. Then
# bench.carry --check (imported from there, a CUDA library loaded, an NF4 round trip) and
# bench.quantized_gpu (the Llama-3.1-8B step on a 4-bit base under 8-24 GiB beside the memory
# plan, LoRA on q/v and on every projection; the fused loss and the authors' on an 8-bit base).
# Part 4 (< 5 minutes): bench.consumer_gpu --decoding compiled, the 8B model's decoding with the
# static cache and the compiled step (generate's default on CUDA; each batch compiles two 32-layer
# steps, minutes of their own).
# Steps by name (to rerun some): versions, triton-tests, cuda-build, backend-tests, gpu-check,
# cuda-check, consumer, memcheck, racecheck, grad-filter, wheel, carry, quantized, consumer-compiled.
# --dry-run: the same steps on CPU with tiny shapes and the Triton interpreter; the GPU-only steps
# are reported as skipped with the reason. CI runs it, so a GPU run never fails on a typo. It checks
# what would be carried: bench/carry when it is built, else a copy made from the installed wheel.
#
# Every step has its own time budget (`timeout`), so one slow step cannot starve the others.
# Everything lands in OUTDIR: gpu-run.log (every step's output), summary.md
# (one line per step), versions.json and each check's JSON / markdown (quantized.json: part 3).
#
# Nothing needs installing: the checks run as modules (`python -m bench.gpu_check`) from the
# repository root, which puts the root (qadapter_kernels, bench) on the path; PYTHONPATH adds
# python/ (the qadapter model layer) for the consumer step.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: bash bench/gpu.sh OUTDIR [1|2|3|4|all|STEP,STEP,...] [--dry-run]}"
PART="${2:-all}"
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done
[ "$PART" = "--dry-run" ] && PART=all
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ] && PY="$ROOT/.venv/bin/python"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu-run.log"
SUMMARY="$OUT/summary.md"
cd "$ROOT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
# bitsandbytes as carried (bench/carry.py); the dry run builds a copy when none is built.
CARRY="${QADAPTER_CARRY:-$ROOT/bench/carry}"
if [ "$DRY" = 1 ] && [ ! -d "$CARRY/site" ] && "$PY" -c "import bitsandbytes" 2>/dev/null; then
  CARRY="$(mktemp -d)"
  trap 'rm -rf "$CARRY"' EXIT
  "$PY" -m bench.carry --out "$CARRY" >/dev/null
fi
[ -d "$CARRY/site" ] && export PYTHONPATH="$CARRY/site:$PYTHONPATH"
export MAX_JOBS="${MAX_JOBS:-16}"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  SCALE=dry
else
  SCALE=gpu
fi
# The CUDA extension (just-in-time build and wheel) for this GPU's own compute capability, with PTX
# (qadapter_kernels/toolchain/cuda_archs.py; without a GPU, its default list): a fixed list would leave other
# GPUs without a kernel image.
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -m qadapter_kernels.toolchain.cuda_archs 2>/dev/null)}"
export TORCH_CUDA_ARCH_LIST
export PY OUT DRY
FAILED=0
[ -f "$SUMMARY" ] || printf '| step | result | seconds |\n|---|---|---|\n' >"$SUMMARY"

# pytest-xdist and pytest-timeout are used where they import (nothing is installed on the GPU
# machine): `-n WORKERS --timeout SECONDS`, each only with its plugin. The dry run passes the same
# flags as the GPU run; without xdist the test steps run serially, with longer budgets.
HAVE_XDIST=0 HAVE_TIMEOUT=0
"$PY" -c "import xdist" 2>/dev/null && HAVE_XDIST=1
"$PY" -c "import pytest_timeout" 2>/dev/null && HAVE_TIMEOUT=1
plugin_flags() {  # plugin_flags WORKERS SECONDS
  [ "$HAVE_XDIST" = 1 ] && printf -- '-n %s ' "$1"
  [ "$HAVE_TIMEOUT" = 1 ] && printf -- '--timeout %s ' "$2"
  return 0
}
# shellcheck disable=SC2207  # the flags are words without spaces
TRITON_PYTEST=(-q -rfE -p no:cacheprovider $(plugin_flags 8 60))
# shellcheck disable=SC2207
BACKEND_PYTEST=(-q -rfE -p no:cacheprovider $(plugin_flags 4 90))
TRITON_BUDGET=$([ "$HAVE_XDIST" = 1 ] && echo 100 || echo 150)
BACKEND_BUDGET=$([ "$HAVE_XDIST" = 1 ] && echo 150 || echo 210)
echo "=== TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; pytest flags: ${TRITON_PYTEST[*]} | ${BACKEND_PYTEST[*]}" | tee -a "$LOG"

# step NAME BUDGET_S COMMAND...: runs COMMAND under its own time budget, logs and summarizes it.
step() {
  local name="$1" budget="$2"
  shift 2
  local start=$SECONDS rc
  echo "=== $name (budget ${budget}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  local first_line=$(($(wc -l <"$LOG") + 1))  # this step's output starts here
  if declare -F "$1" >/dev/null; then  # a function of this script: `timeout` needs a program
    set -- bash -c "$(declare -f "$1"); $1"
  fi
  timeout --kill-after=10 "$budget" "$@" >>"$LOG" 2>&1
  rc=$?
  local took=$((SECONDS - start)) result="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then result="TIMEOUT"; FAILED=1
  elif [ "$rc" -ne 0 ]; then result="FAILED (exit $rc)"; FAILED=1; fi
  echo "=== $name: $result in ${took}s" | tee -a "$LOG"
  printf '| %s | %s | %s |\n' "$name" "$result" "$took" >>"$SUMMARY"
  tail -n "+$first_line" "$LOG" | grep -E "passed|failed|error|Error|wrote|skipped" | tail -n 3 || true
  return 0
}
skip() {
  echo "=== $1: skipped ($2)" | tee -a "$LOG"
  printf '| %s | skipped: %s | 0 |\n' "$1" "$2" >>"$SUMMARY"
}

# bench/common.py's version record, with the device count and the CUDA tools found.
versions() {
  "$PY" -m bench.common "$OUT/versions.json"
}

build_extension() {
  "$PY" -c "
import time; t = time.time()
from qadapter_kernels import _cuda
ok, why = _cuda.backend_status()
print('CUDA extension:', 'available' if ok else 'NOT available: ' + why, f'({time.time() - t:.0f} s)')
raise SystemExit(0 if ok else 1)"
}

wheel_check() {
  local tmp
  tmp="$(mktemp -d)"
  "$PY" -m pip wheel --no-build-isolation --no-deps -w "$tmp/dist" . &&
    "$PY" -m pip install --no-deps --no-index --target "$tmp/site" "$tmp"/dist/*.whl &&
    (cd "$tmp" && PYTHONPATH="$tmp/site" "$PY" -c "
import qadapter_kernels, qadapter_kernels._cuda as c
print('installed from', qadapter_kernels.__file__)
ok, why = c.backend_status()
import importlib.util
compiled = importlib.util.find_spec('qadapter_kernels._C') is not None
print('compiled extension in the wheel:', compiled, '| backend:', ok, why)
raise SystemExit(0 if (ok and compiled) or '$DRY' == '1' else 1)")
}

# Steps by name; a part is a list of them, and any list can be given instead (to rerun some).
PART1="versions,triton-tests,cuda-build,backend-tests,gpu-check,cuda-check,consumer"
PART2="memcheck,racecheck,grad-filter,wheel"
PART3="carry,quantized"
PART4="consumer-compiled"
wants() { [[ ",$STEPS," == *",$1,"* ]]; }

run_steps() {
  wants versions && step versions 60 versions
  if [ "$DRY" = 1 ]; then
    wants cuda-build && skip "cuda extension build" "no GPU (dry run)"
    wants triton-tests && step "triton tests (interpreter)" 300 "$PY" -m pytest "${TRITON_PYTEST[@]}" tests/kernels/test_triton.py -k "row_step or inf or guard"
    wants backend-tests && step "backend agreement (interpreter)" 300 "$PY" -m pytest "${BACKEND_PYTEST[@]}" tests/kernels/test_backends.py -k "loss_modes and current"
    wants gpu-check && step "gpu_check (tiny shapes)" 300 "$PY" -m bench.gpu_check --dry-run --out "$OUT/gpu-check.json"
    wants cuda-check && skip "cuda tests and cuda_check" "no GPU (dry run)"
    wants consumer && step "consumer step (tiny model)" 200 "$PY" -m bench.consumer_gpu --dry-run --out "$OUT/consumer.json"
    wants memcheck && skip "compute-sanitizer" "no GPU (dry run)"
    wants grad-filter && step "grad filter (tiny shape)" 120 "$PY" -m bench.grad_filter --backend chunked-triton \
      --shape tiny --tokens 16 --rounds 1 --out "$OUT/grad-filter.json"
    wants wheel && step "wheel" 300 wheel_check
    if [ -d "$CARRY/site" ]; then
      wants carry && step "bitsandbytes (carried)" 120 "$PY" -m bench.carry --check "$CARRY"
      wants quantized && step "quantized base (tiny model)" 300 "$PY" -m bench.quantized_gpu --dry-run --out "$OUT/quantized.json"
    else
      { wants carry || wants quantized; } && skip "bitsandbytes (carried) and quantized base" "bitsandbytes is not installed here"
    fi
    wants consumer-compiled && step "consumer decoding, compiled (tiny model)" 200 "$PY" -m bench.consumer_gpu --dry-run \
      --decoding compiled --out "$OUT/consumer-compiled.json"
    return
  fi
  # The extension and the wheel compile on the CPU cores while the GPU runs the Triton tests.
  local builder="" wheeler=""
  if wants cuda-build || wants gpu-check || wants cuda-check || wants memcheck || wants racecheck; then
    (timeout 240 "$PY" -c "from qadapter_kernels import _cuda; print(_cuda.backend_status())" >"$OUT/.build.log" 2>&1) &
    builder=$!
  fi
  if wants wheel; then
    # QADAPTER_BUILD_CUDA=1: a failed extension build fails the wheel with the compiler's output (unset, setup.py
    # would install without it, and pip shows a build's output only when the build fails).
    (MAX_JOBS=8 QADAPTER_BUILD_CUDA=1 timeout 280 bash -c "$(declare -f wheel_check); wheel_check" >"$OUT/.wheel.log" 2>&1
     echo "exit $?" >>"$OUT/.wheel.log") &
    wheeler=$!
  fi
  wants triton-tests && step "triton tests (GPU)" "$TRITON_BUDGET" \
    "$PY" -m pytest "${TRITON_PYTEST[@]}" tests/kernels/test_triton.py
  if [ -n "$builder" ]; then
    wait "$builder"
    cat "$OUT/.build.log" >>"$LOG"; rm -f "$OUT/.build.log"
    # A build killed at its limit (here or in the Triton tests, whose backends() builds too) leaves torch's
    # lock file, on which every later build would wait for ever; nothing else builds now.
    rm -f "$("$PY" -c 'from qadapter_kernels.toolchain.cache import cache_dir; print(cache_dir("cuda"))')/lock"
  fi
  wants cuda-build && step "cuda extension build" 60 build_extension
  # Every registered backend against the reference (tests/kernels/test_backends.py, bf16 included; inside a
  # CUDA autocast region, test_autocast.py), then the GPU-only paths (torch.compile through the custom ops,
  # the model layer, decoding and serving on CUDA).
  wants backend-tests && step "backend agreement and GPU paths" "$BACKEND_BUDGET" \
    "$PY" -m pytest "${BACKEND_PYTEST[@]}" tests/kernels/test_backends.py tests/kernels/test_autocast.py \
    tests/kernels/test_gpu_paths.py
  # Errors first, then timings; each row bounded (a first-call autotune), the rows left skipped at the budget.
  wants gpu-check && step "gpu_check" 170 "$PY" -m bench.gpu_check --budget-s 150 --row-limit-s 40 --out "$OUT/gpu-check.json"
  # cuda_check runs the CUDA tests (pytest -m gpu tests/kernels/test_cuda_ext.py) before its timings.
  wants cuda-check && step "cuda tests and cuda_check" 90 "$PY" -m bench.cuda_check --skip-sanitizer --out "$OUT"
  # The last part (8 adapters in one batch, then serving) starts within the budget and has the rest to finish;
  # a part still running at --limit-s is cut short (recorded as timed out) and the JSON, rewritten after
  # every part, keeps the parts measured.
  wants consumer && step "consumer step (Llama-3.1-8B, 24 GB cap)" 140 "$PY" -m bench.consumer_gpu --budget-s 85 \
    --limit-s 130 --out "$OUT/consumer.json"
  if command -v compute-sanitizer >/dev/null; then
    wants memcheck && step "memcheck (CUDA + Triton, small shapes)" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 "$PY" -m pytest -q -p no:cacheprovider \
      tests/kernels/test_cuda_ext.py::test_row_step_alias_z_and_bad_target tests/kernels/test_cuda_ext.py::test_pairwise_mismatched_counts_flag_nan \
      tests/kernels/test_triton.py::test_row_step_strided_rows tests/kernels/test_triton.py::test_inf_bias_block \
      "tests/kernels/test_triton.py::test_kept_blocks_product_matches_the_masked_product[strided-dtype2]" \
      "tests/kernels/test_triton.py::test_kept_blocks_head_product_matches_the_masked_product[dtype2]"
    wants racecheck && step "racecheck (CUDA row step and pairwise)" 90 compute-sanitizer --tool racecheck --error-exitcode 99 \
      --print-limit 20 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_ext.py::test_row_step_alias_z_and_bad_target \
      tests/kernels/test_cuda_ext.py::test_pairwise_mismatched_counts_flag_nan
  else
    { wants memcheck || wants racecheck; } && skip "compute-sanitizer" "not installed"
  fi
  wants grad-filter && step "grad filter (Llama-3.1-8B head, random and peaked)" 150 "$PY" -m bench.grad_filter \
    --device cuda --backend chunked-triton --shape llama-3.1-8b --rounds 3 --out "$OUT/grad-filter.json"
  if [ -n "$wheeler" ]; then
    local start=$SECONDS
    wait "$wheeler"
    cat "$OUT/.wheel.log" >>"$LOG"
    local result="FAILED"
    grep -q "^exit 0$" "$OUT/.wheel.log" && result="ok"
    [ "$result" = ok ] || FAILED=1
    printf '| %s | %s | %s (waited) |\n' "wheel with the compiled extension" "$result" "$((SECONDS - start))" >>"$SUMMARY"
    echo "=== wheel: $result" | tee -a "$LOG"
    rm -f "$OUT/.wheel.log"
  fi
  wants carry && step "bitsandbytes (carried)" 120 "$PY" -m bench.carry --check "$CARRY"
  wants quantized && step "quantized base (Llama-3.1-8B, 8-24 GiB caps)" 420 "$PY" -m bench.quantized_gpu --budget-s 390 \
    --limit-s 410 --out "$OUT/quantized.json"
  wants consumer-compiled && step "consumer decoding, compiled (Llama-3.1-8B, 24 GB cap)" 290 "$PY" -m bench.consumer_gpu \
    --decoding compiled --budget-s 200 --limit-s 280 --out "$OUT/consumer-compiled.json"
}

case "$PART" in
  1) STEPS="$PART1" ;;
  2) STEPS="$PART2" ;;
  3) STEPS="$PART3" ;;
  4) STEPS="$PART4" ;;
  all) STEPS="$PART1,$PART2,$PART3,$PART4" ;;
  *) STEPS="$PART" ;;
esac
for name in ${STEPS//,/ }; do
  [[ ",$PART1,$PART2,$PART3,$PART4," == *",$name,"* ]] || { echo "unknown step '$name'; steps: $PART1,$PART2,$PART3,$PART4" >&2; exit 2; }
done
run_steps
echo
cat "$SUMMARY"
echo "results in $OUT"
exit "$FAILED"
