// Fast re-attach of slaves on real FUSE mounts: by stream while the master's journal covers the
// slave's LSN, else by Merkle diff (only differing blocks and entries cross the wire, staged and
// switched atomically); `blockrepl verify [--deep]`; slaves and masters killed with SIGKILL
// mid-attach or mid-write; and the persistent hash trees after an unclean stop (only the 4 MiB
// extents touched since the last checkpoint are rehashed). Every comparison is of the backing
// directories (byte for byte, metadata and file ids included); every wait has a deadline.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <cstring>
#include <fcntl.h>
#include <linux/falloc.h>
#include <mutex>
#include <random>
#include <regex>
#include <string>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

using namespace std::chrono_literals;
using repl::Clock;
using repl::Cluster;
using repl::json;
using repl::Node;

constexpr size_t kBlock = 4096;

std::string errtext(int e) { return std::string(strerror(e)) + " (errno " + std::to_string(e) + ")"; }

double secs_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Writes data to path (create/truncate) and fsyncs it; returns 0 or errno.
int put_file(const std::string& path, const std::string& data, mode_t mode = 0644) {
  int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, mode);
  if (fd < 0) return errno;
  try {
    repl::pwrite_all(fd, data, 0);
  } catch (const std::exception&) {
    int e = errno ? errno : EIO;
    close(fd);
    return e;
  }
  int rc = fsync(fd) == 0 ? 0 : errno;
  close(fd);
  return rc;
}

// pwrite data at off into an existing file and fsync; returns 0 or errno.
int patch_file(const std::string& path, const std::string& data, off_t off) {
  int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  try {
    repl::pwrite_all(fd, data, off);
  } catch (const std::exception&) {
    int e = errno ? errno : EIO;
    close(fd);
    return e;
  }
  int rc = fsync(fd) == 0 ? 0 : errno;
  close(fd);
  return rc;
}

std::string read_or_error(const std::string& path) {
  try {
    return read_file(path);
  } catch (const std::exception& e) {
    return std::string("<") + e.what() + ">";
  }
}

off_t size_of(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? st.st_size : -1;
}

#define REATTACH_SYNCED(master, ...)                                                               \
  do {                                                                                            \
    std::string why_ = repl::sync_and_wait((master).mnt, {__VA_ARGS__});                          \
    ASSERT_EQ(why_, "") << "slaves did not catch up";                                             \
  } while (0)

// Backing directories identical, file ids included; with mtimes of regular files when asked.
#define REATTACH_SAME_TREE(a, b, mtimes)                                                           \
  do {                                                                                            \
    repl::CompareOptions o_;                                                                      \
    o_.file_mtimes = (mtimes);                                                                    \
    std::string d_ = repl::diff_report((a).data, (b).data, o_, (a).name, (b).name);               \
    EXPECT_EQ(d_, "") << "backing directories differ: " << (a).name << " vs " << (b).name;        \
  } while (0)

json last_attach(const Node& n) {
  json j = repl::status(n.mnt);
  if (!j.is_object() || !j["last_attach"].is_object()) return json();
  return j["last_attach"];
}

std::string method_of(const json& la) {
  if (!la.is_object()) return "<no last_attach>";
  return la.value("method", std::string("<no method>"));
}

std::string upstream_state(const Node& n) {
  std::string err;
  json j = repl::status(n.mnt, &err);
  if (j.is_null()) return "<no status: " + err + ">";
  if (!j.is_object() || !j["upstream"].is_object()) return "<no upstream>";
  return j["upstream"].value("state", std::string("?"));
}

CommandResult verify(const Node& slave, bool deep) {
  std::vector<std::string> args = {"verify", slave.mnt};
  if (deep) args.push_back("--deep");
  return run_blockrepl(args, 120);
}

std::string describe(const CommandResult& r) {
  return "exit " + std::to_string(r.exit_code) + "\nstdout:\n" + r.out + "stderr:\n" + r.err;
}

// SIGKILLs the daemon of n, waits until it is dead and detaches its mount.
void kill_daemon(Cluster& c, Node& n) {
  const pid_t pid = n.pid();
  ASSERT_TRUE(repl::process_alive(pid)) << n.name << ": no live daemon (pid " << pid << ")";
  ASSERT_EQ(kill(pid, SIGKILL), 0) << errtext(errno);
  ASSERT_TRUE(repl::wait_dead(pid, 10s)) << n.name << ": daemon " << pid << " survived SIGKILL";
  c.detach(n);
  ASSERT_FALSE(is_mounted(n.mnt)) << n.name << " is still mounted after the lazy detach";
}

// The part of a node's log written after byte `from` (logs are appended to across mounts).
std::string log_since(const Node& n, off_t from) {
  std::string s = read_or_error(n.log);
  if (from > 0 && static_cast<size_t>(from) <= s.size()) return s.substr(static_cast<size_t>(from));
  return s;
}

off_t log_size(const Node& n) { return std::max<off_t>(size_of(n.log), 0); }

// What a node's last mount command printed (the daemon logs to the mount command's stderr
// until the mount is offered, and to --log-file only from then on).
std::string mount_output(const Node& n) { return n.mount ? n.mount->error() : std::string(); }

// The arguments Cluster::mount uses for n.
std::vector<std::string> mount_args(const Node& n) {
  std::vector<std::string> args = {"mount", "--data", n.data};
  args.insert(args.end(), n.extra.begin(), n.extra.end());
  args.insert(args.end(), {"-v", "--log-file", n.log});
  if (!n.master_address.empty()) args.insert(args.end(), {"--master", n.master_address});
  if (n.port) args.insert(args.end(), {"--listen", n.address()});
  args.push_back(n.mnt);
  return args;
}

// The pid of the mount daemon for data dir `data` while its mount command still runs (the
// daemon writes its pid file only once the mount is offered): a `blockrepl mount --data DATA`
// process that leads its own session (the daemon calls setsid; its parent does not). 0 if none.
pid_t find_daemon(const std::string& data) {
  DIR* d = opendir("/proc");
  if (!d) return 0;
  pid_t found = 0;
  while (dirent* de = readdir(d)) {
    char* end = nullptr;
    long pid = strtol(de->d_name, &end, 10);
    if (pid <= 0 || *end) continue;
    std::string cmd = read_or_error("/proc/" + std::string(de->d_name) + "/cmdline");
    std::vector<std::string> argv;
    for (size_t pos = 0; pos < cmd.size();) {
      size_t z = cmd.find('\0', pos);
      if (z == std::string::npos) z = cmd.size();
      argv.push_back(cmd.substr(pos, z - pos));
      pos = z + 1;
    }
    bool match = argv.size() > 3 && argv[1] == "mount";
    bool has_data = false;
    for (size_t i = 1; match && i + 1 < argv.size(); i++)
      if (argv[i] == "--data" && argv[i + 1] == data) has_data = true;
    if (!match || !has_data) continue;
    std::string st = read_or_error("/proc/" + std::string(de->d_name) + "/stat");
    auto rp = st.rfind(')');
    if (rp == std::string::npos) continue;
    // after ") ": state ppid pgrp session
    char state = 0;
    long ppid = 0, pgrp = 0, session = 0;
    if (sscanf(st.c_str() + rp + 1, " %c %ld %ld %ld", &state, &ppid, &pgrp, &session) != 4) continue;
    if (session == pid && state != 'Z' && state != 'X') found = static_cast<pid_t>(pid);
  }
  closedir(d);
  return found;
}

// The lines of text that contain needle.
std::string lines_with(const std::string& text, const std::string& needle) {
  std::string out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string line = text.substr(pos, nl - pos);
    if (line.find(needle) != std::string::npos) out += line + "\n";
    pos = nl + 1;
  }
  return out;
}

// Waits until the slave holds everything the master has at the time of the call, although the
// master may keep changing (sync_and_wait insists on a quiet master).
std::string caught_up(const Node& m, const Node& s, std::chrono::milliseconds timeout = 30s) {
  if (std::string e = repl::sync_point(m.mnt); !e.empty()) return "sync point failed: " + e;
  uint64_t lsn = 0;
  try {
    lsn = repl::lsn_of(m.mnt);
  } catch (const std::exception& e) {
    return e.what();
  }
  return repl::wait_durable(s.mnt, lsn, timeout);
}

// ---------------------------------------------------------------------------------------------
// SQLite

class Db {
 public:
  explicit Db(const std::string& path, int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) {
    rc_ = sqlite3_open_v2(path.c_str(), &db_, flags, nullptr);
    if (rc_ != SQLITE_OK) error_ = (db_ ? sqlite3_errmsg(db_) : sqlite3_errstr(rc_)) + std::string(" opening ") + path;
    if (db_) sqlite3_busy_timeout(db_, 5000);
  }
  ~Db() {
    if (db_) sqlite3_close(db_);
  }
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  bool ok() const { return rc_ == SQLITE_OK; }
  const std::string& error() const { return error_; }
  sqlite3* get() { return db_; }
  bool exec(const std::string& sql) {
    char* msg = nullptr;
    int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &msg);
    if (rc != SQLITE_OK) {
      error_ = std::string(msg ? msg : sqlite3_errstr(rc)) + " [" + sql + "]" + sys_error();
      sqlite3_free(msg);
      return false;
    }
    return true;
  }
  // The first column of the first row as text ("" and error() on failure).
  std::string query(const std::string& sql) {
    sqlite3_stmt* st = nullptr;
    std::string out;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) != SQLITE_OK) {
      error_ = sqlite3_errmsg(db_) + std::string(" [") + sql + "]";
      return "";
    }
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
      const unsigned char* t = sqlite3_column_text(st, 0);
      out = t ? reinterpret_cast<const char*>(t) : "";
    } else if (rc != SQLITE_DONE) {
      error_ = sqlite3_errmsg(db_) + std::string(" [") + sql + "]" + sys_error();
    }
    sqlite3_finalize(st);
    return out;
  }
  std::string sys_error() const {
    int e = db_ ? sqlite3_system_errno(db_) : 0;
    return e ? " (" + errtext(e) + ")" : "";
  }

 private:
  sqlite3* db_ = nullptr;
  int rc_ = SQLITE_ERROR;
  std::string error_;
};

// Inserts one row per transaction (WAL, synchronous=FULL) into t until stopped.
class SqliteWriter {
 public:
  SqliteWriter(const std::string& path, uint64_t seed) : path_(path), seed_(seed) {}
  ~SqliteWriter() { stop(); }
  // Creates the database and the table; "" or the error.
  std::string setup() {
    db_ = std::make_unique<Db>(path_);
    if (!db_->ok()) return db_->error();
    if (db_->query("PRAGMA journal_mode=WAL") != "wal") return "journal_mode=WAL refused: " + db_->error();
    if (!db_->exec("PRAGMA synchronous=FULL")) return db_->error();
    if (!db_->exec("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB NOT NULL)")) return db_->error();
    return "";
  }
  void start() {
    thread_ = std::thread([this] { run(); });
  }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  uint64_t committed() const { return committed_; }
  std::string errors() {
    std::lock_guard lk(mu_);
    return errors_;
  }
  bool wait_progress(uint64_t more, std::chrono::milliseconds timeout) {
    uint64_t target = committed_ + more;
    return repl::wait_until([&] { return committed_ >= target; }, timeout, 10ms);
  }

 private:
  void run() {
    std::mt19937_64 rng(seed_);
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db_->get(), "INSERT INTO t(v) VALUES(?)", -1, &st, nullptr) != SQLITE_OK) {
      fail(std::string("prepare: ") + sqlite3_errmsg(db_->get()));
      return;
    }
    while (!stop_) {
      std::string v = repl::random_bytes(rng(), 100 + rng() % 3000);
      sqlite3_bind_blob(st, 1, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
      int rc = sqlite3_step(st);
      sqlite3_reset(st);
      if (rc != SQLITE_DONE) {
        fail(std::string("insert: ") + sqlite3_errmsg(db_->get()) + db_->sys_error());
        break;
      }
      committed_++;
    }
    sqlite3_finalize(st);
  }
  void fail(const std::string& e) {
    std::lock_guard lk(mu_);
    errors_ += e + "\n";
  }
  std::string path_;
  uint64_t seed_;
  std::unique_ptr<Db> db_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> committed_{0};
  std::mutex mu_;
  std::string errors_;
};

// Copies src to dst byte for byte; "" or the error.
std::string copy_file(const std::string& src, const std::string& dst) {
  std::string data;
  try {
    data = read_file(src);
  } catch (const std::exception& e) {
    return e.what();
  }
  int rc = put_file(dst, data);
  return rc ? "write " + dst + ": " + errtext(rc) : "";
}

}  // namespace

// =============================================================================================
// 1. Stream while the journal covers the slave's LSN, Merkle when it does not.

TEST(ReattachMethod, StreamWhenJournalCoversElseMerkle) {
  Cluster c("reattach-method");
  // Round 1: default journal (256M).
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(mkdir(m.file("dir").c_str(), 0755), 0);
  ASSERT_EQ(put_file(m.file("a"), repl::random_bytes(1, 1 << 20)), 0);
  ASSERT_EQ(put_file(m.file("dir/b"), repl::random_bytes(2, 300000)), 0);
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  REATTACH_SYNCED(m, s.mnt);
  c.unmount(s);
  ASSERT_FALSE(is_mounted(s.mnt));
  for (int i = 0; i < 3; i++)
    ASSERT_EQ(patch_file(m.file("a"), repl::random_bytes(100 + i, kBlock), static_cast<off_t>((i * 77 + 5) * kBlock)), 0);
  ASSERT_EQ(patch_file(m.file("dir/b"), "changed while away", 1000), 0);
  ASSERT_TRUE(c.mount(s));
  REATTACH_SYNCED(m, s.mnt);
  json la = last_attach(s);
  printf("[ info ] journal 256M: last_attach %s\n", la.dump().c_str());
  EXPECT_EQ(method_of(la), "stream") << "the default journal covers three changed blocks";
  REATTACH_SAME_TREE(m, s, true);
  EXPECT_EQ(read_or_error(s.file("a")), read_or_error(m.file("a")));

  // Round 2: no journal at all, so the same outage needs a Merkle diff.
  Node& m2 = c.add_master({"--journal-size", "0"});
  ASSERT_TRUE(m2.ok());
  ASSERT_EQ(mkdir(m2.file("dir").c_str(), 0755), 0);
  ASSERT_EQ(put_file(m2.file("a"), repl::random_bytes(3, 1 << 20)), 0);
  ASSERT_EQ(put_file(m2.file("dir/b"), repl::random_bytes(4, 300000)), 0);
  Node& s2 = c.add_slave(m2);
  ASSERT_TRUE(s2.ok());
  REATTACH_SYNCED(m2, s2.mnt);
  c.unmount(s2);
  ASSERT_FALSE(is_mounted(s2.mnt));
  for (int i = 0; i < 3; i++)
    ASSERT_EQ(patch_file(m2.file("a"), repl::random_bytes(200 + i, kBlock), static_cast<off_t>((i * 77 + 5) * kBlock)), 0);
  ASSERT_EQ(patch_file(m2.file("dir/b"), "changed while away", 1000), 0);
  ASSERT_TRUE(c.mount(s2));
  REATTACH_SYNCED(m2, s2.mnt);
  json la2 = last_attach(s2);
  printf("[ info ] journal 0: last_attach %s\n", la2.dump().c_str());
  EXPECT_EQ(method_of(la2), "merkle") << "a master without a journal cannot stream the outage";
  REATTACH_SAME_TREE(m2, s2, true);
  EXPECT_EQ(read_or_error(s2.file("a")), read_or_error(m2.file("a"))) << "readers on the slave see stale data";
  CommandResult v = verify(s2, false);
  EXPECT_EQ(v.exit_code, 0) << describe(v);
  EXPECT_NE(v.out.find("identical to the master"), std::string::npos) << describe(v);
}

// =============================================================================================
// 2. A block rewritten many times while the slave was away crosses the wire once.

TEST(ReattachMerkle, RewrittenBlocksCrossTheWireOnce) {
  Cluster c("reattach-once");
  Node& m = c.add_master({"--journal-size", "0"});
  ASSERT_TRUE(m.ok());
  const size_t kSize = 32u << 20;
  {
    int fd = open(m.file("big").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0) << errtext(errno);
    for (size_t off = 0; off < kSize; off += 1 << 20) repl::pwrite_all(fd, repl::random_bytes(off + 1, 1 << 20), static_cast<off_t>(off));
    ASSERT_EQ(fsync(fd), 0) << errtext(errno);
    close(fd);
  }
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  REATTACH_SYNCED(m, s.mnt);
  REATTACH_SAME_TREE(m, s, true);
  c.unmount(s);
  ASSERT_FALSE(is_mounted(s.mnt));

  // 10 blocks at scattered offsets, 50 rewrites each, each one fsynced.
  std::vector<off_t> offsets;
  for (int i = 0; i < 10; i++) offsets.push_back(static_cast<off_t>(((i * 811 + 37) % (kSize / kBlock)) * kBlock));
  auto t0 = Clock::now();
  {
    int fd = open(m.file("big").c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << errtext(errno);
    for (int round = 0; round < 50; round++) {
      for (size_t i = 0; i < offsets.size(); i++) {
        repl::pwrite_all(fd, repl::random_bytes(1000000 + round * 100 + i, kBlock), offsets[i]);
        ASSERT_EQ(fsync(fd), 0) << errtext(errno);
      }
    }
    close(fd);
  }
  printf("[ info ] 500 rewrites+fsyncs while the slave was away: %.2f s\n", secs_since(t0));
  REATTACH_SYNCED(m);  // a sync point on the master

  t0 = Clock::now();
  ASSERT_TRUE(c.mount(s));
  REATTACH_SYNCED(m, s.mnt);
  json la = last_attach(s);
  printf("[ info ] re-attach: %s (mount+sync %.2f s)\n", la.dump().c_str(), secs_since(t0));
  EXPECT_EQ(method_of(la), "merkle");
  ASSERT_TRUE(la.is_object());
  const uint64_t blocks = la.value("blocks_received", UINT64_MAX), bytes = la.value("bytes_received", UINT64_MAX);
  EXPECT_LE(blocks, 12u) << "10 changed blocks should cross the wire once each";
  EXPECT_GE(blocks, 10u) << "fewer blocks received than were changed: the report undercounts";
  EXPECT_LT(bytes, 1u << 20) << "the re-attach sent " << bytes << " bytes for 40 KiB of changed data";
  REATTACH_SAME_TREE(m, s, true);
}

// =============================================================================================
// 3. Every kind of namespace change made while the slave was away is repaired by the Merkle diff,
// and a local change on the slave that the master lacks is undone.

TEST(ReattachMerkle, NamespaceChangesWhileAwayAreRepaired) {
  Cluster c("reattach-ns");
  Node& m = c.add_master({"--journal-size", "0"});
  ASSERT_TRUE(m.ok());
  auto f = [&](const std::string& rel) { return m.file(rel); };
  for (auto d : {"d1", "d1/sub", "d1/sub/deeper", "d2", "tree", "tree/x", "tree/x/y"}) ASSERT_EQ(mkdir(f(d).c_str(), 0755), 0) << d;
  std::map<std::string, std::string> init = {
      {"d1/a.txt", repl::random_bytes(11, 70000)},   {"d1/b.txt", repl::random_bytes(12, 5000)},
      {"d1/sub/c", repl::random_bytes(13, 40000)},   {"d1/sub/deeper/d", repl::random_bytes(14, 9000)},
      {"d2/e.txt", repl::random_bytes(15, 12345)},   {"tree/t1", repl::random_bytes(16, 3000)},
      {"tree/x/t2", repl::random_bytes(17, 3000)},   {"tree/x/y/t3", repl::random_bytes(18, 3000)},
      {"del.txt", repl::random_bytes(19, 8000)},     {"shrink", repl::random_bytes(20, 200000)},
      {"grow", repl::random_bytes(21, 10000)},       {"holey", repl::random_bytes(22, 1 << 20)},
      {"linksrc", repl::random_bytes(23, 6000)},     {"modes", repl::random_bytes(24, 100)},
      {"attrs", repl::random_bytes(25, 100)},        {"replaced", repl::random_bytes(26, 4000)},
  };
  for (auto& [p, d] : init) ASSERT_EQ(put_file(f(p), d), 0) << p;
  ASSERT_EQ(setxattr(f("attrs").c_str(), "user.keep", "k", 1, 0), 0);
  ASSERT_EQ(setxattr(f("attrs").c_str(), "user.gone", "g", 1, 0), 0);
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  REATTACH_SYNCED(m, s.mnt);
  REATTACH_SAME_TREE(m, s, true);
  c.unmount(s);
  ASSERT_FALSE(is_mounted(s.mnt));

  // While the slave is away.
  ASSERT_EQ(rename(f("d1/a.txt").c_str(), f("d1/a2.txt").c_str()), 0) << "rename within a directory";
  ASSERT_EQ(rename(f("d1/b.txt").c_str(), f("d2/b.txt").c_str()), 0) << "rename across directories";
  ASSERT_EQ(rename(f("d1/sub").c_str(), f("d2/sub_moved").c_str()), 0) << "rename a directory with contents";
  ASSERT_EQ(rename(f("d2/e.txt").c_str(), f("e_top.txt").c_str()), 0);
  ASSERT_EQ(unlink(f("del.txt").c_str()), 0);
  ASSERT_EQ(unlink(f("tree/x/y/t3").c_str()), 0);
  ASSERT_EQ(rmdir(f("tree/x/y").c_str()), 0);
  ASSERT_EQ(unlink(f("tree/x/t2").c_str()), 0);
  ASSERT_EQ(rmdir(f("tree/x").c_str()), 0);
  ASSERT_EQ(unlink(f("tree/t1").c_str()), 0);
  ASSERT_EQ(rmdir(f("tree").c_str()), 0);
  ASSERT_EQ(mkdir(f("new").c_str(), 0750), 0);
  ASSERT_EQ(mkdir(f("new/deeper").c_str(), 0700), 0);
  ASSERT_EQ(put_file(f("new/n1"), repl::random_bytes(31, 50000), 0600), 0);
  ASSERT_EQ(put_file(f("new/deeper/n2"), repl::random_bytes(32, 123), 0640), 0);
  ASSERT_EQ(put_file(f("new/empty"), ""), 0);
  ASSERT_EQ(truncate(f("shrink").c_str(), 1000), 0);
  ASSERT_EQ(truncate(f("grow").c_str(), 3 << 20), 0);
  {
    int fd = open(f("holey").c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, 262144), 0) << errtext(errno);
    ASSERT_EQ(fsync(fd), 0);
    close(fd);
  }
  ASSERT_EQ(link(f("linksrc").c_str(), f("d2/hard").c_str()), 0);
  ASSERT_EQ(symlink("../d1/a2.txt", f("d2/sym").c_str()), 0);
  ASSERT_EQ(symlink("d2/sub_moved", f("dirsym").c_str()), 0);
  ASSERT_EQ(chmod(f("modes").c_str(), 0604), 0);
  ASSERT_EQ(chown(f("modes").c_str(), 1234, 5678), 0);
  ASSERT_EQ(chmod(f("d2").c_str(), 0711), 0);
  ASSERT_EQ(setxattr(f("attrs").c_str(), "user.new", "fresh value", 11, 0), 0);
  ASSERT_EQ(removexattr(f("attrs").c_str(), "user.gone"), 0);
  ASSERT_EQ(setxattr(f("d2/sub_moved").c_str(), "user.dir", "on a dir", 8, 0), 0);
  ASSERT_EQ(unlink(f("replaced").c_str()), 0);
  ASSERT_EQ(mkdir(f("replaced").c_str(), 0755), 0);
  ASSERT_EQ(put_file(f("replaced/inner"), repl::random_bytes(33, 7777)), 0);
  ASSERT_EQ(patch_file(f("d1/a2.txt"), "renamed and rewritten", 4096), 0);
  REATTACH_SYNCED(m);  // a sync point on the master

  // A local change on the slave's backing directory that the master lacks.
  ASSERT_EQ(put_file(s.backing("extra_local"), "only on the slave"), 0);
  ASSERT_EQ(put_file(s.backing("d1/extra_in_dir"), "only on the slave too"), 0);

  ASSERT_TRUE(c.mount(s));
  REATTACH_SYNCED(m, s.mnt);
  json la = last_attach(s);
  printf("[ info ] re-attach: %s\n", la.dump().c_str());
  EXPECT_EQ(method_of(la), "merkle");
  REATTACH_SAME_TREE(m, s, true);
  struct stat st;
  EXPECT_NE(lstat(s.backing("extra_local").c_str(), &st), 0) << "the slave-only file survived the Merkle re-attach";
  EXPECT_NE(lstat(s.backing("d1/extra_in_dir").c_str(), &st), 0) << "the slave-only file survived the Merkle re-attach";
  CommandResult v = verify(s, false);
  EXPECT_EQ(v.exit_code, 0) << describe(v);
  EXPECT_NE(v.out.find("identical to the master"), std::string::npos) << describe(v);
  // Readers on the slave mount see the new namespace and contents.
  EXPECT_EQ(read_or_error(s.file("d1/a2.txt")), read_or_error(m.file("d1/a2.txt")));
  EXPECT_EQ(read_or_error(s.file("d2/sub_moved/deeper/d")), init["d1/sub/deeper/d"]);
  EXPECT_EQ(read_or_error(s.file("d2/sym")), read_or_error(m.file("d1/a2.txt")));
  EXPECT_EQ(read_or_error(s.file("replaced/inner")), repl::random_bytes(33, 7777));
  EXPECT_NE(stat(s.file("d1/a.txt").c_str(), &st), 0) << "the old name is still visible on the slave mount";
  EXPECT_NE(stat(s.file("tree").c_str(), &st), 0) << "the deleted tree is still visible on the slave mount";
  EXPECT_NE(stat(s.file("extra_local").c_str(), &st), 0) << "the slave-only file is visible on the slave mount";
}

// =============================================================================================
// 4. verify --deep finds data changed behind blockrepl's back on the slave (bit rot).

TEST(ReattachMerkle, VerifyDeepFindsBitRot) {
  Cluster c("reattach-rot");
  Node& m = c.add_master({"--journal-size", "0"});
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(mkdir(m.file("d").c_str(), 0755), 0);
  const std::string orig = repl::random_bytes(41, 1 << 20);
  ASSERT_EQ(put_file(m.file("d/rot.bin"), orig), 0);
  ASSERT_EQ(put_file(m.file("other"), repl::random_bytes(42, 100000)), 0);
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  REATTACH_SYNCED(m, s.mnt);
  REATTACH_SAME_TREE(m, s, true);
  CommandResult v0 = verify(s, true);
  ASSERT_EQ(v0.exit_code, 0) << "verify --deep before any damage: " << describe(v0);

  // 4 KiB in the middle of the file, directly in the slave's backing directory, mtime kept.
  const std::string path = s.backing("d/rot.bin");
  struct stat before;
  ASSERT_EQ(stat(path.c_str(), &before), 0);
  {
    int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << errtext(errno);
    std::string rot = orig.substr(512 * 1024, kBlock);
    for (auto& ch : rot) ch = static_cast<char>(~ch);
    repl::pwrite_all(fd, rot, 512 * 1024);
    ASSERT_EQ(fsync(fd), 0);
    close(fd);
  }
  timespec ts[2] = {before.st_atim, before.st_mtim};
  ASSERT_EQ(utimensat(AT_FDCWD, path.c_str(), ts, 0), 0) << errtext(errno);
  struct stat after;
  ASSERT_EQ(stat(path.c_str(), &after), 0);
  ASSERT_EQ(after.st_size, before.st_size);
  ASSERT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
  ASSERT_NE(read_file(path), orig);

  CommandResult v = verify(s, false);
  printf("[ info ] plain verify after the rot: %s", describe(v).c_str());
  EXPECT_TRUE(v.exit_code == 0 || v.exit_code == 3) << describe(v);
  CommandResult deep = verify(s, true);
  printf("[ info ] verify --deep after the rot: %s", describe(deep).c_str());
  EXPECT_EQ(deep.exit_code, 3) << "verify --deep did not notice 4 KiB changed in the slave's backing file: " << describe(deep);
  EXPECT_TRUE(deep.out.find("rot.bin") != std::string::npos || deep.out.find("differ") != std::string::npos)
      << "verify --deep does not name the damaged file: " << describe(deep);
  if (deep.out.find("rot.bin") == std::string::npos)
    printf("[ info ] verify --deep reports a difference but does not name d/rot.bin\n");
}

// =============================================================================================
// 5. A slave killed at random points of its (Merkle) re-attach always holds a barrier state of the
// master: a SQLite database copied from it opens, passes integrity_check and never loses rows.
// A re-attaching slave mount runs the whole Merkle attach (diff, stage, switch) before the mount
// is offered, so the daemon is killed while its mount command is still running (or, for the
// longer delays, once it streams).

TEST(ReattachCrash, SlaveKilledDuringResyncAlwaysHoldsABarrierState) {
  Cluster c("reattach-kill");
  Node& m = c.add_master({"--journal-size", "0", "--ack-timeout", "2s"});
  ASSERT_TRUE(m.ok());
  const size_t kBallast = 32u << 20;
  ASSERT_EQ(put_file(m.file("ballast"), repl::random_bytes(51, kBallast)), 0);  // churned while the slave is away
  SqliteWriter writer(m.file("db"), 5151);
  ASSERT_EQ(writer.setup(), "");
  writer.start();
  ASSERT_TRUE(writer.wait_progress(200, 20s)) << writer.errors();
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  const uint64_t committed_before_sync = writer.committed();
  ASSERT_EQ(caught_up(m, s), "");
  c.unmount(s);
  ASSERT_FALSE(is_mounted(s.mnt));
  const std::string real_master = s.master_address;
  uint64_t last_rows = committed_before_sync;
  std::mt19937_64 rng(20240611);
  TempDir scratch("reattach-kill-copy");
  const int kRounds = 6;
  int killed_mid_attach = 0;
  int mount_ms_estimate = 100;
  for (int round = 0; round < kRounds && !::testing::Test::HasFatalFailure(); round++) {
    // While the slave is away: more rows, and 16 MiB of the ballast rewritten (so the diff and
    // the stage take a while).
    for (int k = 0; k < 16; k++)
      ASSERT_EQ(patch_file(m.file("ballast"), repl::random_bytes(rng(), 1 << 20),
                           static_cast<off_t>((rng() % (kBallast / kBlock - 256)) * kBlock)),
                0);
    ASSERT_TRUE(writer.wait_progress(300, 20s)) << "round " << round << ": writer stalled: " << writer.errors();
    // Every other round anywhere in 0..400 ms; the others within the time a re-attaching mount
    // took so far (about 100 ms here), where the diff, the stage and the switch happen.
    const int delay_ms = static_cast<int>(rng() % (round % 2 ? 401 : static_cast<uint64_t>(mount_ms_estimate * 5 / 4 + 1)));
    const off_t log_from = log_size(s);
    CommandResult mres;
    std::atomic<bool> mount_done{false};
    Clock::time_point mount_end;
    const auto t0 = Clock::now();
    std::thread mounter([&] {
      mres = run_blockrepl(mount_args(s), 120);
      mount_end = Clock::now();
      mount_done = true;
    });
    pid_t pid = 0;
    const bool found = repl::wait_until([&] { return (pid = find_daemon(s.data)) > 0 || mount_done; }, 20s, 1ms);
    std::this_thread::sleep_until(t0 + std::chrono::milliseconds(delay_ms));
    if (pid <= 0) pid = s.pid();  // the mount was offered before the daemon was seen
    const bool mount_was_done = mount_done;
    bool sent = pid > 0 && kill(pid, SIGKILL) == 0;
    if (sent) sent = repl::wait_dead(pid, 10s);
    mounter.join();
    c.detach(s);
    ASSERT_TRUE(found && sent) << "round " << round << ": could not SIGKILL the slave daemon (pid " << pid
                               << "); mount: " << describe(mres);
    ASSERT_FALSE(is_mounted(s.mnt));
    const std::string out = mres.err + log_since(s, log_from);
    // In a Merkle attach "attached to" is logged after the diff, before the stage is switched.
    std::string phase = out.find("switched to the master's state") != std::string::npos ? "stage switched"
                        : out.find("attached to ") != std::string::npos              ? "diffed, stage not switched"
                        : out.find("Merkle diff with") != std::string::npos          ? "diffed, staging"
                                                                                : "before the diff ended";
    if (!mount_was_done) killed_mid_attach++;
    if (mount_was_done)
      mount_ms_estimate = std::max(20, static_cast<int>(std::chrono::duration<double, std::milli>(mount_end - t0).count()));

    // The state the slave was left in: mounted again, its master unreachable.
    s.master_address = "127.0.0.1:" + std::to_string(free_port());
    const bool mounted = c.mount(s);
    s.master_address = real_master;
    ASSERT_TRUE(mounted) << "round " << round << ": the killed slave cannot be mounted with its master unreachable";
    const std::string redo = lines_with(mount_output(s), "interrupted");
    const std::string dir = scratch.sub("round" + std::to_string(round));
    ASSERT_EQ(copy_file(s.file("db"), dir + "/db"), "") << "round " << round;
    struct stat st;
    const bool has_wal = stat(s.file("db-wal").c_str(), &st) == 0;
    if (has_wal) {
      ASSERT_EQ(copy_file(s.file("db-wal"), dir + "/db-wal"), "") << "round " << round;
    }
    c.unmount(s);
    ASSERT_FALSE(is_mounted(s.mnt));

    Db db(dir + "/db");
    ASSERT_TRUE(db.ok()) << "round " << round << ": " << db.error();
    std::string ic = db.query("PRAGMA integrity_check");
    EXPECT_EQ(ic, "ok") << "round " << round << " (killed after " << delay_ms << " ms, " << phase << "): " << db.error();
    std::string cnt = db.query("SELECT count(*) FROM t");
    ASSERT_FALSE(cnt.empty()) << "round " << round << ": " << db.error();
    std::string maxid = db.query("SELECT coalesce(max(id), 0) FROM t");
    const uint64_t rows = std::stoull(cnt);
    printf("[ info ] round %d: killed %d ms after the mount started (%s; mount %s), slave holds %llu rows (wal %s), "
           "master committed %llu%s%s",
           round, delay_ms, phase.c_str(),
           mount_was_done ? ("had returned after " + std::to_string(static_cast<int>(
                                                        std::chrono::duration<double, std::milli>(mount_end - t0).count())) +
                             " ms")
                                .c_str()
                          : "still running",
           static_cast<unsigned long long>(rows), has_wal ? "present" : "absent",
           static_cast<unsigned long long>(writer.committed()), redo.empty() ? "\n" : "; next mount: ", redo.c_str());
    EXPECT_EQ(maxid, cnt) << "round " << round << ": rows are not a prefix of the master's inserts";
    EXPECT_GE(rows, last_rows) << "round " << round << ": the slave went back in time (killed " << delay_ms
                               << " ms after the mount started, " << phase << ")";
    EXPECT_GE(rows, committed_before_sync) << "round " << round << ": rows the slave once held durably are gone";
    last_rows = std::max(last_rows, rows);
  }
  printf("[ info ] %d of %d kills hit the slave before its mount was offered (during the attach)\n", killed_mid_attach,
         kRounds);

  ASSERT_TRUE(c.mount(s));
  ASSERT_TRUE(writer.wait_progress(50, 20s)) << writer.errors();
  writer.stop();
  EXPECT_EQ(writer.errors(), "");
  REATTACH_SYNCED(m, s.mnt);
  printf("[ info ] final re-attach: %s; %llu rows\n", last_attach(s).dump().c_str(),
         static_cast<unsigned long long>(writer.committed()));
  REATTACH_SAME_TREE(m, s, true);
  CommandResult v = verify(s, false);
  EXPECT_EQ(v.exit_code, 0) << describe(v);
}

// =============================================================================================
// 6. The master is killed mid-writes and restarted; the slave converges by itself.

TEST(ReattachCrash, MasterKilledDuringWritesThenSlaveConverges) {
  Cluster c("reattach-mkill");
  Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(put_file(m.file("base"), repl::random_bytes(61, 4 << 20)), 0);
  REATTACH_SYNCED(m, s.mnt);
  const pid_t slave_pid = s.pid();

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> ops{0};
  std::atomic<bool> writer_done{false};
  std::string last_error;  // read only once writer_done
  std::thread writer([&] {
    std::mt19937_64 rng(6161);
    std::vector<int> fds;
    for (int i = 0; i < 3; i++) {
      int fd = open(m.file("w" + std::to_string(i)).c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
      if (fd < 0) {
        last_error = "open: " + errtext(errno);
        writer_done = true;
        return;
      }
      fds.push_back(fd);
    }
    try {
      while (!stop) {
        int fd = fds[rng() % fds.size()];
        struct stat st;
        if (fstat(fd, &st) != 0) throw std::runtime_error("fstat: " + errtext(errno));
        std::string d = repl::random_bytes(rng(), 1 + rng() % 65536);
        off_t off = (rng() % 3 == 0 || st.st_size == 0) ? st.st_size : static_cast<off_t>(rng() % st.st_size);
        repl::pwrite_all(fd, d, off);
        if (fsync(fd) != 0) throw std::runtime_error("fsync: " + errtext(errno));
        ops++;
      }
    } catch (const std::exception& e) {
      last_error = e.what();  // expected once the master dies
    }
    for (int fd : fds) close(fd);
    writer_done = true;
  });
  struct Joiner {
    std::thread& t;
    std::atomic<bool>& stop;
    ~Joiner() {
      stop = true;
      if (t.joinable()) t.join();
    }
  } joiner{writer, stop};
  ASSERT_TRUE(repl::wait_until([&] { return ops >= 60; }, 20s, 10ms)) << "writer made no progress: " << (writer_done ? last_error : std::string("(still running)"));
  kill_daemon(c, m);
  if (HasFatalFailure()) return;
  stop = true;
  writer.join();
  printf("[ info ] master killed after %llu writes+fsyncs; writer ended with: %s\n",
         static_cast<unsigned long long>(ops.load()), last_error.empty() ? "(no error)" : last_error.c_str());

  const off_t slog = log_size(s);
  auto t0 = Clock::now();
  ASSERT_TRUE(c.mount(m)) << "the master could not be mounted again after SIGKILL";
  std::string state;
  bool streaming = repl::wait_until([&] { return (state = upstream_state(s)) == "streaming"; }, 40s, 100ms);
  ASSERT_TRUE(streaming) << "the slave did not re-attach to the restarted master; upstream state " << state
                         << "; slave daemon " << slave_pid << (repl::process_alive(slave_pid) ? " alive" : " dead")
                         << "; slave mount " << (is_mounted(s.mnt) ? "mounted" : "gone") << "; stderr of the slave's mount:\n"
                         << mount_output(s);
  std::string why = repl::sync_and_wait(m.mnt, {s.mnt}, 40s);
  ASSERT_EQ(why, "") << "the slave did not catch up with the restarted master";
  json la = last_attach(s);
  printf("[ info ] slave re-attached by %s in %.2f s after the master's remount: %s\n", method_of(la).c_str(),
         secs_since(t0), la.dump().c_str());
  EXPECT_TRUE(method_of(la) == "merkle" || method_of(la) == "stream") << "re-attach method " << la.dump()
                                                                         << "; slave log:\n" << log_since(s, slog);
  EXPECT_EQ(s.pid(), slave_pid) << "the slave daemon was replaced instead of reconnecting";
  REATTACH_SAME_TREE(m, s, true);
  CommandResult v = verify(s, false);
  EXPECT_EQ(v.exit_code, 0) << describe(v);
}

// =============================================================================================
// 7. After an unclean stop only the extents touched since the last checkpoint are rehashed.

TEST(ReattachHashes, UncleanStopRehashesOnlyDirtyExtents) {
  Cluster c("reattach-hash");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  const size_t kSize = 64u << 20;
  std::string expect;
  expect.reserve(kSize);
  {
    int fd = open(m.file("big").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0) << errtext(errno);
    for (size_t off = 0; off < kSize; off += 1 << 20) {
      std::string chunk = repl::random_bytes(7000 + off, 1 << 20);
      repl::pwrite_all(fd, chunk, static_cast<off_t>(off));
      expect += chunk;
    }
    ASSERT_EQ(fsync(fd), 0) << errtext(errno);
    close(fd);
  }
  c.unmount(m);
  ASSERT_FALSE(is_mounted(m.mnt));

  static const std::regex kRecovered(
      R"(hash trees of (\S+) recovered after an unclean stop: (\d+) files, (\d+) blocks rehashed)");
  // After a clean unmount: nothing to recover.
  off_t from = log_size(m);
  ASSERT_TRUE(c.mount(m));
  ASSERT_TRUE(repl::wait_until([&] { return repl::status(m.mnt).is_object(); }, 10s));
  std::string lg = mount_output(m) + log_since(m, from);
  EXPECT_EQ(lg.find("recovered after an unclean stop"), std::string::npos)
      << "a mount after a clean unmount recovered hash trees:\n" << lg;

  // Three scattered blocks in three different 4 MiB extents, then SIGKILL.
  const off_t offs[3] = {static_cast<off_t>((5u << 20) + 4096), static_cast<off_t>((30u << 20) + 8192),
                         static_cast<off_t>(60u << 20)};
  {
    int fd = open(m.file("big").c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << errtext(errno);
    for (int i = 0; i < 3; i++) {
      std::string b = repl::random_bytes(9900 + i, kBlock);
      repl::pwrite_all(fd, b, offs[i]);
      expect.replace(static_cast<size_t>(offs[i]), kBlock, b);
    }
    ASSERT_EQ(fsync(fd), 0) << errtext(errno);
    close(fd);
  }
  kill_daemon(c, m);
  if (HasFatalFailure()) return;

  from = log_size(m);
  auto t0 = Clock::now();
  ASSERT_TRUE(c.mount(m));
  const double mount_secs = secs_since(t0);
  lg = mount_output(m) + log_since(m, from);
  std::smatch mt;
  ASSERT_TRUE(std::regex_search(lg, mt, kRecovered))
      << "no 'recovered after an unclean stop' line after a SIGKILL; output and log of that mount:\n" << lg;
  const uint64_t files = std::stoull(mt[2].str()), blocks = std::stoull(mt[3].str());
  printf("[ info ] recovery: %s (mount took %.2f s)\n", mt[0].str().c_str(), mount_secs);
  EXPECT_EQ(mt[1].str(), m.data) << "the recovery line names another directory";
  EXPECT_LE(files, 1u) << "only one file was written to since the last checkpoint";
  EXPECT_LE(blocks, 3u * 1024) << "more than the three dirty 4 MiB extents were rehashed";
  EXPECT_LT(blocks, 16384u / 4) << "the recovery rehashed (close to) the whole 64 MiB file";
  // The data itself is what was fsynced.
  std::string got = read_or_error(m.file("big"));
  EXPECT_EQ(got.size(), expect.size());
  EXPECT_TRUE(got == expect) << "the file's contents differ from what was fsynced before the SIGKILL";
}

// =============================================================================================
// 6. Directories carry the master's mtimes exactly, through streaming, a Merkle re-attach and a
// full copy, and verify compares them.

namespace {

// Changes that touch directories' times in every way a namespace change can, spread out in
// time so that a replica applying them at its own pace would get other times.
void touch_directories(const Node& m, const std::string& tag) {
  auto f = [&](const std::string& rel) { return m.file(tag + "/" + rel); };
  ASSERT_EQ(mkdir(m.file(tag).c_str(), 0755), 0);
  ASSERT_EQ(mkdir(f("d").c_str(), 0755), 0);
  ASSERT_EQ(put_file(f("s"), "source"), 0);
  std::this_thread::sleep_for(1100ms);  // the next changes fall into another second
  ASSERT_EQ(link(f("s").c_str(), f("d/h").c_str()), 0);
  // Several writers creating files in one directory at once.
  ASSERT_EQ(mkdir(f("many").c_str(), 0755), 0);
  std::vector<std::thread> writers;
  for (int w = 0; w < 4; w++)
    writers.emplace_back([&, w] {
      for (int i = 0; i < 25; i++) put_file(f("many/w" + std::to_string(w) + "-" + std::to_string(i)), "x");
    });
  for (auto& t : writers) t.join();
  // mkdir -p, then changes deep down and across directories.
  ASSERT_EQ(mkdir(f("p").c_str(), 0755), 0);
  ASSERT_EQ(mkdir(f("p/q").c_str(), 0755), 0);
  ASSERT_EQ(mkdir(f("p/q/r").c_str(), 0755), 0);
  ASSERT_EQ(symlink("target", f("p/q/r/link").c_str()), 0);
  ASSERT_EQ(put_file(f("p/q/moving"), "m"), 0);
  std::this_thread::sleep_for(600ms);
  ASSERT_EQ(rename(f("p/q/moving").c_str(), f("d/moved").c_str()), 0);
  ASSERT_EQ(unlink(f("many/w0-0").c_str()), 0);
  ASSERT_EQ(mkdir(f("gone").c_str(), 0755), 0);
  ASSERT_EQ(rmdir(f("gone").c_str()), 0);
  // Times set explicitly, and to "now", on a directory.
  const timespec old[2] = {{1000000000, 5}, {1000000000, 123456789}};
  ASSERT_EQ(utimensat(AT_FDCWD, f("p/q").c_str(), old, 0), 0);
  ASSERT_EQ(utimensat(AT_FDCWD, f("p/q/r").c_str(), nullptr, 0), 0);
}

}  // namespace

TEST(ReattachTimes, DirectoriesCarryTheMastersMtimesAndVerifyComparesThem) {
  Cluster c("reattach-dirtimes");
  Node& m = c.add_master({"--journal-size", "0"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());

  // Streaming.
  touch_directories(m, "a");
  if (HasFatalFailure()) return;
  REATTACH_SYNCED(m, s.mnt);
  REATTACH_SAME_TREE(m, s, true);
  CommandResult v = verify(s, false);
  EXPECT_EQ(v.exit_code, 0) << describe(v);
  // What verify compared is the whole tree: every file and directory, not one listing.
  std::smatch counts;
  ASSERT_TRUE(std::regex_search(v.out, counts, std::regex(R"(\((\d+) files and (\d+) directories compared)")))
      << describe(v);
  EXPECT_GE(std::stoull(counts[1].str()), 100u) << describe(v);
  EXPECT_GE(std::stoull(counts[2].str()), 7u) << describe(v);

  // A Merkle re-attach (no journal) after the same kind of changes while the slave was away.
  c.unmount(s);
  touch_directories(m, "b");
  if (HasFatalFailure()) return;
  std::this_thread::sleep_for(1100ms);
  ASSERT_EQ(put_file(m.file("a/d/new-while-away"), "n"), 0);
  ASSERT_TRUE(c.mount(s));
  REATTACH_SYNCED(m, s.mnt);
  EXPECT_EQ(method_of(last_attach(s)), "merkle");
  REATTACH_SAME_TREE(m, s, true);
  v = verify(s, false);
  EXPECT_EQ(v.exit_code, 0) << describe(v);

  // A full copy to a new, empty slave.
  Node& s2 = c.add_slave(m);
  ASSERT_TRUE(s2.ok());
  REATTACH_SYNCED(m, s2.mnt);
  EXPECT_EQ(method_of(last_attach(s2)), "full");
  REATTACH_SAME_TREE(m, s2, true);

  // verify notices a directory time changed behind the replica's back, the root's included.
  const timespec odd[2] = {{0, UTIME_OMIT}, {1234567890, 0}};
  ASSERT_EQ(utimensat(AT_FDCWD, s.backing("a/p").c_str(), odd, AT_SYMLINK_NOFOLLOW), 0);
  v = verify(s, false);
  EXPECT_EQ(v.exit_code, 3) << "verify did not notice a directory's mtime differing: " << describe(v);
  EXPECT_NE(v.out.find("a/p"), std::string::npos) << describe(v);
  ASSERT_EQ(utimensat(AT_FDCWD, s2.backing("").c_str(), odd, AT_SYMLINK_NOFOLLOW), 0);
  v = verify(s2, false);
  EXPECT_EQ(v.exit_code, 3) << "verify did not notice the root's mtime differing: " << describe(v);
}

}  // namespace blockrepl::test
