#!/usr/bin/env bash
# Installs every Debian 12 package that blockrepl's build, tests and benchmarks need.
# Idempotent; must run as root (or through sudo).
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then exec sudo -E bash "$0" "$@"; fi
  echo "setup.sh: must run as root (apt-get install)" >&2; exit 1
fi
packages=(
  build-essential cmake pkg-config git python3  # toolchain; python3 runs the benchmarks
  libfuse3-dev fuse3                         # FUSE low-level API and fusermount3
  liburing-dev                               # io_uring for the replication stream and apply path
  capnproto libcapnp-dev                     # wire protocol schema, framing, kj async I/O
  libxxhash-dev                              # XXH3-128 block hashes
  libzstd-dev                                # zstd compression of the replication stream (--compress)
  libssl-dev openssl                         # TLS 1.3 and HMAC-SHA256 (libssl); certificates in tests and the bench (openssl)
  libcli11-dev                               # command-line parsing
  nlohmann-json3-dev                         # status --json
  libgtest-dev googletest                    # unit and integration tests
  libsystemd-dev                             # sd_notify: READY=1/STOPPING=1 for Type=notify units (CLI only)
  libbenchmark-dev                           # micro benchmarks (tools/bench/micro, -DBLOCKREPL_BENCH=ON)
  fio sqlite3 libsqlite3-dev                 # I/O and database benchmarks, SQLite tests
  postgresql postgresql-contrib              # pgbench and PostgreSQL tests
  rsync                                      # re-attach benchmark baseline
  clang libclang-rt-14-dev libfuzzer-14-dev  # fuzz targets (tests/fuzz, tools/fuzz.sh): libFuzzer, ASan, UBSan need clang
  procps psmisc util-linux iproute2          # pkill, fuser, mountpoint, runuser, ss (tests cut connections)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# FUSE mounts usable by other users (allow_other) need this line.
if [ -f /etc/fuse.conf ] && ! grep -qE '^\s*user_allow_other' /etc/fuse.conf; then
  echo user_allow_other >> /etc/fuse.conf
fi
[ -e /dev/fuse ] || { echo "setup.sh: /dev/fuse missing: load the fuse module (modprobe fuse)" >&2; exit 1; }
