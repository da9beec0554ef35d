// A backing directory with its metadata folder, a Store and a HashIndex, as a node has them:
// the set-up the Merkle, sparse-file and POSIX-record unit tests share. Each test adds the
// record helpers it needs in a struct derived from this one.
#pragma once
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "blockrepl/file_id.h"
#include "blockrepl/hash_index.h"
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
};

}  // namespace blockrepl
