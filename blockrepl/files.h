// The file registry: FileId -> the backing inode, one for the whole daemon (the FUSE layer, the
// Store, the hash trees and the Merkle code all reach files through it).
//
// Files are reached by kernel file handles (name_to_handle_at / open_by_handle_at, as virtiofsd's
// inode-file-handles mode does), so knowing a file costs a few bytes, not a descriptor. What is
// open is bounded: a least-recently-used cache of descriptors of at most `budget` entries, plus
// the root, plus descriptors lent out (leases) for the length of one operation. The number of
// files never meets the process's descriptor limit.
//
// The one rule for a file that lost its last name: while a record may still name it (on a slave,
// until the master says `release`; a bounded number of them), its O_PATH descriptor is pinned,
// because a handle of a deleted inode no longer opens once nothing holds it.
#pragma once
#include <cstddef>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "blockrepl/fsutil.h"
#include "blockrepl/record.h"

namespace blockrepl {

// A kernel file handle: the file system's own stable name of an inode.
struct FileHandle {
  int type = 0;
  std::string bytes;
  bool empty() const { return bytes.empty(); }
  bool operator==(const FileHandle& o) const { return type == o.type && bytes == o.bytes; }
  // Of `name` in dirfd (not following a symlink), or of dirfd itself when name is "".
  // Returns 0 or an errno (EOPNOTSUPP: the file system gives no handles).
  static int of(int dirfd, const char* name, FileHandle* out);
};

// A descriptor lent by the registry: it stays open while any copy of the lease lives, even if
// the registry evicts it from its cache meanwhile.
class Fd {
 public:
  Fd() = default;
  explicit Fd(OwnedFd fd) : p_(std::make_shared<OwnedFd>(std::move(fd))) {}
  int get() const { return p_ ? p_->get() : -1; }
  explicit operator bool() const { return get() >= 0; }

 private:
  std::shared_ptr<OwnedFd> p_;
};

class FileRegistry {
 public:
  static constexpr size_t kDefaultBudget = 1024;
  static constexpr size_t kMaxOrphans = 4096;

  // root_fd: the backing directory (not owned). Throws Error, naming the directory, if its file
  // system cannot give file handles.
  explicit FileRegistry(int root_fd, size_t budget = kDefaultBudget);
  ~FileRegistry();
  FileRegistry(const FileRegistry&) = delete;
  FileRegistry& operator=(const FileRegistry&) = delete;

  // Walks the backing tree once and learns every file id (handles only; skipping the entries
  // that are not part of the volume). Returns the number of files found.
  size_t scan();
  // Forgets every file but the root (after the namespace changed behind the registry's back).
  void clear();

  // An O_PATH descriptor of fid; an empty lease with errno set (ENOENT) if unknown or gone.
  Fd path(FileId fid);
  // A read-write descriptor of a regular file; an empty lease with errno set otherwise (data
  // records never reach a device node or a directory).
  Fd rw(FileId fid);
  // Opens a handle directly (a file that has no id yet, or a descriptor for an application's
  // open file); not cached. ENOENT if the inode is gone.
  Fd open_handle(const FileHandle& h, int flags);
  OwnedFd open_owned(const FileHandle& h, int flags);

  // Learns `name` in directory `dirfd` as fid (after a create, link or lookup). 0 or an errno.
  int add(FileId fid, int dirfd, const char* name);
  // The same from a descriptor of the file (kept in the cache as its O_PATH descriptor when it
  // is one).
  int add_fd(FileId fid, Fd fd);
  // The handle of a known file (empty if unknown).
  FileHandle handle(FileId fid);
  // fid may have lost its last name. pin: keep it reachable (bounded) so that records naming it
  // still apply (a replica); else only let go of its cached descriptors, so that its space is
  // freed once its users close it (a master, whose users hold it open themselves). `held`: an
  // O_PATH descriptor of it taken before its name was removed (see hold_for_removal).
  void maybe_orphaned(FileId fid, bool pin, Fd held = {});
  // The file's last handle on the master closed: if it has no name left, let it go now.
  void release(FileId fid);
  void forget(FileId fid);

  size_t size() const;                // files known
  size_t cached_descriptors() const;  // descriptors held in the cache (not the root, not orphans)
  size_t pinned_orphans() const;
  size_t budget() const { return budget_; }
  void set_budget(size_t n);
  int mount_fd() const { return mount_fd_.get(); }

 private:
  struct Entry {
    FileHandle handle;
    Fd path, rw;
    bool orphan = false;  // pinned: lost its last name
    bool cached = false;  // in lru_
    std::list<FileId>::iterator lru;
  };
  Entry* find(FileId fid);              // mu_ held
  Fd open_path(FileId fid, Entry& e);   // mu_ held
  void touch(FileId fid, Entry& e);     // mu_ held: most recently used (enters the cache)
  void learn(Entry& e, FileHandle h);   // mu_ held: the entry's inode is the one behind h
  void set_descriptor(Entry& e, Fd& slot, Fd fd);  // mu_ held: keeps cached_ right
  void uncache(Entry& e);               // mu_ held
  void erase(FileId fid);               // mu_ held
  void trim();                          // mu_ held: back under the budget
  size_t descriptors_of(const Entry& e) const { return (e.path ? 1 : 0) + (e.rw ? 1 : 0); }
  size_t scan_dir(int dirfd, int depth);

  int root_fd_;
  OwnedFd mount_fd_;  // a real (not O_PATH) descriptor on the file system, for open_by_handle_at
  size_t budget_;
  mutable std::mutex mu_;
  std::unordered_map<FileId, Entry> entries_;
  std::list<FileId> lru_;  // most recent first
  size_t cached_ = 0;      // descriptors held by entries in lru_
  std::deque<FileId> orphans_;  // oldest first
};

}  // namespace blockrepl
