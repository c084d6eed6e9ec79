#!/usr/bin/env bash
# Everything a GPU session should run, in one go (e.g. one call of the device tool):
# build with CUDA, run the test suite on CUDA tensors, run the CUDA op tests under
# compute-sanitizer memcheck, then the op benchmark. Logs and results go to ${OUT:-gpu-out}/.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"

python -m pip install --no-build-isolation --no-deps -q . 2>&1 | tee "$out/build.log" | tail -5
python -c "import softmix.ops as o; assert o.cuda_kernels_built(), 'built without CUDA kernels'" || exit 1

# The whole suite; CUDA-marked tests run here instead of skipping.
python -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$out/pytest.log" | tail -15

# memcheck on the CUDA op tests only (the sanitizer slows kernels ~100x).
compute-sanitizer --tool memcheck --error-exitcode 9 \
  python -m pytest -q -m cuda -p no:cacheprovider tests/test_latent_transform.py tests/test_mc_loss.py \
  tests/test_denoise_step.py 2>&1 | tee "$out/memcheck.log" | tail -8
echo "memcheck exit: ${PIPESTATUS[0]}" | tee -a "$out/memcheck.log"

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd '[:alnum:]-')
python benchmarks/ops.py --device cuda --out "$out/ops-${gpu}.md" 2>&1 | tee "$out/bench.log" | tail -30
