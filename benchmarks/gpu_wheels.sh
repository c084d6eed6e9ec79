#!/usr/bin/env bash
# On a machine with PyPI: download the wheels of the test dependencies that the lent GPU
# machine's image lacks (diffusers, with the one package it needs beyond that image, and
# expecttest), built for that machine's Python 3.12, into .whl/ (git-ignored). Then, there:
#   WHEELS=.whl bash benchmarks/gpu_check.sh        (the device tool carrying .whl)
# The versions are those that ran on the H200 on 2026-11-29 (benchmarks/results/gpu-check-H200.md).
set -euo pipefail
dest=${1:-.whl}
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
  diffusers==0.42.1 importlib_metadata==10.2.0 expecttest==0.3.0
