// A backing directory with its metadata folder, a Store and a HashIndex, as a node has them:
// the set-up the Merkle, sparse-file and POSIX-record unit tests share. Each test adds the
// record helpers it needs in a struct derived from this one.
#pragma once
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <memory>
#include <stdexcept>

#include <gtest/gtest.h>
#include <string>

#include "blockrepl/file_id.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/hash_tree.h"
#include "blockrepl/metadata.h"
#include "blockrepl/store.h"
#include "temp_dir.h"

namespace blockrepl {

struct HashedVolume {
  TempDir dir;
  int root_fd = -1, meta_fd = -1;
  uint32_t block_size;
  std::unique_ptr<Store> store;
  std::unique_ptr<HashIndex> hashes;
  Lsn lsn = 0;

  explicit HashedVolume(uint32_t bs = 4096) : block_size(bs) {
    mkdir((dir.path + "/" + kMetadataDirName).c_str(), 0700);
    root_fd = open(dir.path.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    meta_fd = open((dir.path + "/" + kMetadataDirName).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (write_file_id(root_fd, "", kRootFileId) != 0) throw std::runtime_error("cannot tag " + dir.path);
    store = std::make_unique<Store>(root_fd, true);
    open_hashes();
  }
  ~HashedVolume() {
    if (store) store->set_hashes(nullptr);
    hashes.reset();
    store.reset();
    close(meta_fd);
    close(root_fd);
  }
  HashedVolume(const HashedVolume&) = delete;
  HashedVolume& operator=(const HashedVolume&) = delete;

  void open_hashes() {
    hashes = std::make_unique<HashIndex>(store->files(), root_fd, meta_fd, dir.path, block_size, /*durable=*/false);
    store->set_hashes(hashes.get());
  }
  // Drops the index without saving (as SIGKILL would), then opens it again: it recovers from
  // the dirty-region log.
  void crash_hashes() {
    store->set_hashes(nullptr);
    hashes.reset();
    open_hashes();
  }
  std::string path(const std::string& rel) const { return dir.path + "/" + rel; }
  // Applies a record with the next LSN, as a replica would.
  int apply(Record r) {
    r.lsn = ++lsn;
    return store->apply(r);
  }
  // A new regular file at the root; its id.
  FileId create(const std::string& name) {
    Record r;
    r.op = Op::create;
    r.parent = kRootFileId;
    r.name = name;
    r.fid = new_file_id();
    r.mode = S_IFREG | 0644;
    EXPECT_EQ(apply(r), 0) << name;
    return r.fid;
  }
  // The root of a tree built afresh from the file's data, to compare the index's with.
  Hash128 fresh_root(const std::string& rel) const {
    int fd = open(path(rel).c_str(), O_RDONLY | O_CLOEXEC);
    struct stat st;
    fstat(fd, &st);
    FileHashTree t(block_size);
    t.build(fd, static_cast<uint64_t>(st.st_size));
    close(fd);
    return t.root();
  }
  // The root the index keeps for fid (built or refreshed as needed).
  Hash128 index_root(FileId fid, const std::string& rel) {
    int fd = open(path(rel).c_str(), O_RDONLY | O_CLOEXEC);
    Hash128 h = hashes->root(fid, fd);
    close(fd);
    return h;
  }
};

}  // namespace blockrepl
