// Full copy of a volume for an empty slave, taken while the master keeps writing. The copy is
// fuzzy: each file is read as it is at that moment. The slave then replays every record from
// the LSN at which the copy began (tolerantly up to the LSN at which it ended), which makes the
// result exact, as a base backup plus WAL replay does.
#pragma once
#include <cstdint>
#include <ctime>
#include <functional>
#include <map>
#include <string>
#include <sys/types.h>
#include <vector>

#include "blockrepl/wire.h"

namespace blockrepl {

class Store;

struct CopyStats {
  uint64_t files = 0;
  uint64_t bytes = 0;
  timespec root_mtime{0, 0};  // the sender's volume root, once everything was sent
};

// Walks the backing directory `root_fd` (skipping the metadata folder) and sends one CopyEntry
// per file or directory, data in chunks. Files without a file id get one when `assign_ids`.
// Throws Error on a send failure.
CopyStats send_full_copy(Connection& conn, int root_fd, bool assign_ids);

// Applies CopyEntry messages to an empty backing directory. Every path a peer sends is checked:
// relative, no "..", never into the metadata folder.
class CopyReceiver {
 public:
  // Writes go through the store, so its hash trees stay current with them (a later re-attach
  // rehashes nothing).
  explicit CopyReceiver(Store& store);
  ~CopyReceiver();
  // Throws Error on a malformed entry or a local failure (naming the path).
  void apply(wire::CopyEntry::Reader entry);
  // Sets directory times (their contents changed them while copying), the root's last, and
  // closes files.
  void finish(timespec root_mtime);
  const CopyStats& stats() const { return stats_; }

 private:
  int open_parent(const std::string& path, std::string* leaf);
  void finish_file();
  void set_times(FileId fid, int fd, const timespec times[2], const std::string& path);
  void write_chunk(const std::string& path, FileId fid, uint64_t off, const kj::byte* data, size_t n);
  Store& store_;
  int root_fd_;
  FileId file_fid_ = kInvalidFileId;
  CopyStats stats_;
  // The regular file being received in chunks.
  int file_fd_ = -1;
  std::string file_path_;
  uint64_t file_size_ = 0;
  timespec file_times_[2]{};
  struct DirTimes {
    std::string path;
    timespec times[2];
  };
  std::vector<DirTimes> dir_times_;
};

// Removes `name` in dirfd with everything below it (without following symlinks).
void remove_tree_at(int dirfd, const char* name);
// Removes everything in the backing directory except its hidden root entries (the metadata
// folder, a file system's lost+found: is_hidden_root_entry).
void wipe_data_dir(int root_fd);
// The names of up to `max` entries of the backing directory other than its hidden root entries
// (what a wipe would remove). Throws Error if it cannot be read.
std::vector<std::string> data_dir_entries(int root_fd, size_t max);
// Whether the backing directory holds nothing but its hidden root entries.
bool data_dir_is_empty(int root_fd);

}  // namespace blockrepl
