#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine (as root) and shows blockrepl working: mounts a
# master and a slave of it under a temporary directory, runs SQLite on the master, shows the same
# rows on the slave and both nodes' status, then unmounts everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
bin=$PWD/build/bin/blockrepl
work=$(mktemp -d /var/tmp/blockrepl-demo-XXXXXX)
cleanup() {
  for m in "$work/slave" "$work/master"; do
    mountpoint -q "$m" && { "$bin" umount "$m" || fusermount3 -u -z "$m"; }
  done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/master-data" "$work/master" "$work/slave-data" "$work/slave"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The cluster's secret: master and slave prove it to each other before anything is sent.
(umask 077; openssl rand -base64 32 > "$work/cluster.secret")
set -x
"$bin" mount --data "$work/master-data" --listen "127.0.0.1:$port" --ack sync --secret-file "$work/cluster.secret" "$work/master"
"$bin" mount --data "$work/slave-data" --master "127.0.0.1:$port" --secret-file "$work/cluster.secret" "$work/slave"
findmnt -t fuse.blockrepl
sqlite3 "$work/master/demo.db" "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
  CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
  WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < 1000) INSERT INTO t(v) SELECT 'row ' || i FROM c;
  SELECT count(*) AS rows_on_master FROM t; PRAGMA integrity_check;"
# sync mode: the commit returned only once the slave had the transaction on disk.
sqlite3 "file:$work/slave/demo.db?immutable=1" "SELECT count(*) AS rows_on_slave FROM t; PRAGMA integrity_check;"
"$bin" status "$work/master"
"$bin" status "$work/slave"
touch "$work/slave/x" || echo "the slave is read-only, as it should be"
"$bin" umount "$work/slave"
"$bin" umount "$work/master"
