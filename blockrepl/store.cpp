#include "blockrepl/store.h"

#include <cerrno>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "blockrepl/file_id.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/log.h"
#include "blockrepl/metadata.h"
#include "blockrepl/record_policy.h"

namespace blockrepl {

namespace {

// The most one buffered pwrite hands the backing file system. The kernel sizes the page-cache
// folios a write allocates by the length of that write (ext4 on kernel 6.18 uses large folios),
// and FUSE delivers writeback in requests of up to max_write (1 MiB) whatever the application
// wrote. Two costs follow, measured on this project's VM (kernel 6.18, ext4):
// - filling a freshly allocated 1 MiB folio costs several times what 128 KiB folios cost (the
//   host backs high-order free memory lazily): a native 1 GiB write in 1 MiB pwrites took
//   0.6-1.5 s of system time against 0.2 s in 128 KiB pwrites;
// - a later 4 KiB overwrite inside a large folio costs in proportion to the folio's size (the
//   profile shows it in ext4_block_write_begin): about 30 us of CPU more per write in a file
//   laid out in 1 MiB folios, which is what a file written sequentially and then updated in
//   place (a database, fio's randwrite) gets.
// 128 KiB pieces keep both small for 8 syscalls per MiB. O_DIRECT writes bypass the page cache
// and are not split.
constexpr size_t kBufferedWriteMax = size_t{128} << 10;

// Returns 0 or an errno; *done (if given) says how many bytes reached the file either way.
// Each pwrite hands at most max_piece bytes (0: no limit).
int write_all(int fd, const char* p, size_t n, uint64_t off, size_t* done = nullptr, size_t max_piece = 0) {
  size_t total = 0;
  int err = 0;
  while (n > 0) {
    ssize_t w = pwrite(fd, p, max_piece ? std::min(n, max_piece) : n, static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    if (w == 0) {
      err = EIO;
      break;
    }
    p += w;
    n -= static_cast<size_t>(w);
    off += static_cast<uint64_t>(w);
    total += static_cast<size_t>(w);
  }
  if (done) *done = total;
  return err;
}

int ok_or_errno(int rc) { return rc == 0 ? 0 : errno; }

}  // namespace

Store::Store(int root_fd, bool track_files) : root_fd_(root_fd), track_files_(track_files), files_(root_fd) {
  struct stat st;
  if (fstat(root_fd, &st) == 0) root_dev_ = st.st_dev, root_ino_ = st.st_ino;
}

// The metadata folder (and a file system's own lost+found) at the volume's root are not part of
// the volume: no record may make, remove, rename or link them, whoever sent it. A record from a
// hostile or broken peer must never reach the replica's own state.
bool Store::names_hidden_entry(int dirfd, const std::string& name) const {
  if (name != kMetadataDirName && name != kLostFoundName) return false;
  struct stat st;
  return fstat(dirfd, &st) != 0 || (st.st_dev == root_dev_ && st.st_ino == root_ino_);
}

int Store::resolve(const Record& rec, const Targets& given, Targets& t, bool need_rw) {
  t = given;
  if (t.path_fd < 0 && t.fd >= 0) t.path_fd = t.fd;
  auto borrow = [&](Fd& lease, Fd fd) {
    lease = std::move(fd);
    return lease.get();
  };
  if (rec.fid != kInvalidFileId) {
    if (t.path_fd < 0) t.path_fd = borrow(t.leases[0], files_.path(rec.fid));
    if (need_rw && t.fd < 0) {
      t.fd = borrow(t.leases[1], files_.rw(rec.fid));
      if (t.fd < 0) return errno ? errno : ENOENT;
    }
  }
  if (rec.parent != kInvalidFileId && t.parent_fd < 0) t.parent_fd = borrow(t.leases[2], files_.path(rec.parent));
  if (rec.parent2 != kInvalidFileId && t.parent2_fd < 0) t.parent2_fd = borrow(t.leases[3], files_.path(rec.parent2));
  return 0;
}

// Owner and file id of a newly created entry; the record decides both so every node agrees.
int Store::apply_created(const Record& rec, int parent_fd) {
  const char* name = rec.name.c_str();
  if (fchownat(parent_fd, name, rec.uid, rec.gid, AT_SYMLINK_NOFOLLOW) != 0) return errno;
  // The record's mode, not whatever umask this process runs with (symlinks have no mode).
  if (rec.op != Op::symlink && fchmodat(parent_fd, name, rec.mode & 07777, 0) != 0) return errno;
  if (int err = write_file_id(parent_fd, name, rec.fid)) return err;
  if (hashes_ && rec.op == Op::create && S_ISREG(rec.mode)) hashes_->created(rec.fid);
  if (track_files_) return files_.add(rec.fid, parent_fd, name);
  return 0;
}

int Store::apply_whiteout(const Record& rec, int parent_fd) {
  if (rec.whiteout_fid == kInvalidFileId) return 0;  // from a peer that did not name it
  const char* name = rec.name.c_str();
  if (fchownat(parent_fd, name, rec.uid, rec.gid, AT_SYMLINK_NOFOLLOW) != 0) return errno;
  if (int err = write_file_id(parent_fd, name, rec.whiteout_fid)) return err;
  if (track_files_) return files_.add(rec.whiteout_fid, parent_fd, name);
  return 0;
}

bool Store::stamps_mtime(const Record& rec) {
  switch (rec.op) {
    case Op::write: case Op::truncate: case Op::fallocate: case Op::create: case Op::mkdir: case Op::symlink:
      return true;
    case Op::rename:
      return (rec.flags & RENAME_WHITEOUT) != 0;  // the whiteout is a created entry
    default:
      return false;
  }
}

bool Store::changes_directories(Op op) {
  switch (op) {
    case Op::create: case Op::mkdir: case Op::symlink: case Op::link: case Op::unlink: case Op::rmdir: case Op::rename:
      return true;
    default:
      return false;
  }
}

// Every record, from a peer or from this node's own mount, passes the record policy first
// (record_policy.h): what it names, creates and sets is checked once, here, before any of it
// reaches the disk.
namespace {
// Why the policy refused the last record this thread applied: the caller's one error line says
// it (failure_text), so the Store itself only logs it at -v.
thread_local std::string last_refusal;
}  // namespace

int Store::refused_by_policy(const Record& rec) {
  last_refusal.clear();  // check_record sets it only for a refusal
  const int err = check_record(rec, &last_refusal);
  if (err) LOG_INFO("refused %s: %s (%s)", rec.describe().c_str(), last_refusal.c_str(), strerror(err));
  return err;
}

std::string Store::failure_text(int err) {
  if (last_refusal.empty()) return strerror(err);
  return last_refusal + " (" + strerror(err) + ")";
}

int Store::apply(const Record& rec, const Targets& given, Stamps* stamps_out) {
  if (int err = refused_by_policy(rec)) return err;
  Targets t;
  const bool data_op = rec.op == Op::write || rec.op == Op::truncate || rec.op == Op::fallocate;
  if (int err = resolve(rec, given, t, data_op)) return err;
  int err = 0;
  if (data_op && hashes_) {
    // The dirty-region log must name the extent before the data can reach the disk.
    std::shared_lock lk(hashes_->change_lock());
    if (int e = hashes_->before_change(rec, t.fd)) return e;
    err = apply_resolved(rec, t);
    // A failed write may still have changed some bytes: marking them dirty costs nothing.
    if (!err || rec.op == Op::write) hashes_->after_change(rec, t.fd, err == 0);
  } else {
    err = apply_resolved(rec, t);
  }
  if (err) {
    // A write that failed part way (the disk filled) left its first bytes in the file: the
    // master publishes those, so that its replicas hold what its disk holds.
    if (stamps_out && rec.op == Op::write && t.written > 0) {
      stamps_out->written = t.written;
      report_stamps(rec, t, *stamps_out);
    }
    return err;
  }
  if (stamps_out) {
    report_stamps(rec, t, *stamps_out);
    return 0;
  }
  return apply_stamps(rec, t);
}

namespace {

// Sets the mtime of the entry `name` in dirfd, or of dirfd itself when name is empty (dirfd may
// be O_PATH). Returns 0 or an errno.
int set_mtime_at(int dirfd, const char* name, timespec mtime) {
  const timespec ts[2] = {{0, UTIME_OMIT}, mtime};
  if (*name) return utimensat(dirfd, name, ts, AT_SYMLINK_NOFOLLOW) == 0 ? 0 : errno;
  if (utimensat(dirfd, "", ts, AT_EMPTY_PATH) == 0) return 0;
  // Older kernels refuse AT_EMPTY_PATH here; the /proc path works for all but symlinks.
  if (errno != EINVAL) return errno;
  return utimensat(AT_FDCWD, fd_path(dirfd).c_str(), ts, 0) == 0 ? 0 : errno;
}

timespec mtime_of(int fd, const char* name) {
  struct stat st;
  int rc = *name ? fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) : fstat(fd, &st);
  return rc == 0 ? st.st_mtim : timespec{0, -1};
}

}  // namespace

void Store::report_stamps(const Record& rec, const Targets& t, Stamps& out) {
  if (stamps_mtime(rec)) {
    const bool created = !(rec.op == Op::write || rec.op == Op::truncate || rec.op == Op::fallocate);
    out.mtime = created ? mtime_of(t.parent_fd, rec.name.c_str()) : mtime_of(t.fd, "");
  }
  if (rec.op == Op::setattr && (rec.attr_valid & (kAttrAtimeNow | kAttrMtimeNow))) {
    struct stat st;
    if (t.path_fd >= 0 && fstat(t.path_fd, &st) == 0) {
      if (rec.attr_valid & kAttrAtimeNow) out.atime = st.st_atim;
      if (rec.attr_valid & kAttrMtimeNow) out.set_mtime = st.st_mtim;
    }
  }
  if (changes_directories(rec.op)) {
    out.dir_mtime = mtime_of(t.parent_fd, "");
    if (rec.op == Op::rename) out.dir2_mtime = mtime_of(t.parent2_fd, "");
  }
}

int Store::apply_stamps(const Record& rec, const Targets& t) {
  if ((rec.attr_valid & kAttrStampMtime) && stamps_mtime(rec)) {
    const bool created = !(rec.op == Op::write || rec.op == Op::truncate || rec.op == Op::fallocate);
    if (int err = created ? set_mtime_at(t.parent_fd, rec.name.c_str(), rec.mtime) : set_mtime_at(t.fd, "", rec.mtime))
      return err;
  }
  if ((rec.attr_valid & kAttrStampDirs) && changes_directories(rec.op)) {
    // The new name's directory last: for a rename within one directory both stamps are equal.
    if (t.parent_fd >= 0)
      if (int err = set_mtime_at(t.parent_fd, "", rec.dir_mtime)) return err;
    if (rec.op == Op::rename && t.parent2_fd >= 0)
      if (int err = set_mtime_at(t.parent2_fd, "", rec.dir2_mtime)) return err;
  }
  return 0;
}

int Store::apply_resolved(const Record& rec, Targets& t) {
  switch (rec.op) {
    case Op::write:
      if (wants_direct(rec)) {
        int err = write_direct(t.fd, rec, &t.written);
        if (err != EINVAL || t.written > 0) return err;
        direct_unsupported_.store(true, std::memory_order_relaxed);
        LOG_INFO("%s: the backing file system refuses O_DIRECT; writing through the page cache", fd_path(t.fd).c_str());
      }
      if (int err = write_all(t.fd, rec.data.data(), rec.data.size(), rec.offset, &t.written, kBufferedWriteMax))
        return err;
      writeback_.wrote(rec.fid, t.fd, rec.offset, rec.data.size());
      return 0;
    case Op::truncate:
      return ok_or_errno(ftruncate(t.fd, static_cast<off_t>(rec.offset)));
    case Op::fallocate:
      return ok_or_errno(fallocate(t.fd, static_cast<int>(rec.flags), static_cast<off_t>(rec.offset),
                                   static_cast<off_t>(rec.length)));
    case Op::setattr: {
      if (t.path_fd < 0) return ENOENT;
      const std::string p = fd_path(t.path_fd);
      if (rec.attr_valid & kAttrMode) {
        if (chmod(p.c_str(), rec.mode & 07777) != 0) return errno;
      }
      if (rec.attr_valid & (kAttrUid | kAttrGid)) {
        uid_t u = (rec.attr_valid & kAttrUid) ? rec.uid : static_cast<uid_t>(-1);
        gid_t g = (rec.attr_valid & kAttrGid) ? rec.gid : static_cast<gid_t>(-1);
        if (fchownat(t.path_fd, "", u, g, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) return errno;
      }
      if (rec.attr_valid & (kAttrAtime | kAttrMtime | kAttrAtimeNow | kAttrMtimeNow)) {
        timespec ts[2];
        ts[0] = (rec.attr_valid & kAttrAtimeNow) ? timespec{0, UTIME_NOW}
                : (rec.attr_valid & kAttrAtime)  ? rec.atime
                                                 : timespec{0, UTIME_OMIT};
        ts[1] = (rec.attr_valid & kAttrMtimeNow) ? timespec{0, UTIME_NOW}
                : (rec.attr_valid & kAttrMtime)  ? rec.mtime
                                                 : timespec{0, UTIME_OMIT};
        if (utimensat(t.path_fd, "", ts, AT_EMPTY_PATH) != 0) {
          // Older kernels refuse AT_EMPTY_PATH here; the /proc path works for all but symlinks.
          if (errno != EINVAL || utimensat(AT_FDCWD, p.c_str(), ts, 0) != 0) return errno;
        }
      }
      return 0;
    }
    case Op::create:
    case Op::mkdir:
    case Op::symlink: {
      if (t.parent_fd < 0) return ENOENT;
      if (names_hidden_entry(t.parent_fd, rec.name)) return EPERM;
      int rc;
      if (rec.op == Op::mkdir) {
        rc = mkdirat(t.parent_fd, rec.name.c_str(), rec.mode & 07777);
      } else if (rec.op == Op::symlink) {
        std::string target(rec.data);
        rc = symlinkat(target.c_str(), t.parent_fd, rec.name.c_str());
      } else {
        rc = mknodat(t.parent_fd, rec.name.c_str(), rec.mode, static_cast<dev_t>(rec.rdev));
      }
      if (rc != 0) return errno;
      return apply_created(rec, t.parent_fd);
    }
    case Op::link: {
      if (t.path_fd < 0 || t.parent_fd < 0) return ENOENT;
      if (names_hidden_entry(t.parent_fd, rec.name)) return EPERM;
      if (linkat(t.path_fd, "", t.parent_fd, rec.name.c_str(), AT_EMPTY_PATH) != 0) return errno;
      return 0;
    }
    case Op::unlink:
    case Op::rmdir: {
      if (t.parent_fd < 0) return ENOENT;
      if (names_hidden_entry(t.parent_fd, rec.name)) return EPERM;
      Fd held = hold_for_removal(rec.fid);
      if (unlinkat(t.parent_fd, rec.name.c_str(), rec.op == Op::rmdir ? AT_REMOVEDIR : 0) != 0) return errno;
      maybe_orphaned(rec.fid, held);
      return 0;
    }
    case Op::rename: {
      if (t.parent_fd < 0 || t.parent2_fd < 0) return ENOENT;
      if (names_hidden_entry(t.parent_fd, rec.name) || names_hidden_entry(t.parent2_fd, rec.name2)) return EPERM;
      // A rename over an existing file takes that file's name away.
      const FileId replaced = (rec.flags & RENAME_EXCHANGE) ? kInvalidFileId
                                                             : read_file_id(t.parent2_fd, rec.name2.c_str()).value_or(kInvalidFileId);
      Fd held = hold_for_removal(replaced);
      if (renameat2(t.parent_fd, rec.name.c_str(), t.parent2_fd, rec.name2.c_str(), rec.flags) != 0) return errno;
      maybe_orphaned(replaced, held);
      if (rec.flags & RENAME_WHITEOUT) return apply_whiteout(rec, t.parent_fd);
      return 0;
    }
    case Op::setxattr:
    case Op::removexattr: {
      if (t.path_fd < 0) return ENOENT;
      const std::string p = fd_path(t.path_fd);
      int rc = rec.op == Op::setxattr
                   ? setxattr(p.c_str(), rec.name.c_str(), rec.data.data(), rec.data.size(), static_cast<int>(rec.flags))
                   : removexattr(p.c_str(), rec.name.c_str());
      return ok_or_errno(rc);
    }
    case Op::release:
      files_.release(rec.fid);
      if (hashes_) hashes_->maybe_orphaned(rec.fid);
      return 0;
    case Op::fsync: {
      if (rec.fid == kInvalidFileId) return sync_all();
      int fd = t.fd >= 0 ? t.fd : -1;
      int tmp = -1;
      if (fd < 0) {
        if (t.path_fd < 0) return ENOENT;
        // fsync needs a real descriptor; O_RDONLY works for files and directories alike.
        tmp = open(fd_path(t.path_fd).c_str(), O_RDONLY | O_CLOEXEC);
        if (tmp < 0) return errno;
        fd = tmp;
      }
      int rc = (rec.flags & kDataSync) ? fdatasync(fd) : fsync(fd);
      int err = rc == 0 ? 0 : errno;
      if (tmp >= 0) close(tmp);
      return err;
    }
  }
  return EINVAL;
}

bool Store::wants_direct(const Record& rec) const {
  if (!direct_writes_.load(std::memory_order_relaxed) || direct_unsupported_.load(std::memory_order_relaxed)) return false;
  return rec.data.size() >= kDirectMin && rec.data.size() % kDirectAlign == 0 && rec.offset % kDirectAlign == 0;
}

int Store::write_direct(int fd, const Record& rec, size_t* written) {
  *written = 0;
  int dfd = open(fd_path(fd).c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
  if (dfd < 0) return errno;
  // O_DIRECT wants an aligned buffer too; a record's data sits wherever its frame put it, so
  // it goes through this thread's aligned buffer (reused: copying into memory already touched
  // is cheap, where a new page-cache page is not).
  constexpr size_t kChunk = 1 << 20;
  struct AlignedBuffer {
    char* p = static_cast<char*>(std::aligned_alloc(kDirectAlign, kChunk));
    ~AlignedBuffer() { std::free(p); }
  };
  thread_local AlignedBuffer buf;
  int err = buf.p ? 0 : ENOMEM;
  size_t done = 0;
  while (!err && done < rec.data.size()) {
    const size_t n = std::min(kChunk, rec.data.size() - done);
    const char* src = rec.data.data() + done;
    if (reinterpret_cast<uintptr_t>(src) % kDirectAlign != 0) {
      std::memcpy(buf.p, src, n);
      src = buf.p;
    }
    size_t piece = 0;
    err = write_all(dfd, src, n, rec.offset + done, &piece);
    done += piece;
  }
  *written = done;
  close(dfd);
  return err;
}

Fd Store::hold_for_removal(FileId fid) {
  // Only a replica pins files that lose their last name (files.h); a master's users hold theirs.
  if (!track_files_ || fid == kInvalidFileId || fid == kRootFileId) return {};
  return files_.path(fid);
}

void Store::maybe_orphaned(FileId fid, Fd held) {
  if (fid == kInvalidFileId) return;
  files_.maybe_orphaned(fid, /*pin=*/track_files_, std::move(held));
  if (hashes_) hashes_->maybe_orphaned(fid);
}

int Store::sync_all() {
  int fd = open(fd_path(root_fd_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno;
  int err = syncfs(fd) == 0 ? 0 : errno;
  close(fd);
  return err;
}

FileId Store::entry_fid(FileId dir, const std::string& name) {
  Fd dfd = files_.path(dir);
  if (!dfd || !valid_path_component(name)) return kInvalidFileId;
  return read_file_id(dfd.get(), name.c_str()).value_or(kInvalidFileId);
}

// A replayed namespace record whose effect is already there still leaves its directories'
// times: a crash may have come between the change and its stamp. Records replay in order, so
// the last one to touch a directory sets its final time.
int Store::skip_replayed(const Record& rec) {
  if (!(rec.attr_valid & kAttrStampDirs) || !changes_directories(rec.op)) return 0;
  Targets t;
  if (rec.parent != kInvalidFileId) t.parent_fd = (t.leases[2] = files_.path(rec.parent)).get();
  if (rec.parent2 != kInvalidFileId) t.parent2_fd = (t.leases[3] = files_.path(rec.parent2)).get();
  Record dirs_only = rec;
  dirs_only.attr_valid = kAttrStampDirs;
  apply_stamps(dirs_only, t);  // best effort: a directory gone by now has no time to keep
  return 0;
}

int Store::apply_replayed(const Record& rec) {
  // Before anything else: a record already half applied is finished below without apply().
  if (int err = refused_by_policy(rec)) return err;
  auto skip_unless = [&](bool cond) { return !cond; };
  switch (rec.op) {
    case Op::create:
    case Op::mkdir:
    case Op::symlink: {
      // The file exists already, possibly under another name by now: nothing to create.
      if (files_.path(rec.fid)) return skip_replayed(rec);
      FileId there = entry_fid(rec.parent, rec.name);
      if (there != kInvalidFileId) {
        // Already created (same id), or the name belongs to a later file: either way the
        // directory is past this record.
        if (there == rec.fid) files_.add(rec.fid, files_.path(rec.parent).get(), rec.name.c_str());
        return skip_replayed(rec);
      }
      Fd pfd = files_.path(rec.parent);
      struct stat st;
      if (pfd && fstatat(pfd.get(), rec.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
        // Created but not yet tagged when the daemon died: finish the job.
        return apply_created(rec, pfd.get());
      }
      break;
    }
    case Op::link: {
      if (entry_fid(rec.parent, rec.name) != kInvalidFileId) return skip_replayed(rec);
      if (!files_.path(rec.fid)) return skip_replayed(rec);
      break;
    }
    case Op::rename:
      if ((rec.flags & RENAME_WHITEOUT) && rec.fid != kInvalidFileId && entry_fid(rec.parent2, rec.name2) == rec.fid) {
        // Renamed already; the whiteout may have been left untagged when the daemon died.
        Fd pfd = files_.path(rec.parent);
        struct stat st;
        if (pfd && entry_fid(rec.parent, rec.name) == kInvalidFileId &&
            fstatat(pfd.get(), rec.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == 0) {
          if (int err = apply_whiteout(rec, pfd.get())) return err;
          const timespec ts[2] = {{0, UTIME_OMIT}, rec.mtime};
          if ((rec.attr_valid & kAttrStampMtime) && utimensat(pfd.get(), rec.name.c_str(), ts, AT_SYMLINK_NOFOLLOW) != 0) return errno;
        }
        return skip_replayed(rec);
      }
      [[fallthrough]];
    case Op::unlink:
    case Op::rmdir:
      if (skip_unless(rec.fid != kInvalidFileId && entry_fid(rec.parent, rec.name) == rec.fid)) return skip_replayed(rec);
      break;
    default:
      if (rec.fid != kInvalidFileId && !files_.path(rec.fid)) return 0;  // the file is gone by now
      break;
  }
  int err = apply(rec);
  switch (err) {
    case 0:
      return 0;
    case ENOENT:
    case EEXIST:
    case ENOTEMPTY:
    case ENODATA:
      return skip_replayed(rec);  // the directory already reflects a later state
    default:
      return err;
  }
}

}  // namespace blockrepl
