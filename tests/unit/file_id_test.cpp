// File ids in the trusted.blockrepl.fid xattr: round trips on every inode type, symlinks never
// followed, the on-disk format, and fresh ids.
#include <gtest/gtest.h>

#include <endian.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "blockrepl/file_id.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

class FileIdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_fd_ = open(tmp_.path.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    ASSERT_GE(dir_fd_, 0);
  }
  void TearDown() override {
    if (dir_fd_ >= 0) close(dir_fd_);
  }
  std::string p(const std::string& rel) const { return tmp_.path + "/" + rel; }
  void make_file(const std::string& rel) {
    int fd = open(p(rel).c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0);
    close(fd);
  }

  TempDir tmp_;
  int dir_fd_ = -1;
};

TEST(FdPath, NamesTheProcLinkOfTheDescriptor) {
  EXPECT_EQ(fd_path(7), "/proc/self/fd/7");
  EXPECT_EQ(fd_path(7, nullptr), "/proc/self/fd/7");
  EXPECT_EQ(fd_path(7, ""), "/proc/self/fd/7");
  EXPECT_EQ(fd_path(12, "name"), "/proc/self/fd/12/name");
}

TEST_F(FileIdTest, RoundTripOnRegularFile) {
  make_file("f");
  constexpr FileId kId = 0x0123456789abcdefull;
  ASSERT_EQ(write_file_id(dir_fd_, "f", kId), 0);
  EXPECT_EQ(read_file_id(dir_fd_, "f"), kId);
  // Overwriting replaces.
  ASSERT_EQ(write_file_id(dir_fd_, "f", 42), 0);
  EXPECT_EQ(read_file_id(dir_fd_, "f"), FileId{42});
  // Through an fd of the file itself (name "").
  int fd = open(p("f").c_str(), O_PATH | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  EXPECT_EQ(read_file_id(fd, ""), FileId{42});
  ASSERT_EQ(write_file_id(fd, "", kId), 0);
  EXPECT_EQ(read_file_id(dir_fd_, "f"), kId);
  close(fd);
}

TEST_F(FileIdTest, RoundTripOnDirectoryByNameAndByDescriptor) {
  ASSERT_EQ(mkdir(p("d").c_str(), 0755), 0);
  ASSERT_EQ(write_file_id(dir_fd_, "d", 0xd1d1d1d1ull), 0);
  EXPECT_EQ(read_file_id(dir_fd_, "d"), FileId{0xd1d1d1d1ull});

  // The directory the descriptor names itself (how a Node tags its root).
  ASSERT_EQ(write_file_id(dir_fd_, "", kRootFileId), 0);
  EXPECT_EQ(read_file_id(dir_fd_, ""), kRootFileId);
  EXPECT_EQ(read_file_id(dir_fd_, nullptr), kRootFileId);
  // Both ids really are on their own inodes.
  EXPECT_EQ(read_file_id(dir_fd_, "d"), FileId{0xd1d1d1d1ull});
}

TEST_F(FileIdTest, RoundTripOnSymlinkNeverFollowsIt) {
  make_file("target");
  ASSERT_EQ(write_file_id(dir_fd_, "target", 0x7777), 0);
  ASSERT_EQ(symlink("target", p("link").c_str()), 0);
  // An untagged symlink has no id, even though its target has one.
  EXPECT_EQ(read_file_id(dir_fd_, "link"), std::nullopt);

  ASSERT_EQ(write_file_id(dir_fd_, "link", 0x8888), 0);
  EXPECT_EQ(read_file_id(dir_fd_, "link"), FileId{0x8888});
  EXPECT_EQ(read_file_id(dir_fd_, "target"), FileId{0x7777}) << "writing the link's id changed its target";
  // The xattr sits on the link inode.
  uint64_t le = 0;
  ASSERT_EQ(lgetxattr(p("link").c_str(), kFileIdXattr, &le, sizeof le), static_cast<ssize_t>(sizeof le));
  EXPECT_EQ(le64toh(le), 0x8888u);

  // A dangling symlink works too (nothing to follow).
  ASSERT_EQ(symlink("/nonexistent/elsewhere", p("dangling").c_str()), 0);
  ASSERT_EQ(write_file_id(dir_fd_, "dangling", 0x9999), 0);
  EXPECT_EQ(read_file_id(dir_fd_, "dangling"), FileId{0x9999});
}

TEST_F(FileIdTest, IdOfSymlinkToOutsideDirectoryStaysOnTheLink) {
  TempDir outside;
  ASSERT_EQ(mkdir((outside.path + "/sub").c_str(), 0755), 0);
  ASSERT_EQ(symlink(outside.path.c_str(), p("esc").c_str()), 0);
  ASSERT_EQ(write_file_id(dir_fd_, "esc", 0x1234), 0);
  // The outside directory got nothing.
  char buf[16];
  EXPECT_LT(getxattr(outside.path.c_str(), kFileIdXattr, buf, sizeof buf), 0);
}

TEST_F(FileIdTest, StoredAsEightLittleEndianBytes) {
  make_file("f");
  ASSERT_EQ(write_file_id(dir_fd_, "f", 0x0102030405060708ull), 0);
  unsigned char raw[16];
  ssize_t n = lgetxattr(p("f").c_str(), kFileIdXattr, raw, sizeof raw);
  ASSERT_EQ(n, 8);
  const unsigned char want[8] = {0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01};
  EXPECT_EQ(memcmp(raw, want, 8), 0);
  EXPECT_STREQ(kFileIdXattr, "trusted.blockrepl.fid");
  EXPECT_EQ(std::string(kFileIdXattr).rfind(kReservedXattrPrefix, 0), 0u);
}

TEST_F(FileIdTest, MissingOrMalformedIdsReadAsNullopt) {
  make_file("plain");
  EXPECT_EQ(read_file_id(dir_fd_, "plain"), std::nullopt);
  EXPECT_EQ(read_file_id(dir_fd_, "does-not-exist"), std::nullopt);
  EXPECT_EQ(read_file_id(dir_fd_, ""), std::nullopt);  // the untagged directory itself

  make_file("short");
  ASSERT_EQ(lsetxattr(p("short").c_str(), kFileIdXattr, "abcd", 4, 0), 0);
  EXPECT_EQ(read_file_id(dir_fd_, "short"), std::nullopt);

  make_file("long");
  ASSERT_EQ(lsetxattr(p("long").c_str(), kFileIdXattr, "0123456789abcdef", 16, 0), 0);
  EXPECT_EQ(read_file_id(dir_fd_, "long"), std::nullopt);

  make_file("zero");
  ASSERT_EQ(write_file_id(dir_fd_, "zero", kInvalidFileId), 0);
  EXPECT_EQ(read_file_id(dir_fd_, "zero"), std::nullopt);
}

TEST_F(FileIdTest, WriteToMissingNameReturnsErrno) {
  EXPECT_EQ(write_file_id(dir_fd_, "does-not-exist", 5), ENOENT);
  EXPECT_FALSE(std::filesystem::exists(p("does-not-exist")));
}

TEST(NewFileId, NeverReservedAndNoRepeatsOver100kDraws) {
  std::unordered_set<FileId> seen;
  seen.reserve(200000);
  for (int i = 0; i < 100000; i++) {
    FileId fid = new_file_id();
    ASSERT_NE(fid, kInvalidFileId);
    ASSERT_NE(fid, kRootFileId);
    ASSERT_TRUE(seen.insert(fid).second) << "repeated id " << fid << " after " << i << " draws";
  }
  // Spread over the whole 64-bit space (not, say, a counter or 32-bit values).
  int high = 0;
  for (FileId f : seen) high += (f >> 63) & 1;
  EXPECT_GT(high, 45000);
  EXPECT_LT(high, 55000);
}

TEST(NewFileId, ThreadsDrawDistinctIds) {
  constexpr int kThreads = 4, kEach = 20000;
  std::vector<std::vector<FileId>> got(kThreads);
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; t++)
    ts.emplace_back([&, t] {
      for (int i = 0; i < kEach; i++) got[t].push_back(new_file_id());
    });
  for (auto& t : ts) t.join();
  std::unordered_set<FileId> all;
  for (auto& v : got)
    for (FileId f : v) {
      EXPECT_NE(f, kInvalidFileId);
      EXPECT_NE(f, kRootFileId);
      all.insert(f);
    }
  EXPECT_EQ(all.size(), static_cast<size_t>(kThreads * kEach));
}

}  // namespace
}  // namespace blockrepl
