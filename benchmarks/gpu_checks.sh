#!/usr/bin/env bash
# The GPU checks of docs/scaling.md (sections 2b-2d) in one call, for a lent machine: each check under its own
# time limit, its JSON lines appended to $OUT/gpu_checks.jsonl, its log to $OUT/<name>.log, a table last.
#
#   bash benchmarks/gpu_checks.sh            # on the device machine (OUT is set there); the limits add up to 590 s (one call)
#   DEVICE=cpu SCALE=0.02 bash benchmarks/gpu_checks.sh   # a dry run here: every command parses and runs
#
# Order: what the issue needs most first, so that a run cut short still answers it. It runs under the
# machine's own python3: the project's packages must be there (the device README says how to carry wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}; DEVICE=${DEVICE:-cuda}; SCALE=${SCALE:-1}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
n() { python3 -c "print(max(50, int($1 * $SCALE)))"; }

check() {  # check NAME SECONDS COMMAND...: run, keep the JSON lines, say how it ended
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    grep '^{' "$OUT/$name.log" | sed "s/^{/{\"check\": \"$name\", /" >> "$OUT/gpu_checks.jsonl"
    printf "%-22s rc %-3s %4ss\n" "$name" "$rc" "$((SECONDS - start))" >> "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available())" \
    >> "$OUT/device.txt" 2>&1

# 4. The fusion anomaly: the demo's test on CUDA (fused above every single modality, for the right reason).
check demo_test 150 python3 -m pytest -q -x tests/test_demo.py -k "fused_beats or sketch_store_equals"
# 1. Photos: nvJPEG and the CPU threads against Pillow; then image extraction against the bare forward.
check decode_nvjpeg 45 python3 benchmarks/extract.py --modality image --decode-only --device "$DEVICE" \
    --items "$(n 4000)"
check decode_threads 45 python3 benchmarks/extract.py --modality image --decode-only --device "$DEVICE" \
    --decode-device cpu --items "$(n 4000)"
check extract_image 100 python3 benchmarks/extract.py --modality image --device "$DEVICE" \
    --model efficientnet_b2 --items "$(n 4000)"
check extract_title_cam 80 python3 benchmarks/extract.py --modality title_cam --device "$DEVICE" \
    --items "$(n 40000)"
# 2. The write path on 16 cores; 3. the reader in memory and streaming.
check store_write 40 python3 benchmarks/store_write.py --writers 1 2 4
check train_reader 60 python3 benchmarks/train_reader.py --items "$(n 20000)"
# 5. Every stage with the paper-size models (the 99,000-item target is a run of its own: --items 99000).
check end_to_end 70 python3 benchmarks/end_to_end.py --items "$(n 5000)" --epochs 1

echo; cat "$OUT/summary.txt"; echo; tail -n 12 "$OUT/gpu_checks.jsonl" | cut -c1-220
