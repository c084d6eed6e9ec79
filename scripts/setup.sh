#!/usr/bin/env bash
# Everything softmix needs on a fresh machine (Debian, Python 3.10+, CPU is enough):
# torch, the build tools, softmix built against that torch with its test extras, and the
# optional model libraries the tests wrap. Safe to run again: what is installed is kept.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
pip_install() { "$PYTHON" -m pip install --progress-bar off --disable-pip-version-check "$@"; }

# The exact pin: on this project's machines it resolves to a CPU wheel stored locally; any
# other spec would pull the newest CUDA build (gigabytes). Set SOFTMIX_TORCH to choose another.
pip_install "${SOFTMIX_TORCH:-torch==2.13.0}"

# torch is deliberately not a build requirement (DESIGN.md section 6): build against the
# installed one, without pip's isolated environment.
pip_install "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.26,<4"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} pip_install --no-build-isolation ".[test]"

# denoising-diffusion-pytorch, for the test that wraps its Unet. It and pytorch-fid list
# torchvision, whose PyPI wheels are CUDA builds that would replace a CPU torch: installed
# without their dependencies (the Unet and GaussianDiffusion never touch torchvision).
pip_install einops ema-pytorch accelerate
pip_install --no-deps denoising-diffusion-pytorch pytorch-fid

(cd /tmp && "$PYTHON" -c "import softmix.ops as o; print('softmix ready; CUDA kernels built:', o.cuda_kernels_built())")
