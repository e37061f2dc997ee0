#!/usr/bin/env bash
# Training throughput on a GPU machine (docs/PERFORMANCE.md, "Training"; issue: images/s at
# 224x224, bf16, batch 256, ResNet50 and MobileNetV2, data pipeline included).
#
# Build here, carry, run there. On the build machine:
#   python3 -m pip install --target .tools/torch-cuda-2.11.0 torch==2.11.0     # full CUDA wheel
#   LIBTORCH=$PWD/.tools/torch-cuda-2.11.0/torch \
#       cargo build --release -p weld-trainer --features cuda
#   strip -o target/weld-trainer-cuda target/release/weld-trainer
# On the GPU machine (its libtorch first on the library path; the binary also needs
# libfontconfig.so.1 and libfreetype.so.6 for the report plots):
#   BIN=target/weld-trainer-cuda \
#   LIBTORCH_LIB=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib bash docs/bench/train-gpu.sh
# Prints one line per network with the img/s of the second epoch (the first fills the
# preprocessing cache; both are in each run's metrics.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/weld-trainer}
WORK=${WORK:-target/train-gpu}
PER_CLASS=${PER_CLASS:-600}      # 3,000 frames: 2,400 training, 12 batches of 256 per epoch
BATCHES=${BATCHES:-9}
if [ -n "${LIBTORCH_LIB:-}" ]; then
    export LD_LIBRARY_PATH="$LIBTORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
ldd "$BIN" | grep 'not found' && { echo "missing libraries for $BIN" >&2; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK"
"$BIN" dataset synth --out "$WORK/synth" --per-class "$PER_CLASS" --seed 11 --size 640x480
for arch in resnet50 mobilenet_v2; do
    out="$WORK/$arch"
    "$BIN" train "$WORK/synth" --out "$out" --arch "$arch" --device cuda --precision bf16 \
        --size 224 --batch-size 256 --epochs 2 --max-batches "$BATCHES" --patience 0 \
        --workers "$(nproc)" --cache-mb 16384
    ips=$(sed -n 2p "$out/metrics.jsonl" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["train_images_per_s"]))')
    echo "$arch: $ips img/s (bf16, batch 256, 224x224, data pipeline included)"
done
