#include "fs/inodes.h"

#include <sys/stat.h>
#include <unistd.h>

namespace blockrepl::fs {

InodeTable::Key InodeTable::key_of(dev_t dev, const FileHandle& h) {
  return {dev, std::to_string(h.type) + ":" + h.bytes};
}

Inode* InodeTable::acquire(const FileHandle& handle, const struct stat& st, bool* fresh) {
  std::lock_guard lk(mu_);
  if (root_ && root_->src_ino == st.st_ino && root_->src_dev == st.st_dev) {
    *fresh = false;
    return root_.get();  // the root is never forgotten; its count does not matter
  }
  auto key = key_of(st.st_dev, handle);
  auto it = inodes_.find(key);
  if (it != inodes_.end()) {
    it->second->nlookup++;
    *fresh = false;
    return it->second.get();
  }
  auto inode = std::make_unique<Inode>();
  inode->handle = handle;
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
  FileId nameless = kInvalidFileId;
  if (inode->type == S_IFREG) {
    // A handle of an inode nobody holds any more no longer opens (ESTALE): that, too, is nameless.
    Fd fd = opener_ ? opener_(inode->handle) : Fd();
    struct stat st;
    if (!fd || (fstat(fd.get(), &st) == 0 && st.st_nlink == 0)) nameless = inode->fid.load();
  }
  if (auto f = by_fid_.find(inode->fid.load()); f != by_fid_.end() && f->second == inode) by_fid_.erase(f);
  inodes_.erase(key_of(inode->src_dev, inode->handle));
  return nameless;
}


void InodeTable::set_fid(Inode* inode, FileId fid) {
  std::lock_guard lk(mu_);
  inode->fid.store(fid, std::memory_order_relaxed);
  if (fid != kInvalidFileId) by_fid_[fid] = inode;
}

Inode* InodeTable::find_fid(FileId fid) {
  std::lock_guard lk(mu_);
  auto it = by_fid_.find(fid);
  return it == by_fid_.end() ? nullptr : it->second;
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
