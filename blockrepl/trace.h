// Where a barrier's time goes (the "anatomy" of issue 14): latency histograms of the stages a
// barrier passes through, kept by a daemon started with --trace and shown by `status --json`
// under "trace". Off, a stage costs one relaxed load. Each daemon sees its own stages: the master
// the FUSE request, its local apply and flush and the wait for its slaves; a slave what it does
// with a batch. The wait for slaves minus the slave's stages is the network and the hand-offs.
#pragma once
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace blockrepl {

enum class TraceStage : unsigned {
  master_barrier,     // fsync/fdatasync/fsyncdir/syncfs/O_SYNC on the mount: request to reply
  master_apply,       // Store::apply of one change on the master (pwrite, hashing, its log)
  master_flush,       // the master's own fsync at a barrier
  master_wait_slaves, // from the local flush to the slaves' acknowledgement the ack level needs
  master_send,        // encoding and writing one batch to a slave's socket
  slave_apply,        // applying one batch's records on a slave (its flush not included)
  slave_flush,        // a slave making a barrier durable (fdatasync of the files, or syncfs)
  slave_ack,          // a slave sending its acknowledgement
  count
};
const char* trace_stage_name(TraceStage s);

class Trace {
 public:
  // Buckets: 8 per power of two of nanoseconds, up to 2^36 ns (about 69 s).
  static constexpr unsigned kSubBuckets = 8;
  static constexpr unsigned kBuckets = 37 * kSubBuckets;

  static bool on() { return enabled_.load(std::memory_order_relaxed); }
  static void enable() { enabled_.store(true, std::memory_order_relaxed); }
  static void add(TraceStage s, std::chrono::nanoseconds d);
  // Per stage that has samples: its name and (bucket upper bound in ns, count) for each
  // non-empty bucket. Cumulative since the start: a reader takes the difference of two.
  struct StageCounts {
    std::string name;
    std::vector<std::pair<uint64_t, uint64_t>> buckets;
  };
  static std::vector<StageCounts> snapshot();
  static uint64_t bucket_upper_ns(unsigned bucket);
  static unsigned bucket_of(uint64_t ns);

 private:
  static std::atomic<bool> enabled_;
  static std::array<std::array<std::atomic<uint64_t>, kBuckets>, static_cast<size_t>(TraceStage::count)> counts_;
};

// Times a scope into a stage when tracing is on.
class TraceTimer {
 public:
  explicit TraceTimer(TraceStage s) : stage_(s), on_(Trace::on()) {
    if (on_) start_ = std::chrono::steady_clock::now();
  }
  ~TraceTimer() {
    if (on_) Trace::add(stage_, std::chrono::steady_clock::now() - start_);
  }
  TraceTimer(const TraceTimer&) = delete;
  TraceTimer& operator=(const TraceTimer&) = delete;

 private:
  TraceStage stage_;
  bool on_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace blockrepl
