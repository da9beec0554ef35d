// Room held back on a replica's file system for what a re-attach needs before it can free
// anything: the stage's listings and the replica's own small state files. When the disk fills
// while applying records, the follower gives the reserve up so that the Merkle re-attach that
// removes what the master deleted can begin; once the replica streams again it takes it back.
//
// On disk: <data>/.blockrepl/reserve, a preallocated file of zeros (format: none; version: none;
// deleting it by hand is harmless).
#pragma once
#include <cstdint>
#include <string>

namespace blockrepl {

class SpaceReserve {
 public:
  // meta_fd: the metadata folder (not owned); where: the data directory, for log lines.
  SpaceReserve(int meta_fd, std::string where);
  // Allocates the reserve if it is missing (1% of the file system, from 1 to 64 MiB); best
  // effort: a disk too full to hold it is logged at debug level and tried again next time.
  void hold();
  // Frees the reserve; returns whether there was one.
  bool release();
  static uint64_t size_for(uint64_t fs_bytes);

 private:
  int meta_fd_;
  std::string where_;
};

}  // namespace blockrepl
