#include "blockrepl/files.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/log.h"
#include "blockrepl/metadata.h"

namespace blockrepl {

namespace {

constexpr unsigned kMaxHandleBytes = 128;  // MAX_HANDLE_SZ

struct HandleBuffer {
  alignas(file_handle) unsigned char raw[sizeof(file_handle) + kMaxHandleBytes];
  file_handle* get() { return reinterpret_cast<file_handle*>(raw); }
};

}  // namespace

int FileHandle::of(int dirfd, const char* name, FileHandle* out) {
  HandleBuffer buf;
  file_handle* fh = buf.get();
  fh->handle_bytes = kMaxHandleBytes;
  int mount_id = 0;
  if (name_to_handle_at(dirfd, name, fh, &mount_id, *name ? 0 : AT_EMPTY_PATH) != 0) return errno;
  out->type = fh->handle_type;
  out->bytes.assign(reinterpret_cast<const char*>(fh->f_handle), fh->handle_bytes);
  return 0;
}

FileRegistry::FileRegistry(int root_fd, size_t budget) : root_fd_(root_fd), budget_(budget) {
  // open_by_handle_at wants a real descriptor on the file system, not an O_PATH one.
  mount_fd_.reset(open(fd_path(root_fd).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!mount_fd_) throw_errno("cannot open the backing directory " + fd_path(root_fd), errno);
  FileHandle root;
  if (int err = FileHandle::of(root_fd, "", &root)) {
    char buf[4096];
    ssize_t n = readlink(fd_path(root_fd).c_str(), buf, sizeof buf - 1);
    const std::string where = n > 0 ? std::string(buf, static_cast<size_t>(n)) : fd_path(root_fd);
    throw Error("the file system of " + where + " cannot give file handles (" + strerror(err) +
                    "): blockrepl reaches files by handle so that their number is not bounded by descriptors; "
                    "use a file system that can (ext4, xfs, btrfs, tmpfs)",
                err);
  }
  clear();
}

FileRegistry::~FileRegistry() = default;

void FileRegistry::clear() {
  std::lock_guard lk(mu_);
  entries_.clear();
  lru_.clear();
  cached_ = 0;
  orphans_.clear();
  // The root is always known (records name it as the parent of top-level entries) and held.
  Entry& root = entries_[kRootFileId];
  FileHandle::of(root_fd_, "", &root.handle);
  root.path = Fd(OwnedFd(openat(root_fd_, ".", O_PATH | O_DIRECTORY | O_CLOEXEC)));
}

void FileRegistry::set_budget(size_t n) {
  std::lock_guard lk(mu_);
  budget_ = n;
  trim();
}

FileRegistry::Entry* FileRegistry::find(FileId fid) {
  auto it = entries_.find(fid);
  return it == entries_.end() ? nullptr : &it->second;
}

void FileRegistry::touch(FileId fid, Entry& e) {
  if (e.orphan || fid == kRootFileId) return;  // pinned, outside the cache
  if (e.cached) {
    lru_.splice(lru_.begin(), lru_, e.lru);
    return;
  }
  lru_.push_front(fid);
  e.lru = lru_.begin();
  e.cached = true;
  cached_ += descriptors_of(e);
}

void FileRegistry::uncache(Entry& e) {
  if (!e.cached) return;
  cached_ -= descriptors_of(e);
  lru_.erase(e.lru);
  e.cached = false;
}

void FileRegistry::erase(FileId fid) {
  auto it = entries_.find(fid);
  if (it == entries_.end() || fid == kRootFileId) return;
  uncache(it->second);
  entries_.erase(it);  // a place in orphans_ is skipped when it comes up
}

void FileRegistry::trim() {
  while (cached_ > budget_ && !lru_.empty()) {
    const FileId victim = lru_.back();
    Entry& e = entries_.at(victim);
    uncache(e);
    e.path = Fd();
    e.rw = Fd();
  }
}

Fd FileRegistry::open_path(FileId fid, Entry& e) {
  if (e.path) return e.path;
  if (e.handle.empty()) {
    errno = ENOENT;
    return Fd();
  }
  Fd fd = open_handle(e.handle, O_PATH);
  if (!fd) {
    const int err = errno;
    if (err == ENOENT) erase(fid);  // the inode is gone
    errno = err;
    return fd;
  }
  set_descriptor(e, e.path, fd);
  return fd;
}

Fd FileRegistry::path(FileId fid) {
  std::lock_guard lk(mu_);
  Entry* e = find(fid);
  if (!e) {
    errno = ENOENT;
    return Fd();
  }
  Fd fd = open_path(fid, *e);
  if (!fd) return fd;
  touch(fid, *e);
  trim();
  return fd;
}

Fd FileRegistry::rw(FileId fid) {
  std::lock_guard lk(mu_);
  Entry* e = find(fid);
  if (!e) {
    errno = ENOENT;
    return Fd();
  }
  if (!e->rw) {
    Fd p = open_path(fid, *e);
    if (!p) return p;
    // Data records only ever change regular files: never let a record write into a device node.
    struct stat st;
    if (fstat(p.get(), &st) != 0) return Fd();
    if (!S_ISREG(st.st_mode)) {
      errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
      return Fd();
    }
    Fd fd(OwnedFd(open(fd_path(p.get()).c_str(), O_RDWR | O_CLOEXEC)));
    if (!fd) return fd;
    set_descriptor(*e, e->rw, fd);
  }
  Fd out = e->rw;
  touch(fid, *e);
  trim();
  return out;
}

Fd FileRegistry::open_handle(const FileHandle& h, int flags) {
  OwnedFd fd = open_owned(h, flags);
  if (!fd) return Fd();
  return Fd(std::move(fd));
}

OwnedFd FileRegistry::open_owned(const FileHandle& h, int flags) {
  if (h.empty() || h.bytes.size() > kMaxHandleBytes) {
    errno = ENOENT;
    return OwnedFd();
  }
  HandleBuffer buf;
  file_handle* fh = buf.get();
  fh->handle_type = h.type;
  fh->handle_bytes = static_cast<unsigned>(h.bytes.size());
  memcpy(fh->f_handle, h.bytes.data(), h.bytes.size());
  OwnedFd fd(open_by_handle_at(mount_fd_.get(), fh, flags | O_CLOEXEC));
  if (!fd && errno == ESTALE) errno = ENOENT;  // the inode is gone
  return fd;
}

int FileRegistry::add(FileId fid, int dirfd, const char* name) {
  FileHandle h;
  if (int err = FileHandle::of(dirfd, name, &h)) return err;
  std::lock_guard lk(mu_);
  learn(entries_[fid], std::move(h));
  return 0;
}

void FileRegistry::learn(Entry& e, FileHandle h) {
  if (e.handle == h) return;
  // New, or the id moved to another inode (a resync replaced the file): forget the old one.
  uncache(e);
  e.path = Fd();
  e.rw = Fd();
  e.orphan = false;
  e.handle = std::move(h);
}

void FileRegistry::set_descriptor(Entry& e, Fd& slot, Fd fd) {
  if (e.cached) cached_ -= descriptors_of(e);
  slot = std::move(fd);
  if (e.cached) cached_ += descriptors_of(e);
}

int FileRegistry::add_fd(FileId fid, Fd fd) {
  FileHandle h;
  if (int err = FileHandle::of(fd.get(), "", &h)) return err;
  const bool is_path = (fcntl(fd.get(), F_GETFL) & O_PATH) != 0;
  std::lock_guard lk(mu_);
  Entry& e = entries_[fid];
  learn(e, std::move(h));
  if (is_path && !e.path) {
    set_descriptor(e, e.path, std::move(fd));
    touch(fid, e);
    trim();
  }
  return 0;
}

FileHandle FileRegistry::handle(FileId fid) {
  std::lock_guard lk(mu_);
  Entry* e = find(fid);
  return e ? e->handle : FileHandle{};
}

void FileRegistry::maybe_orphaned(FileId fid, bool pin, Fd held) {
  std::lock_guard lk(mu_);
  Entry* e = find(fid);
  if (!e || fid == kRootFileId || e->orphan) return;
  // A descriptor taken before the name went away is what keeps an inode nobody else holds open
  // alive: without it the inode is gone already and could not be pinned.
  if (pin && held && !e->path) set_descriptor(*e, e->path, held);
  if (!pin) {
    // Whether or not a name is left, dropping the cached descriptors is right: they reopen by
    // handle if it is, and the space comes back once its users close it if it is not. No need
    // to open it to find out (this runs for every unlink on a master).
    uncache(*e);
    e->path = Fd();
    e->rw = Fd();
    return;
  }
  Fd p = open_path(fid, *e);
  if (!p) return;  // gone already
  struct stat st;
  if (fstat(p.get(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    if (st.st_nlink == 0) erase(fid);  // a removed directory is never named again
    return;
  }
  if (st.st_nlink > 0) return;
  p = Fd();
  uncache(*e);
  if (!pin) {
    e->path = Fd();
    e->rw = Fd();
    return;
  }
  // A file unlinked while open may still be written through handles open on the master: pin
  // it, since its handle stops opening once nothing holds the inode.
  e->orphan = true;
  orphans_.push_back(fid);
  while (orphans_.size() > kMaxOrphans) {
    const FileId old = orphans_.front();
    orphans_.pop_front();
    Entry* o = find(old);
    if (!o || !o->orphan) continue;
    struct stat st2;
    // Only let go of entries that are still nameless (a later link may have revived them).
    if (!o->path || fstat(o->path.get(), &st2) != 0 || st2.st_nlink == 0) erase(old);
  }
}

void FileRegistry::release(FileId fid) {
  std::lock_guard lk(mu_);
  Entry* e = find(fid);
  if (!e || fid == kRootFileId) return;
  Fd p = open_path(fid, *e);
  if (!p) return;
  struct stat st;
  if (fstat(p.get(), &st) == 0 && (st.st_nlink > 0 || S_ISDIR(st.st_mode))) {
    if (e->orphan) {  // revived by a link meanwhile: an ordinary cached file again
      e->orphan = false;
      touch(fid, *e);
      trim();
    }
    return;
  }
  erase(fid);
}

void FileRegistry::forget(FileId fid) {
  std::lock_guard lk(mu_);
  erase(fid);
}

size_t FileRegistry::size() const {
  std::lock_guard lk(mu_);
  return entries_.size();
}

size_t FileRegistry::cached_descriptors() const {
  std::lock_guard lk(mu_);
  return cached_;
}

size_t FileRegistry::pinned_orphans() const {
  std::lock_guard lk(mu_);
  size_t n = 0;
  for (auto& [fid, e] : entries_) n += e.orphan;
  return n;
}

size_t FileRegistry::scan() { return scan_dir(root_fd_, 0); }

size_t FileRegistry::scan_dir(int dirfd, int depth) {
  size_t n = 0;
  std::vector<std::string> subdirs;
  for (const DirEntry& de : list_dir(dirfd, depth == 0).entries) {
    const char* name = de.name.c_str();
    auto fid = read_file_id(dirfd, name);
    if (!fid) {
      LOG_DEBUG("scan: %s has no file id; ignored", name);
      continue;
    }
    if (add(*fid, dirfd, name) == 0) n++;
    if (de.is_dir()) subdirs.push_back(de.name);
  }
  // Subdirectories after the listing is closed: at most one descriptor per level is open.
  for (const std::string& name : subdirs) {
    OwnedFd sub(openat(dirfd, name.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (sub) n += scan_dir(sub.get(), depth + 1);
  }
  return n;
}

}  // namespace blockrepl
