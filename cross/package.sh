#!/usr/bin/env bash
# weld-edge for the RDK X5: the aarch64 build and its .deb for arm64.
#
#   bash cross/package.sh [CARGO FEATURES, e.g. v4l,ort]
#
# Writes target/deb/weld-edge_VERSION_arm64.deb and prints what it holds. Needs (Debian):
#   rustup target add aarch64-unknown-linux-gnu
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross
# and for the v4l feature also libclang-dev (the V4L2 bindings are generated for aarch64 from
# the cross headers). The realsense feature needs librealsense2 built for arm64, which Debian
# does not ship: build that one on the board (README "On the board").
set -euo pipefail
cd "$(dirname "$0")/.."
features=${1:-}
target=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--target=aarch64-linux-gnu -I/usr/aarch64-linux-gnu/include"

# Without the builtin-model feature: the default model is installed as a file (below) instead
# of embedded, which keeps the binary within the board's 30 MB.
cargo build --release --locked -p weld-edge --target "$target" --no-default-features \
    ${features:+--features "$features"}
bin=target/$target/release/weld-edge
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/weld-edge_${version}_arm64
install -D -m 0755 "$bin" "$root/usr/bin/weld-edge"
aarch64-linux-gnu-strip "$root/usr/bin/weld-edge"
# The default model, where the binary built without builtin-model looks for it
# (edge-daemon/src/model.rs, BUILTIN_BUNDLE_PATH); it is checked against the key built in.
install -D -m 0644 models/default/weld-default.bundle "$root/usr/share/weld-edge/weld-default.bundle"
install -D -m 0644 systemd/weld-edge.service "$root/usr/lib/systemd/system/weld-edge.service"
install -D -m 0644 firmware-config/99-weld-edge-camera.rules \
    "$root/usr/lib/udev/rules.d/99-weld-edge-camera.rules"
# The service's config: the V4L2 board when that camera is built in, else the demo; both are
# templates to finish (device id, broker, model, keys) before the service is enabled.
config=firmware-config/demo.toml
case ",$features," in *,v4l,*) config=firmware-config/rdk-x5-v4l2.toml ;; esac
install -D -m 0644 "$config" "$root/etc/weld-edge/weld-edge.toml"
doc=$root/usr/share/doc/weld-edge
install -D -m 0644 README.md "$doc/README.md"
install -D -m 0644 systemd/README.md "$doc/systemd.md"
install -D -m 0644 firmware-config/README.md "$doc/firmware-config.md"
for f in firmware-config/*.toml firmware-config/journald-weld-edge.conf; do
    install -D -m 0644 "$f" "$doc/examples/$(basename "$f")"
done

install -d "$root/DEBIAN"
size_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size_kb/" cross/debian/control >"$root/DEBIAN/control"
install -m 0644 cross/debian/conffiles "$root/DEBIAN/conffiles"
for s in postinst prerm postrm; do
    install -m 0755 "cross/debian/$s" "$root/DEBIAN/$s"
done

mkdir -p target/deb
deb=target/deb/weld-edge_${version}_arm64.deb
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"
echo "binary: $(stat -c %s "$root/usr/bin/weld-edge") bytes stripped; package: $(stat -c %s "$deb") bytes: $deb"
