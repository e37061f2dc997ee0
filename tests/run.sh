#!/usr/bin/env bash
# The project's one pre-merge command (README "Test"): installs what the tests need, then runs
# formatting, lints and every test of the workspace. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== toolchain"
# rust-toolchain.toml pins the compiler and asks for rustfmt and clippy; rustup installs them
# on first use.
cargo --version
rustc --version

echo "== fmt"
cargo fmt --all -- --check

echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests"
cargo test --workspace --locked

echo "== all checks passed"
