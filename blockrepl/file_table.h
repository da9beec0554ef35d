// FileId -> backing inode, for a node that applies records it did not make itself (a slave, or
// any store driven only by records). Holds an O_PATH descriptor per known file and, lazily, a
// read-write descriptor for data records. Files unlinked while known stay reachable until
// evicted, so records for files the master still has open keep applying.
#pragma once
#include <cstddef>
#include <deque>
#include <mutex>
#include <unordered_map>

#include "blockrepl/record.h"

namespace blockrepl {

class FileTable {
 public:
  explicit FileTable(int root_fd);  // root_fd: the backing directory (not owned)
  ~FileTable();
  FileTable(const FileTable&) = delete;
  FileTable& operator=(const FileTable&) = delete;

  // Walks the backing tree once and learns every file id (skipping the metadata folder).
  // Returns the number of files found.
  size_t scan();
  // Forgets every file (after the namespace changed behind the table's back); scan() again.
  void clear();

  // O_PATH descriptor of fid, or -1 if unknown.
  int path_fd(FileId fid);
  // Read-write descriptor of a regular file, opened on first use; -1 with errno set on failure.
  int rw_fd(FileId fid);

  // Learns `name` in directory `dirfd` as fid (after a create, link or a scan).
  int add(FileId fid, int dirfd, const char* name);
  // The entry may have lost its last name: keep it reachable for a while, then close it.
  void maybe_orphaned(FileId fid);
  // The file's last handle on the master closed: if it has no name left, close it now.
  void release(FileId fid);
  void forget(FileId fid);
  size_t size() const;

 private:
  struct Entry {
    int path_fd = -1;
    int rw_fd = -1;
  };
  void close_entry(Entry& e);
  size_t scan_dir(int dirfd, int depth);

  int root_fd_;
  mutable std::mutex mu_;
  std::unordered_map<FileId, Entry> entries_;
  std::deque<FileId> orphans_;  // oldest first; bounded
  static constexpr size_t kMaxOrphans = 4096;
  static constexpr size_t kMaxOpenRw = 1024;
  std::deque<FileId> rw_open_;  // files holding an rw descriptor, oldest first
};

}  // namespace blockrepl
