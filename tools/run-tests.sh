#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine (as root) and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j2 --timeout 900
# Every decoder of peer or on-disk input under libFuzzer for a few seconds (tests/fuzz; longer
# runs: tools/fuzz.sh --seconds 600). Builds only the library and the targets, with clang.
bash tools/fuzz.sh --seconds "${FUZZ_SECONDS:-5}"
