#!/usr/bin/env bash
# Builds `supernode` with the Dynamo worker (`--features dynamo`) into $SUPERNODE_CACHE/target-dynamo
# apart from the default build: Dynamo's runtime needs `--cfg tokio_unstable`, and a different
# RUSTFLAGS would rebuild the default target from scratch. Needs protoc and libclang (Debian's
# protobuf-compiler and libclang-dev); installs them with apt-get when they are missing and it can.
# The first build takes long (several hundred crates); later ones reuse the cached target.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v protoc >/dev/null || ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q protobuf-compiler libclang-dev >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q protobuf-compiler libclang-dev >/dev/null; }
    else
        echo "build-dynamo: install protoc and libclang first (Debian: apt-get install protobuf-compiler libclang-dev)" >&2
        exit 1
    fi
fi
export CARGO_TARGET_DIR="${SUPERNODE_CACHE:-$HOME/.cache/supernode}/target-dynamo"
export RUSTFLAGS="--cfg tokio_unstable"
cargo build --release --locked --features dynamo --bin supernode "$@"
echo "$CARGO_TARGET_DIR/release/supernode"
