#!/usr/bin/env bash
# bench/gpu_lease.sh OUTDIR [--dry-run]
#
# Everything a lent GPU machine should run, in one call of at most 9 minutes of wall time, on a bare
# machine with torch, triton and nvcc and no network (DESIGN.md "The one-launch step and GPU truth"):
#   1. build   in place for this GPU's arch: SCOREFAST_CUDA_ARCHS from nvidia-smi (or torch),
#              MAX_JOBS=$(nproc), pip install --no-build-isolation --no-deps -e .   (then scorefast info)
#   2. tests   the cuda-marked tests (junit: OUTDIR/cuda-tests.xml)
#   3. gpu     scorefast bench --suite gpu           -> OUTDIR/gpu.json          (micro-benchmarks)
#   4. e2e-mlp scorefast bench --suite gpu-e2e-mlp   -> OUTDIR/gpu-e2e-mlp.json  (end to end)
#   5. e2e-unet scorefast bench --suite gpu-e2e-unet -> OUTDIR/gpu-e2e-unet.json
# Each step has a time limit within what is left of the budget; the suites write their JSON row by
# row, so a step cut off still leaves its results.  Everything printed also goes to OUTDIR/lease.log,
# and the summary (bench/lease_summary.py: steps, tests passed/failed, key ratios) comes last.
#
# --dry-run: the same steps on this CPU at toy sizes: no build (the installed package is used and
# `scorefast info` shows it), the cuda tests collected and skipped, the suites on CPU tensors
# (SCOREFAST_BENCH_DEVICE=cpu, --quick, one round, a few cases each; the cuda backend under its host
# emulation, Triton under its interpreter; the UNet suite collected only, a CPU being too slow for
# its network), with twice the time limits.  CI runs it (tests/test_gpu_lease.py).
#
# Environment: PYTHON (default python3), SCOREFAST_LEASE_BUDGET_S (default 540).
set -u -o pipefail

usage() { echo "usage: bench/gpu_lease.sh OUTDIR [--dry-run]" >&2; exit 2; }
OUT="" DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage ;;
    -*) echo "gpu_lease.sh: unknown option $arg" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT="$arg" ;;
  esac
done
[ -n "$OUT" ] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${SCOREFAST_LEASE_BUDGET_S:-540}"
SLACK=1
T0=$(date +%s)
STEPS=()
exec > >(tee -a "$OUT/lease.log") 2>&1

# step NAME LIMIT_S CMD...: runs CMD with at most LIMIT_S seconds (less if the budget is nearly
# spent; 15 s are kept for the summary), records NAME=RC:SECONDS for the summary
step() {
  local name="$1" limit=$(($2 * SLACK))
  shift 2
  local left=$((BUDGET - ($(date +%s) - T0) - 15))
  [ "$limit" -le "$left" ] || limit="$left"
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, the time budget is spent"
    STEPS+=("$name=skipped:0")
    return
  fi
  echo "== $name (at most ${limit}s): $*"
  local start=$(date +%s)
  timeout -k 5 "$limit" "$@"
  local rc=$?
  STEPS+=("$name=$rc:$(($(date +%s) - start))")
}

gpu_arch() {  # compute capability as SCOREFAST_CUDA_ARCHS wants it ("90"), or nothing without a GPU
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  if [ -z "$cap" ]; then
    cap=$("$PY" -c 'import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f"{c[0]}{c[1]}" if c else "")' 2>/dev/null)
  fi
  echo "$cap"
}

ARCH="$(gpu_arch)"
echo "scorefast GPU lease: $(date -u +%FT%TZ), out $OUT, dry run $DRY, arch '${ARCH:-none}', $(nproc) CPUs, budget ${BUDGET}s"

if [ "$DRY" = 1 ]; then
  echo "== build: dry run, not built; would run: SCOREFAST_CUDA_ARCHS='${ARCH:-<device arch>}' MAX_JOBS=$(nproc) $PY -m pip install --no-build-isolation --no-deps -e ."
  step info 60 "$PY" -m scorefast info
  export SCOREFAST_BENCH_DEVICE=cpu SCOREFAST_CUDA_EMULATE=1 TRITON_INTERPRET=1
  QUICK=(--quick)
  ROUNDS="--benchmark-min-rounds=1 --benchmark-max-time=0 --benchmark-warmup=off"
  MICRO_K="-k 'table or one_kernel'"
  E2E_K="-k 'euler_maruyama-1-graph and not bf16'"
  UNET_ONLY="--collect-only"  # a CPU takes ~0.1 s a UNet call: its grid is collected, not run
  SLACK=2  # a CPU runs the toy sizes (Triton interpreted, CUDA emulated) slower than a GPU the real ones
  BUDGET=$((BUDGET * SLACK))
else
  if [ -z "$ARCH" ]; then
    echo "gpu_lease.sh: no GPU found (nvidia-smi and torch see none); use --dry-run on a CPU machine" >&2
    exit 1
  fi
  export SCOREFAST_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" SCOREFAST_REQUIRE_BACKENDS=cpu,cuda_module
  step build 200 "$PY" -m pip install --no-build-isolation --no-deps -e .
  unset SCOREFAST_REQUIRE_BACKENDS
  step info 30 "$PY" -m scorefast info
  QUICK=()
  ROUNDS="" MICRO_K="" E2E_K="" UNET_ONLY="" SLACK=1
fi

# the cuda-marked tests, from the files that have them (a file that imports a package the machine
# lacks does not stop the others)
mapfile -t CUDA_FILES < <(grep -l "pytest.mark.cuda" tests/test_*.py)
step tests 110 "$PY" -m pytest "${CUDA_FILES[@]}" -m cuda -q -rfE -p no:cacheprovider \
  --continue-on-collection-errors --junit-xml="$OUT/cuda-tests.xml"

for suite in gpu gpu-e2e-mlp gpu-e2e-unet; do
  case "$suite" in
    gpu) limit=110 select="$MICRO_K" ;;
    gpu-e2e-unet) limit=65 select="$E2E_K $UNET_ONLY" ;;
    *) limit=65 select="$E2E_K" ;;
  esac
  step "$suite" "$limit" env PYTEST_ADDOPTS="$ROUNDS $select" \
    "$PY" -m scorefast bench --suite "$suite" "${QUICK[@]}" --out "$OUT/$suite.json"
done

echo
"$PY" bench/lease_summary.py "$OUT" "${STEPS[@]}" | tee "$OUT/summary.txt"
echo "total $(($(date +%s) - T0))s"
