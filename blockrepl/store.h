// The Store applies records to a backing directory. It is the one place where changes reach the
// disk: the master applies the records it makes here, and a slave applies received records with
// the same code. Callers that already hold descriptors for the files involved (the FUSE layer)
// pass them in Targets; anything not given is resolved through the FileRegistry by FileId.
#pragma once
#include <sys/types.h>

#include <atomic>

#include "blockrepl/files.h"
#include "blockrepl/record.h"
#include "blockrepl/writeback.h"

namespace blockrepl {

struct Targets {
  int fd = -1;           // an open read-write descriptor of rec.fid, if the caller has one
  int path_fd = -1;      // an O_PATH (or any) descriptor of rec.fid
  int parent_fd = -1;    // directory rec.parent
  int parent2_fd = -1;   // directory rec.parent2 (rename)
  size_t written = 0;    // set by the Store: bytes of a failed write that reached the file
  Fd leases[4];          // set by the Store: descriptors it borrowed for the change
};

class HashIndex;

// What a change made here left behind that replicas copy instead of taking from their own
// clocks (tv_nsec < 0: not reported). Node::submit stamps these into the record it publishes.
struct Stamps {
  timespec mtime{0, -1};       // the written or created entry's mtime (kAttrStampMtime)
  timespec atime{0, -1};       // a setattr to "now": the times it set (kAttrAtime/kAttrMtime)
  timespec set_mtime{0, -1};
  timespec dir_mtime{0, -1};   // rec.parent's mtime after a namespace change (kAttrStampDirs)
  timespec dir2_mtime{0, -1};  // rec.parent2's (rename)
  size_t written = 0;          // a write that failed part way: the bytes that reached the file
};

class Store {
 public:
  // root_fd: the backing directory, opened O_PATH|O_DIRECTORY (not owned).
  // track_files: keep the FileRegistry up to date with what is created. A master whose callers
  // always pass descriptors does not need it; a node applying received records does.
  Store(int root_fd, bool track_files);
  void set_track_files(bool on) { track_files_ = on; }
  // Keeps these hash trees current with every data record applied (not owned; may be null).
  void set_hashes(HashIndex* hashes) { hashes_ = hashes; }
  HashIndex* hashes() const { return hashes_; }
  // Large block-aligned writes go to the disk directly (O_DIRECT) instead of through the page
  // cache: filling new page-cache pages is most of what applying a sequential stream costs, and
  // the data is not read back from here soon (replica.cpp says why for each role). Barriers
  // still sync as before.
  void set_direct_writes(bool on) { direct_writes_.store(on, std::memory_order_relaxed); }
  // Writes smaller than this, or not aligned to kDirectAlign in offset and length, always go
  // through the page cache (a database's pages, a file's tail).
  static constexpr size_t kDirectMin = 256 << 10;
  static constexpr size_t kDirectAlign = 4096;  // covers 512-byte and 4 KiB logical blocks

  // Applies one record. Returns 0 or an errno: the record policy's refusal (record_policy.h:
  // EINVAL, EPERM, EOPNOTSUPP) or the backing file system's answer.
  // With `stamps_out` (the master), the times the change left are reported there; without it
  // (a replica), the record's stamps (kAttrStampMtime, kAttrStampDirs) are applied.
  int apply(const Record& rec, const Targets& given = {}, Stamps* stamps_out = nullptr);

  // Applies a record that may already be reflected in the directory: during a full copy taken
  // while the master kept writing, and after a restart that re-receives records applied before
  // it. Namespace records apply only if the entries they name carry the file ids they expect;
  // a record whose effect is already there, or whose file no longer exists, is skipped.
  // Returns 0 (applied or skipped) or an errno for a real failure.
  int apply_replayed(const Record& rec);

  // What an errno that apply() returned on this thread means, for the caller's error line: the
  // record policy's reason when it refused the record ("a device number on a non-device
  // (Invalid argument)"), else strerror(err).
  static std::string failure_text(int err);

  // syncfs() of the backing file system (the root descriptor is O_PATH, which syncfs refuses).
  int sync_all();

  FileRegistry& files() { return files_; }
  EarlyWriteback& writeback() { return writeback_; }
  int root_fd() const { return root_fd_; }

 private:
  // The record policy's verdict (0 or the errno), logged with the record when it refuses.
  static int refused_by_policy(const Record& rec);
  int resolve(const Record& rec, const Targets& given, Targets& t, bool need_rw);
  int apply_created(const Record& rec, int parent_fd);
  // Owner and file id of the whiteout a RENAME_WHITEOUT left at rec.parent/rec.name.
  int apply_whiteout(const Record& rec, int parent_fd);
  int apply_resolved(const Record& rec, Targets& t);
  bool wants_direct(const Record& rec) const;
  // Writes rec.data at rec.offset of the file open as fd, bypassing the page cache. EINVAL if
  // the file system cannot (the caller then writes through the page cache).
  // *written: the bytes that reached the file, also when it fails part way (the disk filled),
  // as the buffered path reports them: a master publishes them.
  static int write_direct(int fd, const Record& rec, size_t* written);
  // Whether the record creates an entry or changes data, whose mtime replicas take from it.
  static bool stamps_mtime(const Record& rec);
  static bool changes_directories(Op op);
  void report_stamps(const Record& rec, const Targets& t, Stamps& out);
  int apply_stamps(const Record& rec, const Targets& t);
  int skip_replayed(const Record& rec);
  bool names_hidden_entry(int dirfd, const std::string& name) const;
  // fid may have lost its last name: the tables holding descriptors of it let go in time.
  void maybe_orphaned(FileId fid, Fd held = {});
  // On a replica, an O_PATH descriptor of a file about to lose a name (unlink, rename over it):
  // if that was its last name, it keeps the inode alive to be pinned (maybe_orphaned).
  Fd hold_for_removal(FileId fid);
  FileId entry_fid(FileId dir, const std::string& name);

  int root_fd_;
  dev_t root_dev_ = 0;
  ino_t root_ino_ = 0;
  bool track_files_;
  FileRegistry files_;
  HashIndex* hashes_ = nullptr;
  EarlyWriteback writeback_;
  std::atomic<bool> direct_writes_{false};
  std::atomic<bool> direct_unsupported_{false};  // the backing file system refused O_DIRECT
};

}  // namespace blockrepl
