// The barrier-stage histograms (trace.h): a duration lands in a bucket whose bounds hold it, and
// the buckets' bounds grow by at most 1/8 from one to the next (the percentiles' precision).
#include <gtest/gtest.h>

#include "blockrepl/trace.h"

namespace blockrepl {
namespace {

TEST(Trace, EveryDurationLandsInABucketThatHoldsIt) {
  for (uint64_t ns : {uint64_t{0}, uint64_t{1}, uint64_t{7}, uint64_t{8}, uint64_t{9}, uint64_t{15}, uint64_t{16}, uint64_t{1000},
                      uint64_t{46'000}, uint64_t{210'000}, uint64_t{999'999'999}, uint64_t{60'000'000'000}}) {
    const unsigned b = Trace::bucket_of(ns);
    ASSERT_LT(b, Trace::kBuckets);
    EXPECT_LT(ns, Trace::bucket_upper_ns(b)) << ns;
    if (b > 0) EXPECT_GE(ns, Trace::bucket_upper_ns(b - 1)) << ns;
  }
  for (unsigned b = Trace::kSubBuckets; b + 1 < Trace::kBuckets; b++) {
    const double lo = static_cast<double>(Trace::bucket_upper_ns(b)), hi = static_cast<double>(Trace::bucket_upper_ns(b + 1));
    EXPECT_GT(hi, lo);
    EXPECT_LE(hi / lo, 1.0 + 1.0 / 8 + 1e-9) << b;
  }
}

TEST(Trace, SamplesAreCountedPerStageOnlyWhenOn) {
  const auto count = [](const char* name) {
    uint64_t n = 0;
    for (auto& s : Trace::snapshot())
      if (s.name == name)
        for (auto& [upper, c] : s.buckets) n += c;
    return n;
  };
  const uint64_t before = count("slave_ack");
  Trace::add(TraceStage::slave_ack, std::chrono::microseconds(50));
  EXPECT_EQ(count("slave_ack"), before + 1);
  Trace::enable();
  { TraceTimer t(TraceStage::slave_ack); }
  EXPECT_EQ(count("slave_ack"), before + 2);
}

}  // namespace
}  // namespace blockrepl
