// fdatasync of several files at once, through io_uring, for a slave's barrier
// (Follower::make_durable). The fsyncs run concurrently in the kernel's io-wq workers, and the
// block layer merges their cache flushes: on this project's VM (ext4 on virtio, kernel 6.18)
// flushing 4 files with one 4 KiB write each took 363-566 us instead of 840-1740 us one after
// the other (tools/bench/micro/uring_apply_bench.cpp, BM_Flush*; numbers in follower.cpp).
//
// Only the flush goes through io_uring. The writes stay plain pwrite(): buffered writes to ext4
// are not done inline by io_uring on this kernel but handed to worker threads, which costs 2-3
// times the CPU of pwrite() for 4 KiB and gains nothing in time.
//
// Without io_uring (kernel.io_uring_disabled, an old kernel, a seccomp filter, no locked
// memory) every file is synced with fdatasync() in turn, as before; this is logged once at -v.
#pragma once
#include <liburing.h>

#include <cstddef>
#include <vector>

namespace blockrepl {

class ConcurrentSync {
 public:
  // use_uring = false: always the plain fallback (tests compare both paths).
  explicit ConcurrentSync(bool use_uring = true);
  ~ConcurrentSync();
  ConcurrentSync(const ConcurrentSync&) = delete;
  ConcurrentSync& operator=(const ConcurrentSync&) = delete;

  // fdatasync() of every descriptor, concurrently when io_uring works. Every file is synced
  // even if one fails (as the loop of fdatasync calls it replaces did not: a sync that is not
  // needed costs nothing once the first failed). Returns 0, or the errno of the first failure
  // in `fds` order with its index in *failed.
  int fdatasync_all(const std::vector<int>& fds, size_t* failed = nullptr);

  // Whether fdatasync_all uses io_uring (false after a failure of the ring itself).
  bool uses_uring() const { return ring_ok_; }

  // Entries submitted at once; more descriptors go in rounds of this many.
  static constexpr unsigned kDepth = 64;

 private:
  int plain(const std::vector<int>& fds, size_t from, size_t to, size_t* failed);
  // One round through the ring: fds[from, to), *err/*failed as fdatasync_all. Returns 0, or the
  // errno of a failure of the ring itself (the caller then syncs the round plainly).
  int round(const std::vector<int>& fds, size_t from, size_t to, int* err, size_t* failed);
  void give_up(const char* what, int err);

  io_uring ring_{};
  bool ring_ok_ = false;
};

}  // namespace blockrepl
