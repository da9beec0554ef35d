// `blockrepl pull HOST:PORT DIR`: a one-shot update of an unmounted directory to a
// barrier-consistent state of a master (a cold standby or a backup, seed 003), with the same
// stream / Merkle / full logic as a slave's attach, staged so that an interrupted pull leaves
// the previous state. Exit 0 if and only if DIR is complete.
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <climits>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/follower.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/log.h"
#include "blockrepl/metadata.h"
#include "blockrepl/node.h"
#include "tools/cli/mount_checks.h"
#include "tools/cli/mount_command.h"

namespace blockrepl::cli {

int run_pull(const std::string& address, const std::string& dir, int verbosity, bool discard_my_data,
             const SecurityOptions& security, const Compression& compress) {
  set_log_level(verbosity > 1 ? LogLevel::debug : verbosity == 1 ? LogLevel::info : verbosity < 0 ? LogLevel::error : LogLevel::warn);
  PeerSecurity peer_security;
  if (auto err = load_peer_security(security, &peer_security)) {
    fprintf(stderr, "blockrepl: pull: %s\n", err->c_str());
    return 1;
  }
  char buf[PATH_MAX];
  if (!realpath(dir.c_str(), buf)) {
    fprintf(stderr, "blockrepl: pull: directory %s: %s\n", dir.c_str(), strerror(errno));
    return 1;
  }
  const std::string dir_abs = buf;
  struct stat st;
  if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) {
    fprintf(stderr, "blockrepl: pull: %s is not a directory\n", buf);
    return 1;
  }
  // A file system of its own (a backup disk, with its lost+found) is a fine place; a blockrepl
  // mount is not: pull writes the backing directory, not through a mount.
  if (auto served = blockrepl_data_dir_of(dir_abs)) {
    fprintf(stderr, "blockrepl: pull: %s is a mount point (blockrepl, of %s); pull updates a directory no daemon serves\n", buf,
            served->c_str());
    return 1;
  }
  if (auto err = check_data_dir_overlaps(dir_abs)) {
    fprintf(stderr, "blockrepl: pull: %s\n", err->c_str());
    return 1;
  }
  if (auto err = check_backing_dir_private(dir_abs)) {
    fprintf(stderr, "blockrepl: pull: %s\n", err->c_str());
    return 1;
  }
  // The same rule as a slave's: a first pull replaces what DIR holds.
  if (!discard_my_data)
    if (auto err = check_replica_data_dir(dir_abs, "pull")) {
      fprintf(stderr, "blockrepl: pull: %s\n", err->c_str());
      return 1;
    }
  int lock_fd = -1;
  try {
    lock_fd = lock_data_dir(dir_abs);
  } catch (const std::exception& e) {
    fprintf(stderr, "blockrepl: pull: %s (it is mounted: unmount it first)\n", e.what());
    return 1;
  }
  int rc = 1;
  const auto started = std::chrono::steady_clock::now();
  try {
    Node node(dir_abs);
    HashIndex hashes(node.store().files(), node.root_fd(), node.meta_fd(), dir_abs, node.identity().block_size, true);
    node.store().set_hashes(&hashes);
    node.store().set_track_files(true);
    node.store().files().scan();
    FollowerConfig fc;
    fc.master_address = address;
    fc.ack = AckLevel::async;  // a pull never holds up the master's barriers
    fc.stage_stream = true;
    fc.discard_my_data = discard_my_data;
    fc.security = peer_security;
    fc.compress = compress;
    fc.master_timeout = std::chrono::milliseconds(30000);
    {
      Follower follower(node, fc);
      follower.attach_now();
      FollowerStatus s = follower.status();
      if (follower.complete()) {
        rc = 0;
        if (verbosity >= 0)
          printf("%s: pulled from %s by %s at lsn %" PRIu64 " (%" PRIu64 " bytes, %" PRIu64 " blocks, %.2f s)\n", buf,
                 address.c_str(), s.last_attach.method.c_str(), s.durable_lsn, s.last_attach.bytes_received,
                 s.last_attach.blocks_received,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
      } else {
        fprintf(stderr, "blockrepl: pull %s from %s: incomplete\n", buf, address.c_str());
      }
    }
    hashes.close_clean();
    node.store().set_hashes(nullptr);
  } catch (const std::exception& e) {
    fprintf(stderr, "blockrepl: pull %s from %s: %s\n", buf, address.c_str(), e.what());
    rc = 1;
  }
  close(lock_fd);
  return rc;
}

}  // namespace blockrepl::cli
