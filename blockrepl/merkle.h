// The Merkle diff of a re-attach (DESIGN.md section 3, path 2) and the staging that keeps the
// slave crash-consistent while it runs.
//
// The slave drives: it compares namespace hashes from the root down, asks only for the listings
// of directories that differ, then descends the block trees of files that differ level by level
// (one round trip per level, all files at once), then asks for the differing blocks. Bytes and
// round trips grow with m log n for m changed blocks of n.
//
// Nothing the master sends touches the slave's directory until it is consistent: the answers,
// and the records that follow until the first barrier past the point where the diff ends, are
// appended to <meta>/stage/frames. Then a commit marker is written durably and the stage is
// applied; a crash during that application is finished by the next start (a redo log), so the
// directory is always the old state or the new one once the node serves it.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "blockrepl/hash_index.h"
#include "blockrepl/metadata.h"
#include "blockrepl/store.h"
#include "blockrepl/wire.h"

namespace blockrepl {

class Stage {
 public:
  // The stage lives in <meta_fd>/stage; `where` names the data directory in errors.
  Stage(int meta_fd, std::string where, bool durable);
  ~Stage();
  Stage(const Stage&) = delete;
  Stage& operator=(const Stage&) = delete;

  // A committed stage is waiting to be applied (the daemon died while applying it).
  bool committed() const;
  Lsn committed_lsn() const;
  // Drops whatever an interrupted attach left, and starts an empty stage.
  void begin();
  void add(const Frame& frame);
  uint64_t bytes() const { return bytes_; }
  // Makes the staged frames and a marker saying "apply up to `lsn`" durable.
  void commit(Lsn lsn);

  struct Applied {
    Lsn lsn = 0;
    std::vector<LineageEntry> lineage;  // from the staged welcome
    uint64_t blocks = 0, records = 0, entries = 0;
    // Directory entries that may have changed (parent file id, name): caches to drop.
    std::vector<std::pair<FileId, std::string>> names;
  };
  // Applies a committed stage to the data directory through `store` (idempotent: safe to run
  // again after a crash part way). Throws Error.
  Applied apply(Store& store, uint32_t block_size);
  // Removes the stage (after the applied state is durable).
  void discard();

 private:
  void remove_all();
  int meta_fd_;
  std::string where_;
  bool durable_;
  int dir_fd_ = -1;
  int frames_fd_ = -1;
  uint64_t bytes_ = 0;
};

struct DiffReport {
  uint64_t dirs_listed = 0, files_compared = 0, blocks = 0, whole_files = 0, data_bytes = 0;
  // What the comparison covered: every directory and entry of this replica's tree (equal hashes
  // vouch for everything below them), not only what had to be listed or descended into.
  uint64_t dirs_covered = 0, entries_covered = 0;
  unsigned round_trips = 0;
  std::vector<std::string> differences;  // one line each: what differs and where
};

// Slave side: runs the diff over `conn` (after the welcome). With a stage, asks for the
// differing blocks and stages every answer; without (verify), only reports differences.
DiffReport run_merkle_diff(Connection& conn, int root_fd, HashIndex& hashes, Stage* stage, bool deep, int timeout_ms,
                           const std::function<void(const DiffReport&)>& progress = {});

// Master side: answers the slave's questions until it says diffDone. Throws Error.
void serve_merkle_diff(Connection& conn, int root_fd, HashIndex& hashes, bool assign_ids, bool deep, int timeout_ms);

}  // namespace blockrepl
