// ConcurrentSync: the flush of a slave's barrier over several files, through io_uring and
// through the plain fallback, syncs every file and reports the first failure with its index.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "blockrepl/uring_sync.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

struct Files {
  TempDir dir;
  std::vector<int> fds;
  explicit Files(size_t n) {
    for (size_t i = 0; i < n; i++) {
      const std::string p = dir.path + "/f" + std::to_string(i);
      int fd = open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
      if (fd < 0) throw std::runtime_error("open " + p + ": " + strerror(errno));
      fds.push_back(fd);
      const std::string data(4096, static_cast<char>('a' + i % 26));
      if (pwrite(fd, data.data(), data.size(), 0) != static_cast<ssize_t>(data.size()))
        throw std::runtime_error("pwrite " + p + ": " + strerror(errno));
    }
  }
  ~Files() {
    for (int fd : fds) close(fd);
  }
};

class ConcurrentSyncTest : public ::testing::TestWithParam<bool> {};

TEST_P(ConcurrentSyncTest, SyncsEveryFileInRoundsOfTheRingsDepth) {
  ConcurrentSync s(GetParam());
  if (GetParam() && !s.uses_uring()) GTEST_SKIP() << "io_uring is not available here";
  // More than one round: the second is partial.
  Files f(ConcurrentSync::kDepth + 7);
  size_t failed = 99999;
  EXPECT_EQ(s.fdatasync_all(f.fds, &failed), 0);
  EXPECT_EQ(failed, 99999u);
  EXPECT_EQ(s.uses_uring(), GetParam());
  // Nothing left over from the first call disturbs the next.
  EXPECT_EQ(s.fdatasync_all(f.fds), 0);
  EXPECT_EQ(s.fdatasync_all({}), 0);
  EXPECT_EQ(s.fdatasync_all({f.fds[0]}), 0);
}

TEST_P(ConcurrentSyncTest, ReportsTheFirstFailureInOrderAndStillSyncsTheRest) {
  ConcurrentSync s(GetParam());
  if (GetParam() && !s.uses_uring()) GTEST_SKIP() << "io_uring is not available here";
  Files f(4);
  // Descriptors that are not open: the third and the fifth.
  int closed = dup(f.fds[0]);
  ASSERT_GE(closed, 0);
  close(closed);
  std::vector<int> fds = {f.fds[0], f.fds[1], closed, f.fds[2], -1, f.fds[3]};
  size_t failed = 99999;
  EXPECT_EQ(s.fdatasync_all(fds, &failed), EBADF);
  EXPECT_EQ(failed, 2u);
  // A per-file failure is the file's, not the ring's: io_uring stays in use.
  EXPECT_EQ(s.uses_uring(), GetParam());
  EXPECT_EQ(s.fdatasync_all({f.fds[0], -1}, &failed), EBADF);
  EXPECT_EQ(failed, 1u);
  EXPECT_EQ(s.fdatasync_all({f.fds[0], f.fds[1]}), 0);
}

INSTANTIATE_TEST_SUITE_P(UringAndPlain, ConcurrentSyncTest, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? std::string("Uring") : std::string("Plain"); });

}  // namespace
}  // namespace blockrepl
