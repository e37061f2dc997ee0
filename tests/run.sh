#!/usr/bin/env bash
# The project's one pre-merge command (README "Test"): installs what the tests need, then runs
# formatting, lints (default features and every optional feature) and every test of the
# workspace. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

echo "== toolchain"
# rust-toolchain.toml pins the compiler and asks for rustfmt and clippy; rustup installs them
# on first use.
cargo --version
rustc --version

echo "== system packages"
# libclang-dev: bindgen in the v4l feature's V4L2 bindings; pkg-config: the realsense feature;
# mosquitto and mosquitto-clients: the real broker and subscriber of the MQTT tests (started
# by the tests themselves on free loopback ports); openssl: their TLS certificates; chromium:
# the headless browser of the dashboard test; libfontconfig1-dev and fonts-dejavu-core: the
# text of the trainer's report plots; systemd: `systemd-analyze verify` of the service's unit;
# gcc-aarch64-linux-gnu and libc6-dev-arm64-cross: the C parts (ring) of the board's build.
need=()
for p in libclang-dev pkg-config mosquitto mosquitto-clients openssl chromium \
    libfontconfig1-dev fonts-dejavu-core systemd gcc-aarch64-linux-gnu libc6-dev-arm64-cross; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo_=""
    [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need[@]}"
fi

echo "== ONNX Runtime for the ort backend"
# The ort crate loads ONNX Runtime at run time (load-dynamic); the pinned wheel carries the
# shared library. Installed into .tools/ (git-ignored), reused when already there.
ORT_VERSION=1.32.0
export ORT_DYLIB_PATH="$ROOT/.tools/onnxruntime/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION"
if [ ! -f "$ORT_DYLIB_PATH" ]; then
    python3 -m pip install --quiet --no-deps --target "$ROOT/.tools/onnxruntime" \
        "onnxruntime==$ORT_VERSION"
fi

echo "== libtorch for the trainer's torch feature"
# tch 0.24 builds against PyTorch 2.11.0's libtorch, taken from the pinned wheel on the package
# index (the default build is CUDA's; these three wheels are enough to build and run on the
# CPU). Installed into .tools/ (git-ignored), reused when already there.
TORCH_VERSION=2.11.0
export LIBTORCH="$ROOT/.tools/torch-$TORCH_VERSION/torch"
if [ ! -f "$LIBTORCH/lib/libtorch_cpu.so" ]; then
    python3 -m pip install --quiet --no-deps --target "$ROOT/.tools/torch-$TORCH_VERSION" \
        "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
fi

echo "== Python's onnx for onnx.checker"
# The exporter's tests hand every written model to onnx.checker (full check). Pinned, with its
# dependencies, into .tools/ (git-ignored), reused when already there.
ONNX_VERSION=1.23.2
if [ ! -f "$ROOT/.tools/onnx/onnx-$ONNX_VERSION.dist-info/METADATA" ]; then
    rm -rf "$ROOT/.tools/onnx"
    python3 -m pip install --quiet --target "$ROOT/.tools/onnx" "onnx==$ONNX_VERSION"
fi

echo "== fmt"
cargo fmt --all -- --check

echo "== clippy (default features)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== clippy (weld-trainer with torch and ort)"
cargo clippy -p weld-trainer --all-targets --locked --features torch,ort -- -D warnings

echo "== clippy (weld-edge with ort and v4l)"
cargo clippy -p weld-edge --all-targets --locked --features ort,v4l -- -D warnings

echo "== realsense feature compiles"
# Debian has no librealsense2; realsense-sys only asks pkg-config for a realsense2 2.x and
# ships its bindings, so a .pc file lets the feature type-check here. The board installs the
# real SDK (README "On the board").
pc_dir="$ROOT/target/pkgconfig"
mkdir -p "$pc_dir"
cat >"$pc_dir/realsense2.pc" <<'EOF'
Name: realsense2
Description: Intel RealSense SDK 2.0 (stand-in for type-checking; not for linking)
Version: 2.56.5
Libs: -lrealsense2
Cflags:
EOF
PKG_CONFIG_PATH="$pc_dir" cargo clippy -p weld-edge --locked --features realsense -- -D warnings

echo "== clippy (weld-edge for the board: aarch64)"
# The RDK X5's target, linted as it is built by cross/package.sh (which also needs the linker
# and qemu-user to run it: cross/README.md).
rustup target add aarch64-unknown-linux-gnu
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cargo clippy -p weld-edge --all-targets --locked --target aarch64-unknown-linux-gnu -- -D warnings

echo "== tests"
# weld-edge's tests run with the ort feature so both backends are checked against the
# reference models, and weld-trainer's with torch so training runs (on the CPU) and with ort
# so exported and quantized models are checked in ONNX Runtime too. One libtorch
# thread per test process: parallel tests with libtorch's own thread pools crawl on 2 cores.
OMP_NUM_THREADS=1 cargo test --workspace --locked --features weld-edge/ort,weld-trainer/torch,weld-trainer/ort

echo "== all checks passed"
