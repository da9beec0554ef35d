// The FUSE inode table: one Inode per backing inode that the kernel knows, holding an O_PATH
// descriptor (so operations never resolve paths again) and the file's stable FileId.
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <sys/types.h>
#include <utility>
#include <vector>

#include "blockrepl/record.h"

namespace blockrepl::fs {

struct Inode {
  int fd = -1;  // O_PATH|O_NOFOLLOW descriptor of the backing inode
  dev_t src_dev = 0;
  ino_t src_ino = 0;
  mode_t type = 0;  // S_IFMT bits
  std::atomic<uint32_t> mode{0};  // last known st_mode (to drop set-id bits on write ourselves)
  std::atomic<FileId> fid{kInvalidFileId};
  uint64_t nlookup = 0;  // guarded by InodeTable's mutex
  // The kernel asks for security.capability before every write (to drop privileges); caching
  // "it has none" answers that without touching the backing file. Reset when it is set.
  std::atomic<bool> known_no_caps{false};
  // Buffered writes to one backing file serialise on its inode lock anyway; waiting here (asleep)
  // instead of in the kernel (spinning on the lock's owner) leaves the CPU to the writer.
  std::mutex write_mu;
  ~Inode();
};

class InodeTable {
 public:
  // Takes ownership of fd. Returns the inode for (dev, ino), creating it, with nlookup + 1.
  // `fresh` tells whether the inode was created (then fd is kept) or found (fd is closed).
  Inode* acquire(int fd, const struct stat& st, bool* fresh);
  // Drops n lookups; frees the inode when none remain. Returns the file id of a regular file
  // freed with no name left (the kernel let go of an unlinked file), else kInvalidFileId.
  FileId forget(Inode* inode, uint64_t n);
  Inode* find(dev_t dev, ino_t ino);
  void set_root(std::unique_ptr<Inode> root) { root_ = std::move(root); }
  Inode* root() const { return root_.get(); }
  size_t size();
  // Every inode the kernel knows now (their addresses are the kernel's inode numbers).
  std::vector<Inode*> all();

 private:
  std::mutex mu_;
  std::map<std::pair<dev_t, ino_t>, std::unique_ptr<Inode>> inodes_;
  std::unique_ptr<Inode> root_;
};

}  // namespace blockrepl::fs
