#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine (as root) and shows blockrepl working: mounts a
# directory on defaults under a temporary directory, runs a SQLite database on it, unmounts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
bin=build/bin/blockrepl
work=$(mktemp -d /var/tmp/blockrepl-demo-XXXXXX)
cleanup() { mountpoint -q "$work/mnt" && "$bin" umount "$work/mnt" || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir "$work/data" "$work/mnt"
set -x
"$bin" mount --data "$work/data" "$work/mnt"
findmnt "$work/mnt"
sqlite3 "$work/mnt/demo.db" "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
  CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
  WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < 1000) INSERT INTO t(v) SELECT 'row ' || i FROM c;
  SELECT count(*) AS rows FROM t; PRAGMA integrity_check;"
ls -la "$work/mnt" "$work/data"
"$bin" umount "$work/mnt"
sqlite3 "$work/data/demo.db" "SELECT count(*) AS rows_in_backing_dir FROM t;"
