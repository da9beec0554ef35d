#define FUSE_USE_VERSION 314
#include "fs/filesystem.h"

#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <cstddef>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <cerrno>
#include <cinttypes>
#include <shared_mutex>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <memory>
#include <string>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>
#include <vector>

#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/log.h"
#include "blockrepl/trace.h"
#include "blockrepl/metadata.h"
#include "fs/inodes.h"

namespace blockrepl::fs {

struct Filesystem::Impl : public CacheInvalidator {
  Node& node;
  MountConfig& cfg;
  InodeTable inodes;
  std::atomic<fuse_session*> se{nullptr};
  // A slave's mount refuses changes; `promote` lifts that while mounted (the replica says).
  bool read_only() const { return !cfg.writable(); }

  // Taken shared by every operation on a read-only (replica) mount, exclusively by a stage
  // switch. A writable mount never switches stages, so it takes nothing.
  std::shared_mutex switch_mu;
  void hold_readers() override { switch_mu.lock(); }
  void release_readers() override { switch_mu.unlock(); }
  explicit Impl(Node& n, MountConfig& c) : node(n), cfg(c) {}
  ~Impl() { stop_deferred(); }

  // Invalidations the daemon owes the kernel for changes it made on its own (set-id bits dropped
  // on write; pages of a failed writeback). Sent from a separate thread: never from inside an
  // operation on the same inode (that deadlocks).
  struct Inval {
    fuse_ino_t ino;
    off_t off, len;  // off < 0: attributes only
  };
  std::mutex deferred_mu;
  std::condition_variable deferred_cv;
  std::vector<Inval> deferred;
  bool deferred_stop = false;
  std::thread deferred_thread;

  void defer_invalidation(fuse_ino_t ino, off_t off, off_t len) {
    std::lock_guard lk(deferred_mu);
    if (!deferred_thread.joinable()) deferred_thread = std::thread([this] { run_deferred(); });
    deferred.push_back({ino, off, len});
    deferred_cv.notify_one();
  }
  void defer_attr_invalidation(fuse_ino_t ino) { defer_invalidation(ino, -1, 0); }
  void run_deferred() {
    std::unique_lock lk(deferred_mu);
    for (;;) {
      deferred_cv.wait(lk, [&] { return deferred_stop || !deferred.empty(); });
      if (deferred_stop) return;
      auto batch = std::move(deferred);
      deferred.clear();
      lk.unlock();
      for (const Inval& i : batch)
        if (fuse_session* s = se.load()) fuse_lowlevel_notify_inval_inode(s, i.ino, i.off, i.len);
      lk.lock();
    }
  }
  void stop_deferred() {
    {
      std::lock_guard lk(deferred_mu);
      deferred_stop = true;
      deferred_cv.notify_one();
    }
    if (deferred_thread.joinable()) deferred_thread.join();
  }

  // The kernel's inode number for a file id, or 0 if the kernel does not know the file.
  fuse_ino_t ino_for(FileId fid) {
    if (fid == kRootFileId) return FUSE_ROOT_ID;
    Inode* inode = inodes.find_fid(fid);
    if (!inode) return 0;
    return inode == inodes.root() ? FUSE_ROOT_ID : reinterpret_cast<fuse_ino_t>(inode);
  }

  void entry(FileId parent, const std::string& name) {
    fuse_session* s = se.load();
    if (fuse_ino_t p = s ? ino_for(parent) : 0) fuse_lowlevel_notify_inval_entry(s, p, name.c_str(), name.size());
  }
  void data(FileId fid, off_t off, off_t len) {
    fuse_session* s = se.load();
    if (fuse_ino_t i = s ? ino_for(fid) : 0) fuse_lowlevel_notify_inval_inode(s, i, off, len);
  }

  void invalidate(const Record& rec) override {
    if (!se) return;
    switch (rec.op) {
      case Op::write:
        data(rec.fid, static_cast<off_t>(rec.offset), static_cast<off_t>(rec.data.size()));
        break;
      case Op::truncate:
      case Op::fallocate:
        data(rec.fid, 0, 0);
        break;
      case Op::setattr:
      case Op::setxattr:
      case Op::removexattr:
        data(rec.fid, -1, 0);  // attributes only
        break;
      case Op::create:
      case Op::mkdir:
      case Op::symlink:
        entry(rec.parent, rec.name);
        data(rec.parent, -1, 0);
        break;
      case Op::link:
      case Op::unlink:
      case Op::rmdir:
        entry(rec.parent, rec.name);
        data(rec.parent, -1, 0);
        data(rec.fid, -1, 0);  // its link count changed
        break;
      case Op::rename:
        entry(rec.parent, rec.name);
        entry(rec.parent2, rec.name2);
        data(rec.parent, -1, 0);
        data(rec.parent2, -1, 0);
        break;
      case Op::fsync:
      case Op::release:
        break;
    }
  }

  void invalidate_all() override {
    fuse_session* s = se.load();
    if (!s) return;
    fuse_lowlevel_notify_inval_inode(s, FUSE_ROOT_ID, 0, 0);
    for (Inode* inode : inodes.all())
      if (inode != inodes.root()) fuse_lowlevel_notify_inval_inode(s, reinterpret_cast<fuse_ino_t>(inode), 0, 0);
  }
};

namespace {

using Impl = Filesystem::Impl;

Impl& impl_of(fuse_req_t req) { return *static_cast<Impl*>(fuse_req_userdata(req)); }

Inode& inode_of(fuse_req_t req, fuse_ino_t ino) {
  if (ino == FUSE_ROOT_ID) return *impl_of(req).inodes.root();
  return *reinterpret_cast<Inode*>(ino);
}

fuse_ino_t ino_of(Impl& fs, Inode* inode) {
  return inode == fs.inodes.root() ? FUSE_ROOT_ID : reinterpret_cast<fuse_ino_t>(inode);
}

// A descriptor of the inode (O_PATH) for the length of one operation, or an empty one with
// errno set if the inode is gone: the registry's cached one while it names this very inode,
// else opened from the inode's own handle.
Fd path_of(Impl& fs, Inode& inode) {
  if (inode.pinned) return inode.pinned;
  FileRegistry& files = fs.node.store().files();
  const FileId fid = inode.fid.load(std::memory_order_relaxed);
  if (fid != kInvalidFileId && files.handle(fid) == inode.handle)
    if (Fd fd = files.path(fid)) return fd;
  return files.open_handle(inode.handle, O_PATH);
}

// The same opened for I/O (flags as for open(2)), owned by the caller.
OwnedFd open_inode(Impl& fs, Inode& inode, int flags) {
  if (inode.pinned) return OwnedFd(open(fd_path(inode.pinned.get()).c_str(), flags | O_CLOEXEC));
  return fs.node.store().files().open_owned(inode.handle, flags);
}

// Root entries that are not part of the volume (see is_hidden_root_entry) are neither shown nor
// made through the mount: a change inside the file system's own lost+found would be a record
// that replicas, which keep a lost+found of their own, could not apply.
bool is_hidden(fuse_ino_t parent, const char* name) {
  return parent == FUSE_ROOT_ID && (strcmp(name, kMetadataDirName) == 0 || strcmp(name, kLostFoundName) == 0);
}

constexpr const char kCapsXattr[] = "security.capability";

bool is_reserved_xattr(const char* name) {
  return strncmp(name, kReservedXattrPrefix, sizeof(kReservedXattrPrefix) - 1) == 0;
}

// --- what the kernel asked of the request at hand ---------------------------------------------

// libfuse 3.14 decodes FUSE_WRITE without its write_flags, so the write handler cannot see
// FUSE_WRITE_KILL_SUIDGID. Our read hook (read_request) sees every request before libfuse
// decodes it, in the thread that then handles it: libfuse's workers (fuse_do_work) read a request
// and process it in one thread, and never read by splice here (op_init turns that off). So a
// thread-local describes the request this thread is handling, however many workers run.
thread_local bool t_write_kills_suidgid = false;

bool current_write_kills_suidgid() { return t_write_kills_suidgid; }

void note_request(const void* buf, ssize_t n) {
  t_write_kills_suidgid = false;
  if (n < static_cast<ssize_t>(sizeof(fuse_in_header) + sizeof(fuse_write_in))) return;
  fuse_in_header in;
  memcpy(&in, buf, sizeof in);
  if (in.opcode != FUSE_WRITE) return;
  fuse_write_in w;
  memcpy(&w, static_cast<const char*>(buf) + sizeof in, sizeof w);
  t_write_kills_suidgid = (w.write_flags & FUSE_WRITE_KILL_SUIDGID) != 0;
}

// --- file ids -------------------------------------------------------------------------------

// The id of a looked-up inode. Files that predate the volume (or were put into the backing
// directory behind our back) get one on first sight, on a writable node.
FileId ensure_file_id(Impl& fs, Inode& inode, int parent_fd, const char* name) {
  FileId fid = inode.fid.load(std::memory_order_relaxed);
  if (fid != kInvalidFileId) return fid;
  if (auto got = read_file_id(parent_fd, name)) {
    fid = *got;
  } else if (!fs.read_only()) {
    int err = 0;
    fid = assign_file_id(parent_fd, name, &err);
    if (fid == kInvalidFileId) {
      LOG_WARN("cannot give %s a file id: %s", name, strerror(err));
      return kInvalidFileId;
    }
    LOG_INFO("gave pre-existing %s file id %016llx", name, static_cast<unsigned long long>(fid));
  } else {
    return kInvalidFileId;
  }
  fs.inodes.set_fid(&inode, fid);
  return fid;
}

// --- lookups --------------------------------------------------------------------------------

int stat_inode(int fd, struct stat* st) {
  return fstatat(fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) == 0 ? 0 : errno;
}

int do_lookup(Impl& fs, fuse_ino_t parent, const char* name, fuse_entry_param* e) {
  memset(e, 0, sizeof *e);
  e->attr_timeout = fs.cfg.timeout;
  e->entry_timeout = fs.cfg.timeout;
  if (is_hidden(parent, name)) return ENOENT;
  Inode& dir = parent == FUSE_ROOT_ID ? *fs.inodes.root() : *reinterpret_cast<Inode*>(parent);
  Fd dirfd = path_of(fs, dir);
  if (!dirfd) return errno;
  Fd fd(OwnedFd(openat(dirfd.get(), name, O_PATH | O_NOFOLLOW | O_CLOEXEC)));
  if (!fd) return errno;
  if (int err = stat_inode(fd.get(), &e->attr)) return err;
  FileHandle handle;
  if (int err = FileHandle::of(fd.get(), "", &handle)) return err;
  bool fresh = false;
  Inode* inode = fs.inodes.acquire(handle, e->attr, &fresh);
  inode->mode.store(e->attr.st_mode, std::memory_order_relaxed);
  if (FileId fid = ensure_file_id(fs, *inode, dirfd.get(), name); fid != kInvalidFileId && fresh)
    fs.node.store().files().add_fd(fid, std::move(fd));  // keeps the descriptor while it is hot
  e->ino = ino_of(fs, inode);
  return 0;
}

// --- records --------------------------------------------------------------------------------

bool refuse_if_read_only(fuse_req_t req) {
  if (impl_of(req).read_only()) {
    fuse_reply_err(req, EROFS);
    return true;
  }
  return false;
}

// Owner of a new entry: the caller, with the directory's group when it is set-group-id.
void set_new_owner(fuse_req_t req, Inode& dir, Record& rec) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  rec.uid = ctx->uid;
  rec.gid = ctx->gid;
  struct stat st;
  Fd dirfd = path_of(impl_of(req), dir);
  if (dirfd && stat_inode(dirfd.get(), &st) == 0 && (st.st_mode & S_ISGID)) {
    rec.gid = st.st_gid;
    if (S_ISDIR(rec.mode)) rec.mode |= S_ISGID;
  }
}

// A change that cannot be answered is taken back, so that it leaves nothing behind: an entry made
// but not looked up (no descriptor, say) would exist without the application knowing it.
void undo_create(Impl& fs, Inode& dir, int dirfd, const char* name, FileId fid, bool is_dir) {
  Record undo;
  undo.op = is_dir ? Op::rmdir : Op::unlink;
  undo.parent = dir.fid;
  undo.name = name;
  undo.fid = fid;
  Targets t;
  t.parent_fd = dirfd;
  if (int err = fs.node.submit(undo, t))
    LOG_WARN("cannot take back %s after a failed create: %s", name, strerror(err));
}

// Creates an entry of any type through the Node and answers with its entry.
void make_entry(fuse_req_t req, fuse_ino_t parent, const char* name, Record& rec) {
  if (refuse_if_read_only(req)) return;
  if (is_hidden(parent, name)) return (void)fuse_reply_err(req, EPERM);
  Impl& fs = impl_of(req);
  Inode& dir = inode_of(req, parent);
  rec.parent = dir.fid;
  rec.name = name;
  rec.fid = new_file_id();
  set_new_owner(req, dir, rec);
  Fd dirfd = path_of(fs, dir);
  if (!dirfd) return (void)fuse_reply_err(req, errno);
  Targets t;
  t.parent_fd = dirfd.get();
  if (int err = fs.node.submit(rec, t)) return (void)fuse_reply_err(req, err);
  fuse_entry_param e;
  if (int err = do_lookup(fs, parent, name, &e)) {
    undo_create(fs, dir, dirfd.get(), name, rec.fid, S_ISDIR(rec.mode));
    return (void)fuse_reply_err(req, err);
  }
  fuse_reply_entry(req, &e);
}

// A descriptor to change a file that the caller did not open (truncate(path), say).
OwnedFd open_for_change(Impl& fs, Inode& inode, int flags) { return open_inode(fs, inode, flags); }

// --- privileges ------------------------------------------------------------------------------

// We negotiate FUSE_HANDLE_KILLPRIV_V2 (see kill_priv_writev below), so the kernel no longer asks
// for security.capability before every write, and dropping privileges is our job, exactly when a
// local file system would drop them:
// - set-user-id, and set-group-id when group-executable: only when the kernel says so, i.e. the
//   writer (or truncater) lacks CAP_FSETID (FUSE_WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID). A write
//   by root keeps them, as on ext4.
// - file capabilities (security.capability): on every write, by anyone, as on ext4.
int drop_set_id_bits(Impl& fs, Inode& inode, fuse_ino_t ino) {
  struct stat st;
  Fd ifd = path_of(fs, inode);
  if (!ifd) return errno;
  if (int err = stat_inode(ifd.get(), &st)) return err;  // the cached mode may be stale
  uint32_t kill = st.st_mode & S_ISUID;
  if ((st.st_mode & S_ISGID) && (st.st_mode & S_IXGRP)) kill |= S_ISGID;
  if (!kill || !S_ISREG(st.st_mode)) return 0;
  Record rec;
  rec.op = Op::setattr;
  rec.fid = inode.fid;
  rec.attr_valid = kAttrMode;
  rec.mode = st.st_mode & 07777 & ~kill;
  Targets t;
  t.path_fd = ifd.get();
  if (int err = fs.node.submit(rec, t)) return err;
  inode.mode.store((st.st_mode & S_IFMT) | rec.mode, std::memory_order_relaxed);
  fs.defer_attr_invalidation(ino);  // the kernel still caches the old mode
  return 0;
}

int drop_capabilities_on_write(Impl& fs, Inode& inode) {
  if (inode.known_no_caps.load(std::memory_order_relaxed)) return 0;
  Fd ifd = path_of(fs, inode);
  if (!ifd) return errno;
  if (getxattr(fd_path(ifd.get()).c_str(), kCapsXattr, nullptr, 0) >= 0) {
    Record rec;
    rec.op = Op::removexattr;
    rec.fid = inode.fid;
    rec.name = kCapsXattr;
    Targets t;
    t.path_fd = ifd.get();
    if (int err = fs.node.submit(rec, t)) return err;
  }
  inode.known_no_caps.store(true, std::memory_order_relaxed);
  return 0;
}

int drop_privileges_on_write(Impl& fs, Inode& inode, fuse_ino_t ino) {
  if (current_write_kills_suidgid())
    if (int err = drop_set_id_bits(fs, inode, ino)) return err;
  return drop_capabilities_on_write(fs, inode);
}

// --- operations -----------------------------------------------------------------------------

void op_init(void* userdata, fuse_conn_info* conn) {
  auto& fs = *static_cast<Impl*>(userdata);
  // The writeback cache makes the kernel trust its own file sizes; a replica's files change
  // behind the kernel's back, so there the daemon's attributes must win.
  if (!fs.read_only() && (conn->capable & FUSE_CAP_WRITEBACK_CACHE)) conn->want |= FUSE_CAP_WRITEBACK_CACHE;
  else conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
  if (conn->capable & FUSE_CAP_CACHE_SYMLINKS) conn->want |= FUSE_CAP_CACHE_SYMLINKS;
  // Truncation on open arrives as a setattr, so it becomes a truncate record like any other.
  conn->want &= ~FUSE_CAP_ATOMIC_O_TRUNC;
  // Only this daemon changes the files (a slave invalidates explicitly what it applies), so the
  // kernel need not re-check attributes before every cached read.
  conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  // Locks stay in the kernel, local to this host (we implement neither getlk/setlk nor flock).
  conn->want &= ~(FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS);
  // Requests must arrive through our read hook, which notes what a write asks for (note_request).
  conn->want &= ~FUSE_CAP_SPLICE_READ;
  conn->max_write = 1u << 20;
  conn->max_readahead = 1u << 20;
  conn->max_background = 128;
  conn->congestion_threshold = 96;
}

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  fuse_entry_param e;
  int err = do_lookup(impl_of(req), parent, name, &e);
  if (err == ENOENT) {
    // A negative entry, cached like a positive one: only we change the directory.
    e.ino = 0;
    e.entry_timeout = impl_of(req).cfg.timeout;
    fuse_reply_entry(req, &e);
  } else if (err) {
    fuse_reply_err(req, err);
  } else {
    fuse_reply_entry(req, &e);
  }
}

// The kernel let go of an inode. If it was a file with no name left, its last handle is closed:
// replicas, which kept it open for writes through such handles, may let go of it too.
void forget_inode(Impl& fs, fuse_ino_t ino, uint64_t nlookup) {
  if (ino == FUSE_ROOT_ID) return;
  const FileId released = fs.inodes.forget(reinterpret_cast<Inode*>(ino), nlookup);
  if (released == kInvalidFileId || fs.read_only()) return;
  Record rec;
  rec.op = Op::release;
  rec.fid = released;
  if (int err = fs.node.submit(rec)) LOG_WARN("release of unlinked file %016llx: %s", static_cast<unsigned long long>(released), strerror(err));
}

void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  forget_inode(impl_of(req), ino, nlookup);
  fuse_reply_none(req);
}

void op_forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  Impl& fs = impl_of(req);
  for (size_t i = 0; i < count; i++) forget_inode(fs, forgets[i].ino, forgets[i].nlookup);
  fuse_reply_none(req);
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  struct stat st;
  Inode& inode = inode_of(req, ino);
  Fd ifd = path_of(impl_of(req), inode);
  if (!ifd) return (void)fuse_reply_err(req, errno);
  if (int err = stat_inode(ifd.get(), &st)) return (void)fuse_reply_err(req, err);
  inode.mode.store(st.st_mode, std::memory_order_relaxed);
  fuse_reply_attr(req, &st, impl_of(req).cfg.timeout);
}

void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int valid, fuse_file_info* fi) {
  if (refuse_if_read_only(req)) return;
  Impl& fs = impl_of(req);
  Inode& inode = inode_of(req, ino);
  Fd ifd = path_of(fs, inode);
  if (!ifd) {
    // The kernel writes back the times of a file whose last name went and whose last handle
    // closed (syncfs, eviction). The file is gone here and on every replica; nobody can read
    // those times, and failing would fail the caller's syncfs: accept them.
    constexpr int kTimes = FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW |
                           FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME;
    if (errno == ENOENT && !fi && (valid & ~kTimes) == 0) {
      struct stat st = *attr;
      st.st_mode = inode.mode.load(std::memory_order_relaxed);
      st.st_nlink = 0;
      return (void)fuse_reply_attr(req, &st, 0);
    }
    return (void)fuse_reply_err(req, errno);
  }
  Targets t;
  t.path_fd = ifd.get();
  if (fi) t.fd = static_cast<int>(fi->fh);

  Record rec;
  rec.op = Op::setattr;
  rec.fid = inode.fid;
  if (valid & FUSE_SET_ATTR_MODE) {
    rec.attr_valid |= kAttrMode;
    rec.mode = attr->st_mode;
  }
  if (valid & FUSE_SET_ATTR_UID) {
    rec.attr_valid |= kAttrUid;
    rec.uid = attr->st_uid;
  }
  if (valid & FUSE_SET_ATTR_GID) {
    rec.attr_valid |= kAttrGid;
    rec.gid = attr->st_gid;
  }
  if (valid & FUSE_SET_ATTR_ATIME_NOW) rec.attr_valid |= kAttrAtimeNow;
  else if (valid & FUSE_SET_ATTR_ATIME) rec.attr_valid |= kAttrAtime, rec.atime = attr->st_atim;
  if (valid & FUSE_SET_ATTR_MTIME_NOW) rec.attr_valid |= kAttrMtimeNow;
  else if (valid & FUSE_SET_ATTR_MTIME) rec.attr_valid |= kAttrMtime, rec.mtime = attr->st_mtim;

  if (valid & FUSE_SET_ATTR_SIZE) {
    Record tr;
    tr.op = Op::truncate;
    tr.fid = inode.fid;
    tr.offset = static_cast<uint64_t>(attr->st_size);
    Targets tt = t;
    OwnedFd tmp;
    if (tt.fd < 0) {
      tmp = open_for_change(fs, inode, O_WRONLY);
      if (!tmp) return (void)fuse_reply_err(req, errno);
      tt.fd = tmp.get();
    }
    int err = fs.node.submit(tr, tt);
    if (err) return (void)fuse_reply_err(req, err);
    // A size change drops privileges as a write does; the kernel asks for the set-id bits only
    // when the caller lacks CAP_FSETID (FATTR_KILL_SUIDGID, which libfuse passes as KILL_SUID).
    if ((valid & FUSE_SET_ATTR_KILL_SUID) && !(rec.attr_valid & kAttrMode))
      if ((err = drop_set_id_bits(fs, inode, ino))) return (void)fuse_reply_err(req, err);
    if ((err = drop_capabilities_on_write(fs, inode))) return (void)fuse_reply_err(req, err);
  }
  if (rec.attr_valid) {
    if (int err = fs.node.submit(rec, t)) return (void)fuse_reply_err(req, err);
  }
  op_getattr(req, ino, fi);
}

void op_readlink(fuse_req_t req, fuse_ino_t ino) {
  char buf[PATH_MAX + 1];
  Fd ifd = path_of(impl_of(req), inode_of(req, ino));
  if (!ifd) return (void)fuse_reply_err(req, errno);
  ssize_t n = readlinkat(ifd.get(), "", buf, sizeof buf);
  if (n < 0) return (void)fuse_reply_err(req, errno);
  if (n == sizeof buf) return (void)fuse_reply_err(req, ENAMETOOLONG);
  buf[n] = '\0';
  fuse_reply_readlink(req, buf);
}

void op_mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) {
  Record rec;
  rec.op = S_ISDIR(mode) ? Op::mkdir : Op::create;
  rec.mode = mode;
  // The kernel passes mknod's device argument for every type; only devices keep it (the record
  // policy refuses a device number on anything else, as a file system ignores it).
  rec.rdev = S_ISCHR(mode) || S_ISBLK(mode) ? rdev : 0;
  make_entry(req, parent, name, rec);
}

void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  Record rec;
  rec.op = Op::mkdir;
  rec.mode = S_IFDIR | (mode & 07777);
  make_entry(req, parent, name, rec);
}

void op_symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name) {
  Record rec;
  rec.op = Op::symlink;
  rec.mode = S_IFLNK | 0777;
  rec.data = link;
  make_entry(req, parent, name, rec);
}

void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname) {
  if (refuse_if_read_only(req)) return;
  if (is_hidden(newparent, newname)) return (void)fuse_reply_err(req, EPERM);
  Impl& fs = impl_of(req);
  Inode& inode = inode_of(req, ino);
  Inode& dir = inode_of(req, newparent);
  Record rec;
  rec.op = Op::link;
  rec.fid = inode.fid;
  rec.parent = dir.fid;
  rec.name = newname;
  Fd ifd = path_of(fs, inode), dirfd = path_of(fs, dir);
  if (!ifd || !dirfd) return (void)fuse_reply_err(req, errno);
  Targets t;
  t.path_fd = ifd.get();
  t.parent_fd = dirfd.get();
  if (int err = fs.node.submit(rec, t)) return (void)fuse_reply_err(req, err);
  fuse_entry_param e;
  if (int err = do_lookup(fs, newparent, newname, &e)) return (void)fuse_reply_err(req, err);
  fuse_reply_entry(req, &e);
}

void remove_entry(fuse_req_t req, fuse_ino_t parent, const char* name, Op op) {
  if (refuse_if_read_only(req)) return;
  if (is_hidden(parent, name)) return (void)fuse_reply_err(req, EPERM);
  Impl& fs = impl_of(req);
  Inode& dir = inode_of(req, parent);
  Record rec;
  rec.op = op;
  rec.parent = dir.fid;
  rec.name = name;
  Fd dirfd = path_of(fs, dir);
  if (!dirfd) return (void)fuse_reply_err(req, errno);
  // The victim's id lets a replica release what it holds for it.
  rec.fid = read_file_id(dirfd.get(), name).value_or(kInvalidFileId);
  Targets t;
  t.parent_fd = dirfd.get();
  fuse_reply_err(req, fs.node.submit(rec, t));
}

void op_unlink(fuse_req_t req, fuse_ino_t parent, const char* name) { remove_entry(req, parent, name, Op::unlink); }
void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) { remove_entry(req, parent, name, Op::rmdir); }

void op_rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent, const char* newname,
               unsigned int flags) {
  if (refuse_if_read_only(req)) return;
  if (is_hidden(parent, name) || is_hidden(newparent, newname)) return (void)fuse_reply_err(req, EPERM);
  if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT)) return (void)fuse_reply_err(req, EINVAL);
  Impl& fs = impl_of(req);
  Inode& dir = inode_of(req, parent);
  Inode& dir2 = inode_of(req, newparent);
  Record rec;
  if (flags & RENAME_WHITEOUT) {
    // The whiteout left at the old name is a new entry of the volume: its id and owner (the
    // caller, as the kernel would make it) travel in the record so every node agrees.
    rec.whiteout_fid = new_file_id();
    rec.mode = S_IFCHR;
    set_new_owner(req, dir, rec);
    rec.mode = 0;
  }
  Fd dirfd = path_of(fs, dir), dir2fd = path_of(fs, dir2);
  if (!dirfd || !dir2fd) return (void)fuse_reply_err(req, errno);
  rec.op = Op::rename;
  rec.fid = read_file_id(dirfd.get(), name).value_or(kInvalidFileId);  // lets a replica check it renames the same file
  rec.parent = dir.fid;
  rec.name = name;
  rec.parent2 = dir2.fid;
  rec.name2 = newname;
  rec.flags = flags;
  Targets t;
  t.parent_fd = dirfd.get();
  t.parent2_fd = dir2fd.get();
  fuse_reply_err(req, fs.node.submit(rec, t));
}

// Flags for the backing descriptor of a file the application opens.
int backing_open_flags(int flags) {
  // The writeback cache may read pages of a write-only file and computes append offsets itself;
  // O_DIRECT data is bounced by the kernel as a plain write; O_SYNC/O_DSYNC arrive as fsync.
  // O_NOFOLLOW would refuse the /proc/self/fd link we reopen through (the kernel already
  // resolved the name without following).
  flags &= ~(O_CREAT | O_EXCL | O_NOCTTY | O_TRUNC | O_APPEND | O_DIRECT | O_SYNC | O_DSYNC | O_NOFOLLOW);
  if ((flags & O_ACCMODE) == O_WRONLY) flags = (flags & ~O_ACCMODE) | O_RDWR;
  return flags | O_CLOEXEC;
}

void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Impl& fs = impl_of(req);
  if (fs.read_only() && (fi->flags & O_ACCMODE) != O_RDONLY) return (void)fuse_reply_err(req, EROFS);
  if (fs.read_only() && (fi->flags & O_TRUNC)) return (void)fuse_reply_err(req, EROFS);
  Inode& inode = inode_of(req, ino);
  int fd = open_inode(fs, inode, backing_open_flags(fi->flags)).release();
  if (fd < 0) return (void)fuse_reply_err(req, errno);
  if (fi->flags & O_TRUNC) {
    // Only reached if the kernel passed O_TRUNC through; it normally sends a setattr instead.
    Record tr;
    tr.op = Op::truncate;
    tr.fid = inode.fid;
    tr.offset = 0;
    Targets t;
    t.fd = fd;
    if (int err = fs.node.submit(tr, t)) {
      close(fd);
      return (void)fuse_reply_err(req, err);
    }
  }
  fi->fh = static_cast<uint64_t>(fd);
  fi->keep_cache = 1;  // nothing but this daemon changes the file while it is mounted
  fi->noflush = (fi->flags & O_ACCMODE) == O_RDONLY;
  if (fuse_reply_open(req, fi) == -ENOENT) close(fd);  // the open was interrupted
}

void op_create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi) {
  if (refuse_if_read_only(req)) return;
  if (is_hidden(parent, name)) return (void)fuse_reply_err(req, EPERM);
  Impl& fs = impl_of(req);
  Inode& dir = inode_of(req, parent);
  Record rec;
  rec.op = Op::create;
  rec.mode = S_IFREG | (mode & 07777);
  rec.parent = dir.fid;
  rec.name = name;
  rec.fid = new_file_id();
  set_new_owner(req, dir, rec);
  Fd dirfd = path_of(fs, dir);
  if (!dirfd) return (void)fuse_reply_err(req, errno);
  Targets t;
  t.parent_fd = dirfd.get();
  int err = fs.node.submit(rec, t);
  const bool created = err == 0;
  if (err == EEXIST && !(fi->flags & O_EXCL)) err = 0;  // lost a race with another creator: open it
  if (err) return (void)fuse_reply_err(req, err);
  OwnedFd fd(openat(dirfd.get(), name, backing_open_flags(fi->flags)));
  fuse_entry_param e;
  if (!fd || (err = do_lookup(fs, parent, name, &e))) {
    if (!fd) err = errno;
    if (created) undo_create(fs, dir, dirfd.get(), name, rec.fid, false);
    return (void)fuse_reply_err(req, err);
  }
  fi->fh = static_cast<uint64_t>(fd.release());
  fi->keep_cache = 1;
  if (fuse_reply_create(req, &e, fi) == -ENOENT) close(static_cast<int>(fi->fh));
}

void op_read(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
  fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
  buf.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
  buf.buf[0].fd = static_cast<int>(fi->fh);
  buf.buf[0].pos = off;
  fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

// The kernel's writeback cache already answered write() for these pages: the error reaches the
// application at fsync() or close(), but the kernel keeps the pages (clean, with data the disk
// does not hold) and keeps the file size the writes gave it (it trusts its own size while
// writeback caching). So the backing file is extended to the end of the failed range (a
// replicated truncate: holes cost no space), and the failed range is dropped from the cache:
// afterwards the mount, the backing file and the replicas agree, the range reading as zeros.
void after_failed_writeback(Impl& fs, Inode& inode, fuse_ino_t ino, const Record& failed, int fd) {
  const uint64_t end = failed.offset + failed.data.size();
  struct stat st;
  if (fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_size) < end) {
    Record grow;
    grow.op = Op::truncate;
    grow.fid = inode.fid;
    grow.offset = end;
    Targets t;
    t.fd = fd;
    if (int err = fs.node.submit(grow, t))
      LOG_WARN("%s: cannot extend to %" PRIu64 " bytes after a failed write: %s", fd_path(fd).c_str(), end, strerror(err));
  }
  fs.defer_invalidation(ino, static_cast<off_t>(failed.offset), static_cast<off_t>(failed.data.size()));
}

void op_write(fuse_req_t req, fuse_ino_t ino, const char* data, size_t size, off_t off, fuse_file_info* fi) {
  if (refuse_if_read_only(req)) return;
  Impl& fs = impl_of(req);
  if (int err = drop_privileges_on_write(fs, inode_of(req, ino), ino)) return (void)fuse_reply_err(req, err);
  Record rec;
  rec.op = Op::write;
  rec.fid = inode_of(req, ino).fid;
  rec.offset = static_cast<uint64_t>(off);
  rec.data = std::string_view(data, size);
  Targets t;
  t.fd = static_cast<int>(fi->fh);
  int err;
  {
    std::lock_guard lk(inode_of(req, ino).write_mu);
    err = fs.node.submit(rec, t);
    if (err && fi->writepage) after_failed_writeback(fs, inode_of(req, ino), ino, rec, t.fd);
  }
  if (err) return (void)fuse_reply_err(req, err);
  fuse_reply_write(req, size);
}

void op_flush(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  // close() of a duplicate gives the backing file system its close-time semantics (and errors).
  int fd = dup(static_cast<int>(fi->fh));
  int err = 0;
  if (fd < 0 || close(fd) != 0) err = errno;
  fuse_reply_err(req, err);
}

void op_release(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  close(static_cast<int>(fi->fh));
  fuse_reply_err(req, 0);
}

// fsync, fdatasync, fsyncdir, syncfs and O_SYNC writes: barriers, always made really durable.
void sync_inode(fuse_req_t req, Inode& inode, int fd, bool datasync) {
  const auto started = Trace::on() ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  Impl& fs = impl_of(req);
  Record rec;
  rec.op = Op::fsync;
  rec.fid = inode.fid;
  rec.flags = datasync ? kDataSync : 0;
  Targets t;
  t.fd = fd;
  Fd ifd;
  if (fd < 0) {  // syncfs, or a file synced without an open handle
    ifd = path_of(fs, inode);
    if (!ifd) return (void)fuse_reply_err(req, errno);
    t.path_fd = ifd.get();
  }
  if (fs.read_only()) {
    // A reader on a replica syncs what the replica holds: that is no change of the volume, so
    // it gets no record (an LSN of its own would collide with the master's next one downstream).
    return (void)fuse_reply_err(req, fs.node.store().apply(rec, t));
  }
  // The reply goes out from whichever thread learns that the slaves hold the barrier (often the
  // one that read their acknowledgement), not from this one woken up to send it.
  fs.node.barrier_async(rec, t, [req, started](int err) {
    fuse_reply_err(req, err);
    if (started != std::chrono::steady_clock::time_point{})
      Trace::add(TraceStage::master_barrier, std::chrono::steady_clock::now() - started);
  });
}

void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi) {
  sync_inode(req, inode_of(req, ino), fi ? static_cast<int>(fi->fh) : -1, datasync != 0);
}

struct DirHandle {
  DIR* dp = nullptr;
  off_t offset = 0;
  dirent* entry = nullptr;
  ~DirHandle() {
    if (dp) closedir(dp);
  }
};

DirHandle* dir_handle(fuse_file_info* fi) { return reinterpret_cast<DirHandle*>(fi->fh); }

void op_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Inode& inode = inode_of(req, ino);
  auto d = std::make_unique<DirHandle>();
  int fd = open_inode(impl_of(req), inode, O_RDONLY | O_DIRECTORY).release();
  if (fd < 0) return (void)fuse_reply_err(req, errno);
  d->dp = fdopendir(fd);
  if (!d->dp) {
    int err = errno;
    close(fd);
    return (void)fuse_reply_err(req, err);
  }
  fi->fh = reinterpret_cast<uint64_t>(d.get());
  fi->keep_cache = 1;
  fi->cache_readdir = 1;
  if (fuse_reply_open(req, fi) == -ENOENT) return;  // unique_ptr frees it
  d.release();
}

void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, fuse_file_info* fi, bool plus) {
  Impl& fs = impl_of(req);
  DirHandle* d = dir_handle(fi);
  std::vector<char> buf(size);
  size_t used = 0;
  int err = 0;
  if (offset != d->offset) {
    seekdir(d->dp, offset);
    d->entry = nullptr;
    d->offset = offset;
  }
  for (;;) {
    if (!d->entry) {
      errno = 0;
      d->entry = readdir(d->dp);
      if (!d->entry) {
        err = errno;  // 0 at the end of the directory
        break;
      }
    }
    const char* name = d->entry->d_name;
    off_t next = d->entry->d_off;
    if (is_hidden(ino, name)) {
      d->entry = nullptr;
      d->offset = next;
      continue;
    }
    size_t n;
    if (plus) {
      fuse_entry_param e{};
      bool dot = !strcmp(name, ".") || !strcmp(name, "..");
      if (dot) {
        e.attr.st_ino = d->entry->d_ino;
        e.attr.st_mode = d->entry->d_type << 12;
      } else if ((err = do_lookup(fs, ino, name, &e))) {
        break;
      }
      n = fuse_add_direntry_plus(req, buf.data() + used, size - used, name, &e, next);
      if (n > size - used) {
        if (!dot) fs.inodes.forget(reinterpret_cast<Inode*>(e.ino), 1);
        break;
      }
    } else {
      struct stat st{};
      st.st_ino = d->entry->d_ino;
      st.st_mode = d->entry->d_type << 12;
      n = fuse_add_direntry(req, buf.data() + used, size - used, name, &st, next);
      if (n > size - used) break;
    }
    used += n;
    d->entry = nullptr;
    d->offset = next;
  }
  // An error after some entries is reported on the next call; the kernel gets what we have.
  if (err && used == 0) fuse_reply_err(req, err);
  else fuse_reply_buf(req, buf.data(), used);
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  do_readdir(req, ino, size, off, fi, false);
}
void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  do_readdir(req, ino, size, off, fi, true);
}

void op_releasedir(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  delete dir_handle(fi);
  fuse_reply_err(req, 0);
}

void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi) {
  int fd = fi ? dirfd(dir_handle(fi)->dp) : -1;
  sync_inode(req, inode_of(req, ino), fd, datasync != 0);
}

void op_statfs(fuse_req_t req, fuse_ino_t ino) {
  struct statvfs sv;
  Fd ifd = path_of(impl_of(req), inode_of(req, ino));
  if (!ifd || fstatvfs(ifd.get(), &sv) != 0) return (void)fuse_reply_err(req, errno);
  fuse_reply_statfs(req, &sv);
}

void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length, fuse_file_info* fi) {
  if (refuse_if_read_only(req)) return;
  Record rec;
  rec.op = Op::fallocate;
  rec.fid = inode_of(req, ino).fid;
  rec.flags = static_cast<uint32_t>(mode);
  rec.offset = static_cast<uint64_t>(offset);
  rec.length = static_cast<uint64_t>(length);
  Targets t;
  t.fd = static_cast<int>(fi->fh);
  fuse_reply_err(req, impl_of(req).node.submit(rec, t));
}

void op_lseek(fuse_req_t req, fuse_ino_t, off_t off, int whence, fuse_file_info* fi) {
  off_t r = lseek(static_cast<int>(fi->fh), off, whence);
  if (r < 0) return (void)fuse_reply_err(req, errno);
  fuse_reply_lseek(req, r);
}

// xattrs go through /proc/self/fd/N, which reaches the inode the O_PATH descriptor holds.
void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  if (is_reserved_xattr(name)) return (void)fuse_reply_err(req, ENODATA);
  Inode& inode = inode_of(req, ino);
  if (inode.type == S_IFLNK) return (void)fuse_reply_err(req, ENODATA);  // user xattrs are not allowed on links
  const bool caps = strcmp(name, kCapsXattr) == 0;
  if (caps && inode.known_no_caps.load(std::memory_order_relaxed)) return (void)fuse_reply_err(req, ENODATA);
  Fd ifd = path_of(impl_of(req), inode);
  if (!ifd) return (void)fuse_reply_err(req, errno);
  std::string p = fd_path(ifd.get());
  if (size == 0) {
    ssize_t n = getxattr(p.c_str(), name, nullptr, 0);
    if (n < 0) {
      if (caps && errno == ENODATA) inode.known_no_caps.store(true, std::memory_order_relaxed);
      return (void)fuse_reply_err(req, errno);
    }
    return (void)fuse_reply_xattr(req, static_cast<size_t>(n));
  }
  std::vector<char> buf(size);
  ssize_t n = getxattr(p.c_str(), name, buf.data(), size);
  if (n < 0) {
    if (caps && errno == ENODATA) inode.known_no_caps.store(true, std::memory_order_relaxed);
    return (void)fuse_reply_err(req, errno);
  }
  fuse_reply_buf(req, buf.data(), static_cast<size_t>(n));
}

void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  Inode& inode = inode_of(req, ino);
  Fd ifd = path_of(impl_of(req), inode);
  if (!ifd) return (void)fuse_reply_err(req, errno);
  std::string p = fd_path(ifd.get());
  std::vector<char> raw;
  ssize_t n = 0;
  if (inode.type != S_IFLNK) {
    for (;;) {
      n = listxattr(p.c_str(), nullptr, 0);
      if (n < 0) return (void)fuse_reply_err(req, errno);
      raw.resize(static_cast<size_t>(n) + 1);
      n = listxattr(p.c_str(), raw.data(), raw.size());
      if (n >= 0) break;
      if (errno != ERANGE) return (void)fuse_reply_err(req, errno);
    }
  }
  std::string out;  // the list without blockrepl's own names
  for (ssize_t i = 0; i < n;) {
    const char* nm = raw.data() + i;
    size_t len = strlen(nm);
    if (!is_reserved_xattr(nm)) out.append(nm, len + 1);
    i += static_cast<ssize_t>(len) + 1;
  }
  if (size == 0) return (void)fuse_reply_xattr(req, out.size());
  if (out.size() > size) return (void)fuse_reply_err(req, ERANGE);
  fuse_reply_buf(req, out.data(), out.size());
}

void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size, int flags) {
  if (refuse_if_read_only(req)) return;
  if (is_reserved_xattr(name)) return (void)fuse_reply_err(req, EPERM);
  Inode& inode = inode_of(req, ino);
  if (inode.type == S_IFLNK) return (void)fuse_reply_err(req, EPERM);
  Record rec;
  if (strcmp(name, kCapsXattr) == 0) inode.known_no_caps.store(false, std::memory_order_relaxed);
  rec.op = Op::setxattr;
  rec.fid = inode.fid;
  rec.name = name;
  rec.data = std::string_view(value, size);
  rec.flags = static_cast<uint32_t>(flags);
  Fd ifd = path_of(impl_of(req), inode);
  if (!ifd) return (void)fuse_reply_err(req, errno);
  Targets t;
  t.path_fd = ifd.get();
  fuse_reply_err(req, impl_of(req).node.submit(rec, t));
}

void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
  if (refuse_if_read_only(req)) return;
  if (is_reserved_xattr(name)) return (void)fuse_reply_err(req, ENODATA);
  Inode& inode = inode_of(req, ino);
  if (inode.type == S_IFLNK) return (void)fuse_reply_err(req, ENODATA);
  Record rec;
  rec.op = Op::removexattr;
  rec.fid = inode.fid;
  rec.name = name;
  Fd ifd = path_of(impl_of(req), inode);
  if (!ifd) return (void)fuse_reply_err(req, errno);
  Targets t;
  t.path_fd = ifd.get();
  fuse_reply_err(req, impl_of(req).node.submit(rec, t));
}

// libfuse 3.14 cannot negotiate FUSE_HANDLE_KILLPRIV_V2, without which the kernel asks for
// security.capability (a full round trip) before every write. Our I/O hook adds the flag to the
// INIT reply, the first message the daemon sends; everything else passes through untouched.
std::atomic<bool> g_init_patched{false};

ssize_t kill_priv_writev(int fd, struct iovec* iov, int count, void*) {
  if (!g_init_patched.load(std::memory_order_acquire) && count >= 2 && iov[0].iov_len == sizeof(fuse_out_header) &&
      iov[1].iov_len >= offsetof(fuse_init_out, flags) + sizeof(uint32_t)) {
    g_init_patched.store(true, std::memory_order_release);
    auto* hdr = static_cast<fuse_out_header*>(iov[0].iov_base);
    if (hdr->error == 0) {
      std::vector<char> arg(static_cast<char*>(iov[1].iov_base), static_cast<char*>(iov[1].iov_base) + iov[1].iov_len);
      auto* init = reinterpret_cast<fuse_init_out*>(arg.data());
      init->flags |= FUSE_HANDLE_KILLPRIV_V2;
      std::vector<struct iovec> copy(iov, iov + count);
      copy[1].iov_base = arg.data();
      return writev(fd, copy.data(), count);
    }
  }
  return writev(fd, iov, count);
}

// Reads one request and notes what libfuse will not tell the handler (see note_request).
ssize_t read_request(int fd, void* buf, size_t len, void*) {
  ssize_t n = read(fd, buf, len);
  note_request(buf, n);
  return n;
}

// Every operation on a replica's mount runs while no stage switch is in progress (see
// CacheInvalidator::hold_readers): it sees the replica before the switch or after it.
template <auto Op>
struct Guarded;
template <typename... Args, void (*Op)(fuse_req_t, Args...)>
struct Guarded<Op> {
  static void call(fuse_req_t req, Args... args) {
    Impl& fs = impl_of(req);
    if (!fs.read_only()) return Op(req, args...);
    std::shared_lock lk(fs.switch_mu);
    Op(req, args...);
  }
};
template <auto Op>
constexpr auto guarded = &Guarded<Op>::call;

fuse_lowlevel_ops make_ops() {
  fuse_lowlevel_ops ops{};
  ops.init = op_init;
  ops.lookup = guarded<op_lookup>;
  ops.forget = guarded<op_forget>;
  ops.forget_multi = guarded<op_forget_multi>;
  ops.getattr = guarded<op_getattr>;
  ops.setattr = guarded<op_setattr>;
  ops.readlink = guarded<op_readlink>;
  ops.mknod = guarded<op_mknod>;
  ops.mkdir = guarded<op_mkdir>;
  ops.symlink = guarded<op_symlink>;
  ops.link = guarded<op_link>;
  ops.unlink = guarded<op_unlink>;
  ops.rmdir = guarded<op_rmdir>;
  ops.rename = guarded<op_rename>;
  ops.open = guarded<op_open>;
  ops.create = guarded<op_create>;
  ops.read = guarded<op_read>;
  ops.write = guarded<op_write>;
  ops.flush = guarded<op_flush>;
  ops.release = guarded<op_release>;
  ops.fsync = guarded<op_fsync>;
  ops.opendir = guarded<op_opendir>;
  ops.readdir = guarded<op_readdir>;
  ops.readdirplus = guarded<op_readdirplus>;
  ops.releasedir = guarded<op_releasedir>;
  ops.fsyncdir = guarded<op_fsyncdir>;
  ops.statfs = guarded<op_statfs>;
  ops.fallocate = guarded<op_fallocate>;
  ops.lseek = guarded<op_lseek>;
  ops.getxattr = guarded<op_getxattr>;
  ops.listxattr = guarded<op_listxattr>;
  ops.setxattr = guarded<op_setxattr>;
  ops.removexattr = guarded<op_removexattr>;
  return ops;
}

// How many dirty pages the kernel lets a FUSE mount gather before it writes them back. Its own
// rule is a strict 1% share of the dirty budget, which depends on the machine (47 MB on 24 GB).
// With no bound (as this daemon set it before) up to the system's 20% (4.6 GB there) gather and
// are written back only at fsync or after 30 s: a 1 GiB sequential write reached the daemon only
// at its final fsync, which waited for all of it to be applied and, on a sync master,
// replicated, after the application's write instead of during it. A strict bound of a fixed size
// makes the kernel write back while the application writes (and slows the writer to the rate
// the daemon takes), so the two overlap and the final fsync waits for at most the bound. Files
// written in small pieces and synced often (databases) never come near it. Measured on the
// 2-core VM (kernel 6.18), a 1 GiB write with its fsync, alternated: the mount alone 608-618
// MiB/s unbounded against 743-793 bounded, a sync pair 370-492 against 448-630, and the final
// fsync 1.2-1.5 s against 0.03-0.06 s (tools/bench/README.md, "The mount's dirty pages").
constexpr uint64_t kMaxDirtyBytes = uint64_t{64} << 20;

// Sets the bound through the mount's backing device info (/sys/class/bdi/MAJOR:MINOR; both files
// since Linux 6.2). Best effort: without them (an older kernel, sysfs read-only in a container)
// the mount works as before, and -v says so.
void bound_dirty_pages(const std::string& mountpoint) {
  const std::optional<MountEntry> mount = find_mount(mountpoint);
  const std::string devno = mount ? mount->devno : "";
  if (devno.empty()) {
    LOG_INFO("%s: not in the mount table; its dirty pages are not bounded", mountpoint.c_str());
    return;
  }
  const std::string dir = "/sys/class/bdi/" + devno + "/";
  auto put = [&](const char* file, const std::string& value) {
    OwnedFd fd(open((dir + file).c_str(), O_WRONLY | O_CLOEXEC));
    if (!fd || write(fd.get(), value.data(), value.size()) != static_cast<ssize_t>(value.size())) {
      LOG_INFO("%s: cannot write %s%s (%s); its dirty pages are not bounded", mountpoint.c_str(), dir.c_str(), file, strerror(errno));
      return false;
    }
    return true;
  };
  if (put("max_bytes", std::to_string(kMaxDirtyBytes))) put("strict_limit", "1");
}

}  // namespace

Filesystem::Filesystem(Node& node, MountConfig cfg) : node_(node), cfg_(std::move(cfg)) {
  impl_ = new Impl(node_, cfg_);
  auto root = std::make_unique<Inode>();
  root->pinned = Fd(OwnedFd(open(node_.data_path().c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC)));
  if (!root->pinned) throw_errno("cannot open data directory " + node_.data_path(), errno);
  struct stat st;
  if (fstat(root->pinned.get(), &st) != 0) throw_errno("cannot stat data directory " + node_.data_path(), errno);
  FileHandle::of(root->pinned.get(), "", &root->handle);
  root->src_dev = st.st_dev;
  root->src_ino = st.st_ino;
  root->type = S_IFDIR;
  root->fid = kRootFileId;
  impl_->inodes.set_root(std::move(root));
  FileRegistry& files = node_.store().files();
  impl_->inodes.set_opener([&files](const FileHandle& h) { return files.open_handle(h, O_PATH); });
}

Filesystem::~Filesystem() {
  if (se_) {
    if (mounted_) fuse_session_unmount(se_);
    fuse_remove_signal_handlers(se_);
    fuse_session_destroy(se_);
  }
  delete impl_;
}

void Filesystem::mount() {
  std::string opts = "allow_other,default_permissions,fsname=blockrepl:" + node_.data_path() + ",subtype=blockrepl";
  std::vector<std::string> argv_s = {"blockrepl", "-o", opts};
  if (cfg_.debug) argv_s.push_back("-d");
  std::vector<char*> argv;
  for (auto& s : argv_s) argv.push_back(s.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  fuse_lowlevel_ops ops = make_ops();
  se_ = fuse_session_new(&args, &ops, sizeof ops, impl_);
  if (!se_) throw Error("cannot create the FUSE session for " + cfg_.mountpoint);
  if (fuse_set_signal_handlers(se_) != 0) throw Error("cannot install signal handlers");
  if (fuse_session_mount(se_, cfg_.mountpoint.c_str()) != 0)
    throw Error("cannot mount " + cfg_.mountpoint + " (is /dev/fuse available and are you root?)");
  mounted_ = true;
  impl_->se = se_;
  bound_dirty_pages(cfg_.mountpoint);
  if (cfg_.writable()) {
    static const fuse_custom_io io = {kill_priv_writev, read_request, nullptr, nullptr};
    g_init_patched = false;
    if (fuse_session_custom_io(se_, &io, fuse_session_fd(se_)) != 0)
      LOG_WARN("cannot hook the FUSE channel; writes will ask for security.capability each time");
  }
}

int Filesystem::serve() {
  fuse_loop_config* lc = fuse_loop_cfg_create();
  fuse_loop_cfg_set_clone_fd(lc, 1);
  fuse_loop_cfg_set_max_threads(lc, cfg_.max_threads);
  fuse_loop_cfg_set_idle_threads(lc, 4);
  int rc = fuse_session_loop_mt(se_, lc);
  fuse_loop_cfg_destroy(lc);
  impl_->stop_deferred();
  impl_->se = nullptr;
  if (mounted_) {
    fuse_session_unmount(se_);
    mounted_ = false;
  }
  return rc < 0 ? 1 : 0;
}

CacheInvalidator* Filesystem::invalidator() { return impl_; }

void Filesystem::stop() {
  if (se_) fuse_session_exit(se_);
}

}  // namespace blockrepl::fs
