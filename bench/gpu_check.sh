#!/usr/bin/env bash
# The one prepared GPU check: at most about 5 minutes on one H100/H200-class GPU (section limits 15 + 170 + 60 + 60
# s), no network. Each section writes its results into OUT as soon as it finishes (the throughput section after every
# child run, its log as it goes), so a run cut off still returns what it measured; OUT/summary.txt lists every
# section with its exit status and seconds (124: its time limit cut it).
#
#   1. env:        the device, torch and the installed packages
#   2. throughput: bench/throughput.py at 60M and 350M, bf16-true, micro-batch 8 x sequence 256 (AdamW, randomized
#                  importance with stagger 4 and its 8-bit, projected and compiled variants, AdamW compiled)
#   3. step:       bench/optimizer_step.py at 60M and 130M, and the 1B refresh cost (full vs randomized SVD)
#   4. memory:     bench/memory.py at 350M and 1B (AdamW 8-bit, low-rank 8-bit, per-layer, projected), and the
#                  estimator's 7B table (a measured single-device 7B row does not exist yet)
#
#     bash bench/gpu_wheels.sh                       # beforehand, where packages can be fetched
#     bash bench/gpu_check.sh "$OUT"                 # on the GPU machine (carry .gpu_wheels)
#     bash bench/gpu_check.sh OUT --dry-run          # the same sections on the CPU with tiny sizes (a test runs it)
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--dry-run]}
DRY=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
: > "$OUT/summary.txt"

section() {  # section NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "$name exit $status seconds $((SECONDS - start))" >> "$OUT/summary.txt"
}

if [ -d .gpu_wheels ] && [ -z "$DRY" ]; then  # what the lent machine lacks; never the network
    python -m pip install --quiet --no-index --no-deps --find-links .gpu_wheels \
        omegaconf antlr4-python3-runtime torchdata lowrank-recipes > "$OUT/install.log" 2>&1
    echo "install exit $? seconds $SECONDS" >> "$OUT/summary.txt"
fi

section env 15 bash -c 'nvidia-smi || true; python -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"cpu\")"; python -m pip list 2>/dev/null | grep -i -E "torch|lightning|omegaconf|tokenizers|datasets"'

if [ -n "$DRY" ]; then
    DEVICE=(--device cpu)
    section throughput 300 python bench/throughput.py --quick "${DEVICE[@]}" --variants adamw \
        randomized-importance-stagger4-projected --out "$OUT/throughput.json"
    section step 300 python bench/optimizer_step.py --quick "${DEVICE[@]}" --no-galore --out "$OUT/optimizer_step.json"
    section memory 300 python bench/memory.py --quick "${DEVICE[@]}" --variants adamw-8bit lowrank-8bit-projected \
        --out "$OUT/memory.json"
else
    DEVICE=(--device cuda)
    section throughput 170 python bench/throughput.py "${DEVICE[@]}" --sizes 60m 350m --tokens 8x256 \
        --precision bf16-true --repeats 1 --steps 8 --warmup 2 --variants adamw adamw+compile \
        randomized-importance-stagger4 randomized-importance-stagger4+compile randomized-importance-stagger4-8bit \
        randomized-importance-stagger4-projected --out "$OUT/throughput.json"
    section step 60 python bench/optimizer_step.py "${DEVICE[@]}" --models 60m 130m --refresh-models 1b \
        --no-galore --out "$OUT/optimizer_step.json"
    section memory 60 python bench/memory.py "${DEVICE[@]}" --sizes 350m 1b --no-stagger-one --variants adamw-8bit \
        lowrank-8bit lowrank-8bit-per-layer lowrank-8bit-projected --out "$OUT/memory.json"
fi
cat "$OUT/summary.txt"
