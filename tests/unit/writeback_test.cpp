// Early writeback: which writes form a sequential run, and that a run's windows really are
// handed to the disk (on a real file) while random writers are left alone.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "blockrepl/writeback.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

constexpr uint64_t MiB = uint64_t{1} << 20;

// Feeds writes to a run and records what it handed out, checking that no byte of one pass over
// the file is handed out twice.
struct RunRecorder {
  SequentialRun run;
  std::vector<SequentialRun::Range> out;
  uint64_t handed = 0;
  void write(uint64_t off, uint64_t len) {
    SequentialRun::Range r = run.wrote(off, len);
    if (r.length == 0) return;
    for (auto& o : out) EXPECT_TRUE(r.offset >= o.offset + o.length || r.offset + r.length <= o.offset);
    out.push_back(r);
    handed += r.length;
  }
};

TEST(SequentialRun, InOrderWritesAreHandedOutInContiguousWindows) {
  RunRecorder rec;
  for (uint64_t off = 0; off < 64 * MiB; off += MiB) rec.write(off, MiB);
  ASSERT_FALSE(rec.out.empty());
  EXPECT_EQ(rec.out.front().offset, 0u);
  for (size_t i = 1; i < rec.out.size(); i++)
    EXPECT_EQ(rec.out[i].offset, rec.out[i - 1].offset + rec.out[i - 1].length);  // contiguous
  for (auto& r : rec.out) EXPECT_GE(r.length, SequentialRun::kWindow);
  EXPECT_GE(rec.handed, 64 * MiB - SequentialRun::kWindow);  // all but an unfinished window
  EXPECT_LE(rec.handed, 64 * MiB);
}

TEST(SequentialRun, ToleratesWritesReorderedAsFuseWritebackSendsThem) {
  // 1 MiB requests of a sequential writer, answered in shuffled order within groups of 24, as
  // many FUSE threads answering up to max_background requests do (seen: 10 MiB apart).
  RunRecorder rec;
  std::mt19937_64 rng(11);
  const uint64_t total = 240 * MiB;
  for (uint64_t group = 0; group < total; group += 24 * MiB) {
    std::vector<uint64_t> offs;
    for (uint64_t off = group; off < group + 24 * MiB; off += MiB) offs.push_back(off);
    std::shuffle(offs.begin(), offs.end(), rng);
    for (uint64_t off : offs) rec.write(off, MiB);
  }
  EXPECT_GE(rec.handed, total - SequentialRun::kWindow);
}

TEST(SequentialRun, HandsOutOnlyWhatIsCompletelyWritten) {
  RunRecorder rec;
  for (uint64_t off = 0; off < 20 * MiB; off += MiB)
    if (off != 8 * MiB) rec.write(off, MiB);  // a gap at 8 MiB
  for (auto& r : rec.out) EXPECT_LE(r.offset + r.length, 8 * MiB) << "a range with an unwritten gap was handed out";
  EXPECT_EQ(rec.handed, 8 * MiB);
  rec.write(8 * MiB, MiB);  // the gap is filled: the rest goes out
  EXPECT_EQ(rec.handed, 20 * MiB);
}

TEST(SequentialRun, RandomSmallWritesNeverFormARun) {
  RunRecorder rec;
  std::mt19937_64 rng(5);
  for (int i = 0; i < 20000; i++) rec.write((rng() % (256 * MiB / 4096)) * 4096, 4096);
  EXPECT_EQ(rec.handed, 0u);
}

TEST(SequentialRun, RewriteFromTheStartBeginsANewRun) {
  RunRecorder rec;
  for (uint64_t off = 0; off < 32 * MiB; off += MiB) rec.write(off, MiB);
  const uint64_t first = rec.handed;
  ASSERT_GT(first, 0u);
  rec.out.clear();    // the second pass may hand out the same bytes again
  rec.write(0, MiB);  // the file is written again from its start
  for (uint64_t off = MiB; off < 32 * MiB; off += MiB) rec.write(off, MiB);
  EXPECT_EQ(rec.handed, 2 * first);  // the second pass is handed out again, as the first was
}

TEST(SequentialRun, AJumpFarAheadStartsOver) {
  RunRecorder rec;
  for (uint64_t off = 0; off < 6 * MiB; off += MiB) rec.write(off, MiB);
  const uint64_t far = 6 * MiB + SequentialRun::kReorder + MiB;
  for (uint64_t off = far; off < far + 6 * MiB; off += MiB) rec.write(off, MiB);
  EXPECT_EQ(rec.handed, 0u);  // neither piece alone fills a window
  for (uint64_t off = far + 6 * MiB; off < far + 10 * MiB; off += MiB) rec.write(off, MiB);
  EXPECT_EQ(rec.handed, SequentialRun::kWindow);  // the new run goes out from where it started
  EXPECT_EQ(rec.out.front().offset, far);
}

TEST(EarlyWriteback, StartsTheDiskWritesOfASequentialFile) {
  TempDir dir;
  std::string path = dir.path + "/seq";
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  EarlyWriteback wb;
  std::vector<char> buf(MiB, 'x');
  for (uint64_t off = 0; off < 48 * MiB; off += MiB) {
    ASSERT_EQ(pwrite(fd, buf.data(), buf.size(), static_cast<off_t>(off)), static_cast<ssize_t>(MiB));
    wb.wrote(7, fd, off, MiB);
  }
  close(fd);  // the thread works on its own duplicates
  wb.drain();
  EXPECT_GE(wb.bytes_started(), 48 * MiB - SequentialRun::kWindow);
}

TEST(EarlyWriteback, LeavesRandomWritersAlone) {
  TempDir dir;
  std::string path = dir.path + "/rand";
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  EarlyWriteback wb;
  std::vector<char> page(4096, 'r');
  std::mt19937_64 rng(9);
  for (int i = 0; i < 4000; i++) {
    uint64_t off = (rng() % 16384) * 4096;
    ASSERT_EQ(pwrite(fd, page.data(), page.size(), static_cast<off_t>(off)), 4096);
    wb.wrote(8, fd, off, 4096);
  }
  close(fd);
  wb.drain();
  EXPECT_EQ(wb.bytes_started(), 0u);
}

}  // namespace
}  // namespace blockrepl
