// Many files: a volume's number of files is not bounded by descriptors. 200,000 files in 200
// directories on a master with a sync slave and on a plain mount: no error, every daemon's open
// descriptors under its budget throughout, the slave identical, a remount re-attaching by Merkle
// diff, `rm -rf` leaving nothing, descriptors back to their baseline. And a create that fails
// for lack of descriptors leaves no entry behind.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <set>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "harness.h"
#include "proc_fds.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

using namespace std::chrono_literals;
using blockrepl::testing::open_descriptors;
using repl::Cluster;
using repl::Node;

constexpr int kDirs = 200, kPerDir = 1000;
constexpr int kBudget = 256;
// Descriptors a daemon holds besides its file cache: its sockets, log, lock, hash-tree files,
// FUSE device, eventfds and the descriptors lent out for operations in flight.
constexpr int kFixed = 96;

// Samples the open descriptors of some processes until stopped; keeps the highest count.
class DescriptorWatch {
 public:
  explicit DescriptorWatch(std::vector<pid_t> pids) : pids_(std::move(pids)), peaks_(pids_.size(), 0) {
    thread_ = std::thread([this] {
      while (!stop_) {
        for (size_t i = 0; i < pids_.size(); i++) peaks_[i] = std::max(peaks_[i], open_descriptors(pids_[i]));
        std::this_thread::sleep_for(50ms);
      }
    });
  }
  ~DescriptorWatch() { stop(); }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int peak(size_t i) const { return peaks_[i]; }

 private:
  std::vector<pid_t> pids_;
  std::vector<int> peaks_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Creates kDirs directories of kPerDir empty files under root with 4 threads; returns the
// first error ("" if none).
std::string create_files(const std::string& root) {
  std::atomic<int> failed{0};
  std::string first;
  std::mutex mu;
  std::vector<std::thread> workers;
  for (int w = 0; w < 4; w++) {
    workers.emplace_back([&, w] {
      for (int d = w; d < kDirs; d += 4) {
        const std::string dir = root + "/d" + std::to_string(d);
        if (mkdir(dir.c_str(), 0755) != 0) {
          std::lock_guard lk(mu);
          if (failed++ == 0) first = "mkdir " + dir + ": " + strerror(errno);
          return;
        }
        for (int i = 0; i < kPerDir; i++) {
          const std::string f = dir + "/f" + std::to_string(i);
          int fd = open(f.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
          if (fd < 0 || close(fd) != 0) {
            std::lock_guard lk(mu);
            if (failed++ == 0) first = "create " + f + ": " + strerror(errno);
            return;
          }
        }
      }
    });
  }
  for (auto& t : workers) t.join();
  return first;
}

size_t count_entries(const std::string& root) {
  size_t n = 0;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(root, ec); !ec && it != std::filesystem::recursive_directory_iterator();
       it.increment(ec)) {
    if (it.depth() == 0 && (it->path().filename() == ".blockrepl" || it->path().filename() == "lost+found")) {
      it.disable_recursion_pending();
      continue;
    }
    n++;
  }
  return n;
}

// A barrier (fsync of the mount's root: every create and unlink is a record already), then
// waits until the slave holds everything up to it. sync_and_wait would fsync every file.
std::string barrier_and_wait(const Node& m, const Node& s) {
  int fd = open(m.mnt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return "open " + m.mnt + ": " + strerror(errno);
  const int rc = fsync(fd);
  close(fd);
  if (rc != 0) return "fsync " + m.mnt + ": " + strerror(errno);
  return repl::wait_durable(s.mnt, repl::lsn_of(m.mnt), 300s);
}

std::string remove_all_below(const std::string& root) {
  std::error_code ec;
  for (int d = 0; d < kDirs; d++) {
    std::filesystem::remove_all(root + "/d" + std::to_string(d), ec);
    if (ec) return "rm -rf " + root + "/d" + std::to_string(d) + ": " + ec.message();
  }
  return "";
}

TEST(ManyFiles, TwoHundredThousandFilesOnASyncPairWithBoundedDescriptors) {
  Cluster c("many-pair");
  const std::vector<std::string> opts = {"--fd-budget", std::to_string(kBudget)};
  std::vector<std::string> mopts = opts;
  mopts.insert(mopts.end(), {"--ack", "sync", "--journal-size", "0"});
  Node& m = c.add_master(mopts);
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m, opts);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(barrier_and_wait(m, s), "");
  const int base_m = open_descriptors(m.pid()), base_s = open_descriptors(s.pid());
  {
    DescriptorWatch watch({m.pid(), s.pid()});
    ASSERT_EQ(create_files(m.mnt), "");
    ASSERT_EQ(barrier_and_wait(m, s), "");
    watch.stop();
    printf("[ info ] descriptors: master %d -> peak %d, slave %d -> peak %d (budget %d)\n", base_m, watch.peak(0), base_s,
           watch.peak(1), kBudget);
    EXPECT_LE(watch.peak(0), base_m + kBudget + kFixed) << "the master's descriptors grew with the number of files";
    EXPECT_LE(watch.peak(1), base_s + kBudget + kFixed) << "the slave's descriptors grew with the number of files";
  }
  EXPECT_EQ(count_entries(s.data), static_cast<size_t>(kDirs) * (kPerDir + 1));
  repl::CompareOptions o;
  o.contents = false;  // all empty
  EXPECT_EQ(repl::diff_report(m.data, s.data, o, "master", "slave"), "");

  // A slave holding them all remounts and re-attaches by Merkle diff (no journal).
  const pid_t slave_pid = s.pid();
  c.unmount(s);
  // A deadline, not a timing: the slave saves the trees of 200,000 files on its way out, and the
  // suite runs two such tests side by side on 2 cores.
  ASSERT_TRUE(repl::wait_dead(slave_pid, 300s)) << "the slave daemon did not exit after its unmount";
  write_file(m.file("d7/changed"), "while away");
  ASSERT_TRUE(c.mount(s));
  ASSERT_EQ(barrier_and_wait(m, s), "");
  auto st = repl::status(s.mnt);
  EXPECT_EQ(st["last_attach"].value("method", ""), "merkle") << st.dump();
  EXPECT_LE(open_descriptors(s.pid()), base_s + kBudget + kFixed);
  CommandResult v = run_blockrepl({"verify", s.mnt}, 300);
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;

  // rm -rf leaves nothing on either side, and the descriptors come back down.
  ASSERT_EQ(remove_all_below(m.mnt), "");
  ASSERT_EQ(barrier_and_wait(m, s), "");
  EXPECT_EQ(count_entries(m.data), 0u);
  EXPECT_EQ(count_entries(s.data), 0u);
  int now_m = 0, now_s = 0;
  repl::wait_until(
      [&] {
        now_m = open_descriptors(m.pid());
        now_s = open_descriptors(s.pid());
        return now_m <= base_m + 8 && now_s <= base_s + 8;
      },
      20s, 200ms);
  EXPECT_LE(now_m, base_m + 8) << "the master holds descriptors of deleted files";
  EXPECT_LE(now_s, base_s + 8) << "the slave holds descriptors of deleted files";
}

TEST(ManyFiles, TwoHundredThousandFilesOnAPlainMount) {
  TempDir tmp("many-plain");
  const std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  Mount mount(data, mnt, {"--fd-budget", std::to_string(kBudget)});
  ASSERT_TRUE(mount.ok()) << mount.error();
  const pid_t pid = repl::daemon_pid(data);
  const int base = open_descriptors(pid);
  DescriptorWatch watch({pid});
  ASSERT_EQ(create_files(mnt), "");
  // Every file is there and can be looked up again, and touched.
  struct stat st;
  EXPECT_EQ(stat((mnt + "/d199/f999").c_str(), &st), 0);
  EXPECT_EQ(stat((mnt + "/d0/f0").c_str(), &st), 0);
  EXPECT_EQ(count_entries(data), static_cast<size_t>(kDirs) * (kPerDir + 1));
  ASSERT_EQ(remove_all_below(mnt), "");
  watch.stop();
  printf("[ info ] descriptors: %d -> peak %d (budget %d)\n", base, watch.peak(0), kBudget);
  EXPECT_LE(watch.peak(0), base + kBudget + kFixed);
  EXPECT_EQ(count_entries(data), 0u);
}

// A create whose answer cannot be made (the daemon is out of descriptors) is taken back: no entry
// that `ls` lists but `stat` and `rm` cannot reach.
TEST(ManyFiles, ACreateRefusedForLackOfDescriptorsLeavesNoEntry) {
  TempDir tmp("many-emfile");
  const std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  Mount mount(data, mnt);
  ASSERT_TRUE(mount.ok()) << mount.error();
  const pid_t pid = repl::daemon_pid(data);
  ASSERT_EQ(mkdir((mnt + "/d").c_str(), 0755), 0);
  rlimit old{};
  ASSERT_EQ(prlimit(pid, RLIMIT_NOFILE, nullptr, &old), 0);
  // Room for what is open now and barely more: creates begin to fail.
  rlimit tight = old;
  tight.rlim_cur = static_cast<rlim_t>(open_descriptors(pid) + 1);
  ASSERT_EQ(prlimit(pid, RLIMIT_NOFILE, &tight, nullptr), 0);
  int ok = 0, refused = 0;
  std::vector<std::string> made;
  for (int i = 0; i < 40; i++) {
    const std::string f = mnt + "/d/f" + std::to_string(i);
    int fd = open(f.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
    if (fd >= 0) {
      close(fd);
      ok++;
      made.push_back("f" + std::to_string(i));
    } else {
      refused++;
    }
    const std::string d = mnt + "/d/sub" + std::to_string(i);
    if (mkdir(d.c_str(), 0755) == 0) made.push_back("sub" + std::to_string(i));
    else refused++;
  }
  ASSERT_EQ(prlimit(pid, RLIMIT_NOFILE, &old, nullptr), 0);
  printf("[ info ] %d creates answered, %d refused\n", ok, refused);
  EXPECT_GT(refused, 0) << "the limit did not bite: the test proves nothing";
  std::sort(made.begin(), made.end());
  std::set<std::string> listed = list_dir(mnt + "/d"), backing = list_dir(data + "/d");
  EXPECT_EQ(std::vector<std::string>(listed.begin(), listed.end()), made) << "entries the application was told failed";
  EXPECT_EQ(std::vector<std::string>(backing.begin(), backing.end()), made);
  for (const std::string& n : listed) {
    struct stat st;
    EXPECT_EQ(lstat((mnt + "/d/" + n).c_str(), &st), 0) << n << " is listed but cannot be reached";
  }
}

}  // namespace
}  // namespace blockrepl::test
