// The hash trees of every file of a volume, kept current as records are applied (DESIGN.md
// section 3): the Store calls before_change/after_change around each data record, on master and
// slave alike, and the Merkle diff asks with_tree() for a clean tree.
//
// Costs on the write path: one hash-set lookup in the dirty-region log (an fdatasync of that
// small log only for the first write into a 4 MiB extent since the last clean point), and the
// hashing of the blocks the write covers whole, from the record's data while it is at hand
// (XXH3, some GB/s: far cheaper than reading them back). Blocks written in part go into the
// file's dirty set and are read back and hashed later, when a tree is asked for or at a
// checkpoint.
//
// Trees are saved under <meta>/hashes at checkpoints (every kCheckpointInterval while there are
// changes, and at a clean close). After an unclean stop the constructor rehashes only the
// extents the dirty-region log names, never the whole volume.
#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>

#include "blockrepl/files.h"
#include "blockrepl/hash_tree.h"
#include "blockrepl/record.h"

namespace blockrepl {

struct HashIndexStats {
  uint64_t blocks_hashed = 0;   // blocks read and hashed since the start (refresh, build, recovery)
  uint64_t files_rebuilt = 0;   // trees built from scratch (no saved tree)
  uint64_t log_syncs = 0;       // fdatasyncs of the dirty-region log
  uint64_t recovered_files = 0; // trees repaired after an unclean stop
};

class HashIndex {
 public:
  static constexpr auto kCheckpointInterval = std::chrono::seconds(30);
  static constexpr auto kRefreshInterval = std::chrono::seconds(1);
  // Extents logged ahead of a sequential write into a new extent (see before_change): 31 x 4 MiB.
  static constexpr uint64_t kPrelogExtents = 31;
  // A write into a new extent counts as sequential if one of this many extents before it is
  // logged (FUSE writeback delivers a sequential writer's pages up to some MiB out of order).
  static constexpr uint64_t kSequentialLookback = 4;

  // files: the registry through which files are reached (it holds no descriptor per file for
  // the trees); root_fd: the backing directory (O_PATH is fine); meta_fd: its metadata folder.
  // Recovers after an unclean stop (syncs the data, rehashes logged extents, saves, clears the
  // log). durable=false skips fsyncs (tests, --no-fsync slaves). Throws Error.
  HashIndex(FileRegistry& files, int root_fd, int meta_fd, std::string data_path, uint32_t block_size, bool durable = true);
  ~HashIndex();
  HashIndex(const HashIndex&) = delete;
  HashIndex& operator=(const HashIndex&) = delete;

  uint32_t block_size() const { return block_size_; }

  // Write path, around a data record (write, truncate, fallocate) applied to the open file fd.
  // Hold change_lock() shared across before_change, the change itself and after_change.
  std::shared_mutex& change_lock() { return change_mu_; }
  int before_change(const Record& rec, int fd);  // logs the extents; 0 or an errno
  // Marks the blocks dirty; a write that completed hashes the blocks it covers whole from its
  // data instead (see FileHashTree::wrote), one that failed part-way is read back later.
  void after_change(const Record& rec, int fd, bool completed = true);

  // A new, empty regular file: its tree starts valid and empty (so it is never rehashed whole).
  void created(FileId fid);

  // The tree of file fid (fd: the file, any access mode), brought up to date (loaded, built or
  // refreshed), passed to fn under the tree's lock. With rebuild, rehashes the whole file first
  // (verify --deep). Throws Error on I/O errors.
  void with_tree(FileId fid, int fd, const std::function<void(const FileHashTree&)>& fn, bool rebuild = false);
  Hash128 root(FileId fid, int fd);

  // The file's data changed by other means than records (a full copy): its tree will be built
  // from the data when next needed.
  void forget(FileId fid);
  // The file may have lost its last name (unlink, or a rename over it): if it has, its tree
  // goes now, and with it our descriptor, which would otherwise keep a deleted file's space
  // from being freed until the next checkpoint.
  void maybe_orphaned(FileId fid);
  // The volume was wiped (an empty slave): every tree and the log go.
  void reset_all();

  // Saves every tree changed since the last checkpoint once `sync_data` (syncfs or the like)
  // made the data durable; then forgets the logged extents. Returns false (and keeps the log)
  // if syncing or saving failed.
  bool checkpoint();
  // Rehashes the blocks changed since the trees were last asked for (not saved: checkpoint()).
  void refresh_dirty();
  // Starts the background refreshes and checkpoints; stop_checkpoints() (or the destructor) ends them.
  void start_checkpoints();
  void stop_checkpoints();
  // A clean stop: a last checkpoint, so the next start rehashes nothing.
  void close_clean();

  HashIndexStats stats() const;

 private:
  struct Entry {
    std::mutex mu;
    FileHashTree tree;
    bool valid = false;   // the tree describes the file (else build it from the data when needed)
    bool unsaved = false; // changed since it was last saved
    Entry(uint32_t bs, std::string label) : tree(bs, std::move(label)) {}
  };
  std::shared_ptr<Entry> entry(FileId fid);
  void ensure_valid(Entry& e, FileId fid, int fd);  // e.mu held
  void refresh(Entry& e, int fd);                    // e.mu held: rehashes its dirty blocks
  void remove_saved_trees();
  void evict_clean();
  void recover();
  int sync_data();
  std::string label(FileId fid) const;

  FileRegistry& files_;
  int root_fd_;
  int meta_fd_;
  std::string data_path_;
  uint32_t block_size_;
  bool durable_;
  int hashes_fd_ = -1;
  std::unique_ptr<DirtyLog> log_;
  std::shared_mutex change_mu_;  // writers shared; a checkpoint's start exclusive
  std::mutex checkpoint_mu_;     // one checkpoint at a time
  mutable std::mutex map_mu_;
  std::unordered_map<FileId, std::shared_ptr<Entry>> entries_;
  std::atomic<uint64_t> blocks_hashed_{0}, files_rebuilt_{0}, recovered_files_{0};

  std::thread checkpoint_thread_;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
};

}  // namespace blockrepl
