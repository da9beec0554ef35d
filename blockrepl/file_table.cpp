#include "blockrepl/file_table.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blockrepl/file_id.h"
#include "blockrepl/log.h"
#include "blockrepl/metadata.h"

namespace blockrepl {

FileTable::FileTable(int root_fd) : root_fd_(root_fd) {
  int fd = openat(root_fd, ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) entries_[kRootFileId].path_fd = fd;
}

FileTable::~FileTable() {
  for (auto& [fid, e] : entries_) close_entry(e);
}

void FileTable::close_entry(Entry& e) {
  if (e.rw_fd >= 0) close(e.rw_fd);
  if (e.path_fd >= 0) close(e.path_fd);
  e.rw_fd = e.path_fd = -1;
}

void FileTable::clear() {
  std::lock_guard lk(mu_);
  for (auto& [fid, e] : entries_) close_entry(e);
  entries_.clear();
  orphans_.clear();
  rw_open_.clear();
  // The root is always known (records name it as the parent of top-level entries).
  int fd = openat(root_fd_, ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) entries_[kRootFileId].path_fd = fd;
}

size_t FileTable::scan() { return scan_dir(root_fd_, 0); }

size_t FileTable::scan_dir(int dirfd, int depth) {
  int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return 0;
  DIR* d = fdopendir(fd);
  if (!d) {
    close(fd);
    return 0;
  }
  size_t n = 0;
  while (dirent* de = readdir(d)) {
    const char* name = de->d_name;
    if (!strcmp(name, ".") || !strcmp(name, "..")) continue;
    if (depth == 0 && !strcmp(name, kMetadataDirName)) continue;
    auto fid = read_file_id(dirfd, name);
    if (!fid) {
      LOG_DEBUG("scan: %s has no file id; ignored", name);
      continue;
    }
    if (add(*fid, dirfd, name) == 0) n++;
    if (de->d_type == DT_DIR) {
      int sub = openat(dirfd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (sub >= 0) {
        n += scan_dir(sub, depth + 1);
        close(sub);
      }
    }
  }
  closedir(d);
  return n;
}

int FileTable::path_fd(FileId fid) {
  std::lock_guard lk(mu_);
  auto it = entries_.find(fid);
  return it == entries_.end() ? -1 : it->second.path_fd;
}

int FileTable::rw_fd(FileId fid) {
  std::lock_guard lk(mu_);
  auto it = entries_.find(fid);
  if (it == entries_.end()) {
    errno = ENOENT;
    return -1;
  }
  Entry& e = it->second;
  if (e.rw_fd >= 0) return e.rw_fd;
  // Data records only ever change regular files: never let a record write into a device node.
  struct stat st;
  if (fstat(e.path_fd, &st) != 0) return -1;
  if (!S_ISREG(st.st_mode)) {
    errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
    return -1;
  }
  e.rw_fd = open(fd_path(e.path_fd).c_str(), O_RDWR | O_CLOEXEC);
  if (e.rw_fd < 0) return -1;
  rw_open_.push_back(fid);
  // Bound the number of open descriptors: close the oldest rw descriptors (they reopen on use).
  while (rw_open_.size() > kMaxOpenRw) {
    FileId old = rw_open_.front();
    rw_open_.pop_front();
    auto o = entries_.find(old);
    if (o != entries_.end() && o->second.rw_fd >= 0 && old != fid) {
      close(o->second.rw_fd);
      o->second.rw_fd = -1;
    }
  }
  return e.rw_fd;
}

int FileTable::add(FileId fid, int dirfd, const char* name) {
  int fd = openat(dirfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno;
  std::lock_guard lk(mu_);
  Entry& e = entries_[fid];
  if (e.path_fd >= 0) {
    // Already known (another hard link, or re-learnt): keep the old descriptor if it is the
    // same inode, otherwise the id moved to a new inode (e.g. after a resync).
    struct stat a, b;
    if (fstat(e.path_fd, &a) == 0 && fstat(fd, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev) {
      close(fd);
      return 0;
    }
    close_entry(e);
  }
  e.path_fd = fd;
  return 0;
}

void FileTable::maybe_orphaned(FileId fid) {
  std::lock_guard lk(mu_);
  auto it = entries_.find(fid);
  if (it == entries_.end()) return;
  struct stat st;
  if (fstat(it->second.path_fd, &st) == 0 && (st.st_nlink > 0 && !S_ISDIR(st.st_mode))) return;
  orphans_.push_back(fid);
  while (orphans_.size() > kMaxOrphans) {
    auto o = entries_.find(orphans_.front());
    orphans_.pop_front();
    if (o != entries_.end()) {
      struct stat st2;
      // Only evict entries that are still nameless (a later link may have revived them).
      if (fstat(o->second.path_fd, &st2) != 0 || st2.st_nlink == 0 || S_ISDIR(st2.st_mode)) {
        close_entry(o->second);
        entries_.erase(o);
      }
    }
  }
}

void FileTable::release(FileId fid) {
  std::lock_guard lk(mu_);
  auto it = entries_.find(fid);
  if (it == entries_.end()) return;
  struct stat st;
  if (fstat(it->second.path_fd, &st) == 0 && (st.st_nlink > 0 || S_ISDIR(st.st_mode))) return;
  close_entry(it->second);
  entries_.erase(it);  // its place in orphans_ is skipped when it comes up
}

void FileTable::forget(FileId fid) {
  std::lock_guard lk(mu_);
  auto it = entries_.find(fid);
  if (it == entries_.end()) return;
  close_entry(it->second);
  entries_.erase(it);
}

size_t FileTable::size() const {
  std::lock_guard lk(mu_);
  return entries_.size();
}

}  // namespace blockrepl
