#!/usr/bin/env bash
# Installs what building and testing shardflow needs on a Debian machine with
# a Rust toolchain: a C++ compiler and libclang (RocksDB's C++ and its
# bindings). Idempotent and quiet when everything is already there.
#
# libclang is looked for the way bindgen's loader (clang-sys) looks for it:
# `libclang.so`, `libclang.so.N`, `libclang-N.so` or `libclang-N.so.M` in
# $LIBCLANG_PATH, `llvm-config --libdir` and the usual library folders.
# `libclang-cpp.so.N` (the C++ API library, shipped by the base image with
# LLVM) is not libclang and does not count.
#
# For tests of this script (tests/setup_script.rs):
#   SHARDFLOW_SETUP_ROOT     a folder standing in for `/` in the library search
#                            (llvm-config is then not asked)
#   SHARDFLOW_SETUP_DRY_RUN  1: print what would be installed, install nothing
set -euo pipefail

ROOT=${SHARDFLOW_SETUP_ROOT:-}
DRY_RUN=${SHARDFLOW_SETUP_DRY_RUN:-0}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

libclang_dirs() {
  if [ -n "${LIBCLANG_PATH:-}" ] && [ -z "$ROOT" ]; then
    echo "$LIBCLANG_PATH"
  fi
  if [ -z "$ROOT" ] && command -v llvm-config >/dev/null 2>&1; then
    llvm-config --libdir 2>/dev/null || true
  fi
  local d
  for d in "$ROOT"/usr/lib/llvm-*/lib "$ROOT"/usr/lib/*-linux-gnu "$ROOT"/usr/lib \
           "$ROOT"/usr/lib64 "$ROOT"/usr/local/lib; do
    [ -d "$d" ] && echo "$d"
  done
}

have_libclang() {
  local dir f
  while IFS= read -r dir; do
    for f in "$dir"/libclang.so "$dir"/libclang.so.* "$dir"/libclang-[0-9]*.so "$dir"/libclang-[0-9]*.so.*; do
      if [ -e "$f" ]; then
        echo "setup: libclang found at $f" >&2
        return 0
      fi
    done
  done < <(libclang_dirs)
  return 1
}

missing=()
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
have_libclang 2>/dev/null || missing+=(libclang-dev)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$DRY_RUN" = 1 ]; then
    echo "setup: would install ${missing[*]}"
    exit 0
  fi
  echo "setup: installing ${missing[*]} (needed to build RocksDB and its bindings)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq </dev/null
  $SUDO apt-get install -y -qq "${missing[@]}" </dev/null >/dev/null
  if ! have_libclang 2>/dev/null; then
    echo "setup: libclang is still missing after installing libclang-dev; set LIBCLANG_PATH to the folder holding libclang.so" >&2
    exit 1
  fi
elif [ "$DRY_RUN" = 1 ]; then
  echo "setup: nothing to install"
  exit 0
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install a Rust toolchain (https://rustup.rs) and retry" >&2
  exit 1
fi
