#!/usr/bin/env bash
# The aarch64 build of weld-edge against the x86_64 one, for correctness only (qemu's timings
# mean nothing): each bundle is loaded as the board loads it (signature, hashes, the golden
# check on tract), then `inspect --policy model` judges the
# same frames on both builds, and the decisions and confidences are compared. DATASET is a
# dataset folder (keep it small: emulation runs the model some 20x slower).
#
#   bash docs/bench/aarch64-parity.sh KEY.pub DATASET BUNDLE...
#
# Needs: rustup target add aarch64-unknown-linux-gnu; apt-get install gcc-aarch64-linux-gnu
# libc6-dev-arm64-cross qemu-user (NOTES: ONNX Runtime's aarch64 library does not run under
# qemu-user, so only tract is compared).
set -euo pipefail
cd "$(dirname "$0")/../.."
key=$1 data=$2
shift 2
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cargo build --release --locked -p weld-edge
cargo build --release --locked -p weld-edge --target aarch64-unknown-linux-gnu
x86=target/release/weld-edge
arm=target/aarch64-unknown-linux-gnu/release/weld-edge
out=$(mktemp -d)
for bundle in "$@"; do
    name=$(basename "$bundle")
    args=(inspect --policy model --model "$bundle" --trusted "$key" --backend tract "$data")
    "$x86" "${args[@]}" >"$out/$name.x86.jsonl" 2>"$out/$name.x86.log"
    qemu-aarch64 -L /usr/aarch64-linux-gnu "$arm" "${args[@]}" \
        >"$out/$name.arm.jsonl" 2>"$out/$name.arm.log"
    python3 - "$out/$name.x86.jsonl" "$out/$name.arm.jsonl" "$name" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b), (len(a), len(b))
same = sum(x["model"]["class"] == y["model"]["class"] for x, y in zip(a, b))
diff = max(abs(x["model"]["confidence"] - y["model"]["confidence"]) for x, y in zip(a, b))
print(f"{sys.argv[3]}: {len(a)} frames, same class on {same}, "
      f"largest confidence difference {diff:.2e}")
PY
    # inspect exits non-zero when the bundle does not load: getting here means the aarch64
    # build verified it and reproduced its golden logits on tract.
    echo "  aarch64: verified, golden check passed on tract"
done
ls -l "$arm" | awk '{print "aarch64 binary:", $5, "bytes"}'
