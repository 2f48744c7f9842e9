#!/usr/bin/env bash
# Prepares, on a machine with package access, what bench/gpu_check.sh installs on the lent GPU machine (no network
# there; it had torch, lightning, tokenizers, torchmetrics and tensorboard, not omegaconf, torchdata or datasets):
# pure-Python wheels of omegaconf, its antlr4 runtime and torchdata, plus this project's own wheel, in .gpu_wheels/
# (git-ignored; about 0.6 MB). Pass it to the device run as carried path: carry [".gpu_wheels"].
#
#     bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_wheels
mkdir -p .gpu_wheels
python -m pip download --quiet --no-deps -d .gpu_wheels omegaconf antlr4-python3-runtime torchdata
python -m pip wheel --quiet --no-deps --no-build-isolation -w .gpu_wheels .
ls -l .gpu_wheels
