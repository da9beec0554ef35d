// The FUSE inode table: one Inode per backing inode that the kernel knows, holding the inode's
// kernel file handle (so operations never resolve paths again, and no descriptor is held per
// inode: the kernel may know hundreds of thousands) and the file's stable FileId. Descriptors
// come from the file registry for the length of an operation.
#pragma once
#include <atomic>
#include <functional>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <sys/types.h>
#include <utility>
#include <vector>

#include <unordered_map>

#include "blockrepl/files.h"
#include "blockrepl/record.h"

namespace blockrepl::fs {

struct Inode {
  FileHandle handle;  // the backing inode
  Fd pinned;          // the root only: its descriptor, held for the daemon's life
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
};

class InodeTable {
 public:
  // Returns the inode for (dev, ino), creating it with `handle`, with nlookup + 1. `fresh` tells
  // whether the inode was created.
  Inode* acquire(const FileHandle& handle, const struct stat& st, bool* fresh);
  // Records the inode's file id (once known) so that find_fid can answer.
  void set_fid(Inode* inode, FileId fid);
  Inode* find_fid(FileId fid);
  // Drops n lookups; frees the inode when none remain. Returns the file id of a regular file
  // freed with no name left (the kernel let go of an unlinked file), else kInvalidFileId.
  FileId forget(Inode* inode, uint64_t n);
  // How to open a handle (the file registry's), to tell at forget() whether a file lost its name.
  void set_opener(std::function<Fd(const FileHandle&)> opener) { opener_ = std::move(opener); }
  void set_root(std::unique_ptr<Inode> root) { root_ = std::move(root); }
  Inode* root() const { return root_.get(); }
  size_t size();
  // Every inode the kernel knows now (their addresses are the kernel's inode numbers).
  std::vector<Inode*> all();

 private:
  std::mutex mu_;
  // Keyed by the handle, not the inode number: a file system reuses the number of a deleted inode
  // (nothing holds it open any more) while the kernel may still know the old one; the handle's
  // generation tells them apart.
  using Key = std::pair<dev_t, std::string>;
  static Key key_of(dev_t dev, const FileHandle& h);
  std::map<Key, std::unique_ptr<Inode>> inodes_;
  std::unordered_map<FileId, Inode*> by_fid_;
  std::function<Fd(const FileHandle&)> opener_;
  std::unique_ptr<Inode> root_;
};

}  // namespace blockrepl::fs
