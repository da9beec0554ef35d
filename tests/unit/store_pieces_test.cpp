// A buffered write record reaches the backing file in pieces (store.cpp, kBufferedWriteMax): the
// data must land whole and in place across piece boundaries, and a write the file system stops
// part way must still report exactly the bytes that reached the file (the master publishes
// those, so its replicas hold what its disk holds).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <random>
#include <string>

#include "blockrepl/record.h"
#include "blockrepl/store.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

constexpr FileId kFile = 0x5151000000000001ull;

std::string random_bytes(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

std::string read_file(int fd) {
  std::string out;
  char buf[65536];
  for (off_t off = 0;;) {
    ssize_t n = pread(fd, buf, sizeof buf, off);
    if (n <= 0) return out;
    out.append(buf, static_cast<size_t>(n));
    off += n;
  }
}

class StorePiecesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_fd_ = open(tmp_.path.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    ASSERT_GE(root_fd_, 0) << tmp_.path << ": " << strerror(errno);
    fd_ = open((tmp_.path + "/f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    ASSERT_GE(fd_, 0) << strerror(errno);
    store_ = std::make_unique<Store>(root_fd_, false);
  }
  void TearDown() override {
    store_.reset();
    if (fd_ >= 0) close(fd_);
    if (root_fd_ >= 0) close(root_fd_);
  }
  // The master's way: the caller's descriptor, times reported back.
  int write(uint64_t offset, const std::string& data, Stamps* stamps) {
    Record rec;
    rec.op = Op::write;
    rec.fid = kFile;
    rec.offset = offset;
    rec.data = data;
    Targets t;
    t.fd = fd_;
    return store_->apply(rec, t, stamps);
  }

  TempDir tmp_;
  int root_fd_ = -1;
  int fd_ = -1;
  std::unique_ptr<Store> store_;
};

TEST_F(StorePiecesTest, LargeUnalignedWriteLandsWholeAcrossPieces) {
  // 1 MiB + 5 bytes at an odd offset: every piece boundary falls inside a page.
  const std::string data = random_bytes((1u << 20) + 5, 1);
  Stamps stamps;
  ASSERT_EQ(write(4099, data, &stamps), 0);
  EXPECT_EQ(stamps.written, 0u);  // only a failed write reports bytes
  const std::string got = read_file(fd_);
  ASSERT_EQ(got.size(), 4099 + data.size());
  EXPECT_EQ(got.substr(0, 4099), std::string(4099, '\0'));
  EXPECT_TRUE(got.compare(4099, data.size(), data) == 0);
}

TEST_F(StorePiecesTest, WriteStoppedPartWayReportsTheBytesThatReachedTheFile) {
  // The file size limit stops the write inside its third piece: the first pwrites succeed, one
  // is cut short at the limit, the next fails with EFBIG.
  const size_t limit = (300u << 10) + 123;
  struct rlimit old {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = limit;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);

  const std::string data = random_bytes(1u << 20, 2);
  Stamps stamps;
  const int err = write(0, data, &stamps);

  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old), 0);
  signal(SIGXFSZ, old_handler);

  EXPECT_EQ(err, EFBIG);
  EXPECT_EQ(stamps.written, limit);
  const std::string got = read_file(fd_);
  ASSERT_EQ(got.size(), limit);
  EXPECT_TRUE(got.compare(0, limit, data, 0, limit) == 0);
}

}  // namespace
}  // namespace blockrepl
