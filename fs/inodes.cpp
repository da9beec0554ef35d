#include "fs/inodes.h"

#include <sys/stat.h>
#include <unistd.h>

namespace blockrepl::fs {

Inode::~Inode() {
  if (fd >= 0) close(fd);
}

Inode* InodeTable::acquire(int fd, const struct stat& st, bool* fresh) {
  std::lock_guard lk(mu_);
  if (root_ && root_->src_ino == st.st_ino && root_->src_dev == st.st_dev) {
    close(fd);
    *fresh = false;
    return root_.get();  // the root is never forgotten; its count does not matter
  }
  auto key = std::make_pair(st.st_dev, st.st_ino);
  auto it = inodes_.find(key);
  if (it != inodes_.end()) {
    close(fd);
    it->second->nlookup++;
    *fresh = false;
    return it->second.get();
  }
  auto inode = std::make_unique<Inode>();
  inode->fd = fd;
  inode->src_dev = st.st_dev;
  inode->src_ino = st.st_ino;
  inode->type = st.st_mode & S_IFMT;
  inode->mode = st.st_mode;
  inode->nlookup = 1;
  Inode* raw = inode.get();
  inodes_.emplace(key, std::move(inode));
  *fresh = true;
  return raw;
}

FileId InodeTable::forget(Inode* inode, uint64_t n) {
  if (inode == root_.get()) return kInvalidFileId;
  std::lock_guard lk(mu_);
  if (inode->nlookup > n) {
    inode->nlookup -= n;
    return kInvalidFileId;
  }
  struct stat st;
  const FileId nameless = inode->type == S_IFREG && fstat(inode->fd, &st) == 0 && st.st_nlink == 0 ? inode->fid.load()
                                                                                                    : kInvalidFileId;
  inodes_.erase(std::make_pair(inode->src_dev, inode->src_ino));
  return nameless;
}

Inode* InodeTable::find(dev_t dev, ino_t ino) {
  std::lock_guard lk(mu_);
  if (root_ && root_->src_ino == ino && root_->src_dev == dev) return root_.get();
  auto it = inodes_.find(std::make_pair(dev, ino));
  return it == inodes_.end() ? nullptr : it->second.get();
}

size_t InodeTable::size() {
  std::lock_guard lk(mu_);
  return inodes_.size();
}

std::vector<Inode*> InodeTable::all() {
  std::lock_guard lk(mu_);
  std::vector<Inode*> out;
  out.reserve(inodes_.size());
  for (auto& [key, inode] : inodes_) out.push_back(inode.get());
  return out;
}

}  // namespace blockrepl::fs
