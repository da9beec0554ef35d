// Sparse files through real mounts: a 16 TiB sparse file on a master with a sync slave costs
// each daemon memory for the data it holds, not for its apparent size (the hash trees store
// only chunks above non-zero blocks), and replicates exactly.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

using namespace std::chrono_literals;
using repl::Cluster;
using repl::Node;

constexpr uint64_t kTiB = uint64_t{1} << 40;
constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kBlock = 4096;

// VmRSS of a process in bytes (0 if unreadable).
uint64_t rss_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  return 0;
}

// The largest "16 TiB" the backing file system takes (ext4 with 4 KiB blocks: 16 TiB - 4 KiB).
uint64_t truncate_huge(int fd) {
  for (uint64_t size : {16 * kTiB, 16 * kTiB - kBlock, 15 * kTiB})
    if (ftruncate(fd, static_cast<off_t>(size)) == 0) return size;
  return 0;
}

std::string block_with(uint64_t tag) {
  std::string s(kBlock, '\0');
  for (size_t i = 0; i < s.size(); i++) s[i] = static_cast<char>('a' + (tag + i) % 26);
  return s;
}

std::string pread_block(const std::string& path, uint64_t off) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "open failed: " + std::string(strerror(errno));
  std::string s(kBlock, '\0');
  ssize_t n = pread(fd, s.data(), s.size(), static_cast<off_t>(off));
  close(fd);
  if (n < 0) return "read failed: " + std::string(strerror(errno));
  s.resize(static_cast<size_t>(n));
  return s;
}

TEST(Sparse, HugeSparseFileCostsEachDaemonItsDataNotItsSize) {
  Cluster c("sparse");
  Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  const pid_t mpid = m.pid(), spid = s.pid();
  ASSERT_GT(mpid, 0);
  ASSERT_GT(spid, 0);

  int fd = open(m.file("huge").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0) << strerror(errno);
  ASSERT_EQ(fsync(fd), 0);
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");
  const uint64_t m_before = rss_of(mpid), s_before = rss_of(spid);

  const uint64_t size = truncate_huge(fd);
  ASSERT_NE(size, 0u) << "the backing file system takes no 15 TiB sparse file";
  const std::vector<uint64_t> offsets = {0, 3 * kTiB + 7 * kBlock, size / 2, size - kBlock};
  for (uint64_t off : offsets) {
    const std::string b = block_with(off);
    ASSERT_EQ(pwrite(fd, b.data(), b.size(), static_cast<off_t>(off)), static_cast<ssize_t>(b.size())) << strerror(errno);
  }
  ASSERT_EQ(fsync(fd), 0) << strerror(errno);
  close(fd);
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");

  // verify compares the trees of both sides (and builds them where not yet current).
  CommandResult v = run_blockrepl({"verify", s.mnt}, 300);
  EXPECT_EQ(v.exit_code, 0) << "verify " << s.mnt << ": " << v.out << v.err;

  const uint64_t m_after = rss_of(mpid), s_after = rss_of(spid);
  const auto growth = [](uint64_t before, uint64_t after) { return after > before ? after - before : 0; };
  printf("[ sparse   ] %llu byte file: master VmRSS %.1f -> %.1f MiB (+%.2f), slave %.1f -> %.1f MiB (+%.2f)\n",
         static_cast<unsigned long long>(size), static_cast<double>(m_before) / kMiB, static_cast<double>(m_after) / kMiB,
         static_cast<double>(growth(m_before, m_after)) / kMiB, static_cast<double>(s_before) / kMiB,
         static_cast<double>(s_after) / kMiB, static_cast<double>(growth(s_before, s_after)) / kMiB);
  EXPECT_LT(growth(m_before, m_after), 16 * kMiB) << "master";
  EXPECT_LT(growth(s_before, s_after), 16 * kMiB) << "slave";

  struct stat st;
  ASSERT_EQ(stat(s.backing("huge").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), size);
  for (uint64_t off : offsets) EXPECT_TRUE(pread_block(s.backing("huge"), off) == block_with(off)) << "offset " << off;
  EXPECT_TRUE(pread_block(s.backing("huge"), kTiB) == std::string(kBlock, '\0')) << "a hole reads as zeros";
}

}  // namespace
}  // namespace blockrepl::test
