// Early writeback of files written sequentially. A large sequential write (a bulk load, a copy,
// a restore, the full copy of an attach) otherwise sits in the page cache until its final fsync,
// which then waits for all of it to reach the disk: the transfer and the disk take turns. Handing
// the written part of such a run to the disk as soon as a window of it is complete makes them
// overlap, so the fsync finds little left to do. Random writers (databases between checkpoints)
// never form a run and are left alone; their pages stay in the cache until their fsync.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "blockrepl/record.h"

namespace blockrepl {

// Finds sequential runs in the writes of one file. The FUSE layer's writeback sends a sequential
// writer's pages as many requests at once (up to max_background), answered by several threads,
// so the writes of a run arrive out of order, up to some tens of MiB apart. A run keeps the
// pieces written ahead of its contiguous prefix and hands out only what is completely written.
class SequentialRun {
 public:
  static constexpr uint64_t kWindow = uint64_t{8} << 20;      // handed out in pieces of at least this
  static constexpr uint64_t kReorder = uint64_t{128} << 20;   // how far ahead a write of the run may land
  static constexpr size_t kMaxPieces = 256;                   // pieces ahead of the prefix, at most

  struct Range {
    uint64_t offset = 0;
    uint64_t length = 0;
  };
  // Notes a write of [offset, offset + length); returns the range now ready to be written back
  // (length 0 if none). Each byte of a run is handed out at most once; a write to what was
  // already handed out rewrites the file and starts a new run there.
  Range wrote(uint64_t offset, uint64_t length);

 private:
  void restart(uint64_t offset, uint64_t end);
  uint64_t handed_ = 0;  // the run's first byte not handed out yet
  uint64_t prefix_ = 0;  // end of the contiguous part written since the run started
  std::map<uint64_t, uint64_t> ahead_;  // start -> end of pieces written past the prefix
};

// Tracks the runs of every file and starts the disk writes of their complete windows from a
// thread of its own (sync_file_range may wait for the device; the writer must not).
class EarlyWriteback {
 public:
  EarlyWriteback() = default;
  ~EarlyWriteback();
  EarlyWriteback(const EarlyWriteback&) = delete;
  EarlyWriteback& operator=(const EarlyWriteback&) = delete;

  // Called after a write of [offset, offset + length) to fd (file fid) succeeded.
  void wrote(FileId fid, int fd, uint64_t offset, uint64_t length);
  // Bytes handed to the disk early so far (for tests and status).
  uint64_t bytes_started() const;
  // Waits until every range handed out so far has been started (tests).
  void drain();

 private:
  struct Job {
    int fd;  // a duplicate, closed once the range is started
    SequentialRun::Range range;
  };
  void run();

  // Runs of more files than this are forgotten (a run costs 16 bytes; this bounds a volume of
  // many files written once each).
  static constexpr size_t kMaxRuns = 4096;
  // Ranges waiting for the thread; past this the writer does not wait, the range is skipped
  // (it reaches the disk at the next fsync or by the kernel's own writeback, as without us).
  static constexpr size_t kMaxQueued = 64;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::unordered_map<FileId, SequentialRun> runs_;
  std::deque<Job> queue_;
  bool busy_ = false;
  bool stop_ = false;
  uint64_t bytes_started_ = 0;
  std::thread thread_;
};

}  // namespace blockrepl
