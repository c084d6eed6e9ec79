#!/usr/bin/env bash
# Everything a GPU session should run, in one call of the device tool: build with CUDA, the
# CUDA-marked tests, the op benchmark (one run per op), compute-sanitizer memcheck and
# racecheck on the CUDA op tests, the kernels' SASS, and the training-step benchmark.
# ops_profile.py splits each op's call into kernel and host time.
#
#   bash benchmarks/gpu_check.sh
#
# A lease is minutes, so every stage has a time limit, all of them share one deadline
# (GPU_CHECK_SECONDS, default 560), and a stage that fails or runs out of time does not stop
# the next. Everything lands in ${OUT:-gpu-out}/: log.txt (all output), ops-<gpu>-<op>.md,
# train_step-cuda-unet.md, sass.txt (few files: the device tool returns at most 8).
#
# Environment:
#   GPU_CHECK_OPS               the ops to benchmark (default: all three)
#   MEMCHECK_ALL                1: memcheck every CUDA op test, not a subset
#   GPU_CHECK_TRAIN_STEP        0: skip the training-step benchmark (about 3 minutes)
#   SOFTMIX_CUDA_ARCHITECTURES  e.g. "90-real": build for the card at hand only (about a
#                               third of the default build's compile time); default: the
#                               build's own (sm_80, sm_90 and PTX)
#   WHEELS                      a folder of wheels to install first (test dependencies the
#                               machine lacks, e.g. diffusers: benchmarks/gpu_wheels.sh), into
#                               /tmp/site
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)
start=$SECONDS
deadline=${GPU_CHECK_SECONDS:-560}

# stage NAME LIMIT CMD...: run CMD under min(LIMIT, seconds left), appending to the log.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - (SECONDS - start)))
  if ((left < 10)); then
    echo "=== $name: skipped, out of time" | tee -a "$log"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s, at $((SECONDS - start))s)" | tee -a "$log"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$log"
date -u | tee -a "$log"
if [ -n "${WHEELS:-}" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl >>"$log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

arch=()
[ -n "${SOFTMIX_CUDA_ARCHITECTURES:-}" ] && arch=("-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$SOFTMIX_CUDA_ARCHITECTURES")
stage build 300 "$py" -m pip install --no-build-isolation --no-deps -v "${arch[@]}" .
if ! "$py" -c "import softmix.ops as o; assert o.cuda_kernels_built(), 'built without CUDA kernels'" >>"$log" 2>&1; then
  echo "no CUDA build; stopping" | tee -a "$log"
  tail -40 "$log"
  exit 1
fi

# The CUDA-marked tests (the CPU ones are CI's), spread over 8 processes when xdist is there.
xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n 8)
stage "pytest -m cuda" 180 "$py" -m pytest -q -m cuda "${xdist[@]}" -p no:cacheprovider -rfE --tb=short tests
grep -E "passed|failed" "$log" | tail -1

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd '[:alnum:]-')
ops=${GPU_CHECK_OPS:-latent_transform mc_loss denoise_step}
for op in $ops; do
  stage "ops.py $op" 120 "$py" benchmarks/ops.py --device cuda --ops "$op" --out "$out/ops-${gpu}-${op}.md"
done

# how much of each op's fwd+bwd call is its kernels and how much the host
stage "ops_profile.py" 60 "$py" benchmarks/ops_profile.py --ops "$(echo $ops | tr ' ' ',')" \
  --out "$out/ops-profile-${gpu}.md"

# memcheck: without the caching allocator every tensor is its own allocation, so a read
# past a tensor's end lands outside any allocation and is caught. By default the float32
# cases of the big parametrised tests and every other CUDA op test (the sanitizer slows
# kernels ~100x); MEMCHECK_ALL=1 for all of them.
op_tests=(tests/test_latent_transform.py tests/test_mc_loss.py tests/test_denoise_step.py)
select=(-k "not test_values_and_gradients or float32")
[ -n "${MEMCHECK_ALL:-}" ] && select=()
stage memcheck 200 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
  "$py" -m pytest -q -m cuda "${select[@]}" -p no:cacheprovider "${op_tests[@]}"
stage racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 9 \
  "$py" -m pytest -q -m cuda -k "cuda_agrees_with_cpu" -p no:cacheprovider "${op_tests[@]}"

so=$("$py" -c "import softmix._C as c; print(c.__file__)")
stage sass 30 bash -c "cuobjdump --dump-sass '$so' > '$out/sass.txt' && grep -o 'LDG[.A-Z0-9]*' '$out/sass.txt' | sort | uniq -c"

# last: a row per subprocess makes it the slowest stage, and it is not one of issue 2's checks
if [ "${GPU_CHECK_TRAIN_STEP:-1}" = 1 ]; then
  stage train_step 240 "$py" benchmarks/train_step.py --device cuda --batch 128 --size 32 --backbone unet --write
  cp benchmarks/results/train_step-cuda-unet.md "$out/" 2>/dev/null
fi
echo "=== done at $((SECONDS - start))s" | tee -a "$log"
grep -E "^=== " "$log"
