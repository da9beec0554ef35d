#include "blockrepl/trace.h"

#include <bit>

namespace blockrepl {

std::atomic<bool> Trace::enabled_{false};
std::array<std::array<std::atomic<uint64_t>, Trace::kBuckets>, static_cast<size_t>(TraceStage::count)> Trace::counts_{};

const char* trace_stage_name(TraceStage s) {
  switch (s) {
    case TraceStage::master_barrier: return "master_barrier";
    case TraceStage::master_apply: return "master_apply";
    case TraceStage::master_flush: return "master_flush";
    case TraceStage::master_wait_slaves: return "master_wait_slaves";
    case TraceStage::master_send: return "master_send";
    case TraceStage::slave_apply: return "slave_apply";
    case TraceStage::slave_flush: return "slave_flush";
    case TraceStage::slave_ack: return "slave_ack";
    case TraceStage::count: break;
  }
  return "?";
}

// Bucket b covers [lower, upper): below 8 ns one bucket per ns; above, 8 per power of two.
unsigned Trace::bucket_of(uint64_t ns) {
  if (ns < kSubBuckets) return static_cast<unsigned>(ns);
  const unsigned top = 63 - static_cast<unsigned>(std::countl_zero(ns));  // ns in [2^top, 2^(top+1))
  const unsigned sub = static_cast<unsigned>((ns >> (top - 3)) & (kSubBuckets - 1));
  const unsigned b = (top - 2) * kSubBuckets + sub;
  return b < kBuckets ? b : kBuckets - 1;
}

uint64_t Trace::bucket_upper_ns(unsigned b) {
  if (b < kSubBuckets) return b + 1;
  const unsigned top = b / kSubBuckets + 2, sub = b % kSubBuckets;
  return (uint64_t{1} << top) + (uint64_t{sub + 1} << (top - 3));
}

void Trace::add(TraceStage s, std::chrono::nanoseconds d) {
  const uint64_t ns = d.count() > 0 ? static_cast<uint64_t>(d.count()) : 0;
  counts_[static_cast<size_t>(s)][bucket_of(ns)].fetch_add(1, std::memory_order_relaxed);
}

std::vector<Trace::StageCounts> Trace::snapshot() {
  std::vector<StageCounts> out;
  for (unsigned s = 0; s < static_cast<unsigned>(TraceStage::count); s++) {
    StageCounts sc;
    sc.name = trace_stage_name(static_cast<TraceStage>(s));
    for (unsigned b = 0; b < kBuckets; b++)
      if (uint64_t n = counts_[s][b].load(std::memory_order_relaxed)) sc.buckets.emplace_back(bucket_upper_ns(b), n);
    if (!sc.buckets.empty()) out.push_back(std::move(sc));
  }
  return out;
}

}  // namespace blockrepl
