// Streaming replication on real FUSE mounts: master -> slave -> chained slave on loopback, ack
// levels, late and re-attaching slaves, killed, cut and stalled connections, read-only slaves,
// a vanishing master, operator mistakes and hostile peers. Every comparison is of the backing
// directories (byte for byte, metadata and file ids included) and of what readers see through
// the mounts; every wait is bounded by a deadline.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <algorithm>
#include <arpa/inet.h>
#include <atomic>
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <dirent.h>
#include <endian.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <mutex>
#include <random>
#include <string>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/xattr.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "blockrepl.capnp.h"
#include "harness.h"
#include "proc_fds.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

using namespace std::chrono_literals;
using repl::Clock;
using repl::Cluster;
using repl::ContinueOnExit;
using repl::json;
using repl::Node;

std::string err_text(int e) { return std::string(strerror(e)) + " (errno " + std::to_string(e) + ")"; }

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Writes data to path (create/truncate) and fsyncs it; returns 0 or errno.
int write_and_fsync(const std::string& path, const std::string& data) {
  int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
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

#define EXPECT_SYNCED(master, ...)                                                                 \
  do {                                                                                            \
    std::string why_ = repl::sync_and_wait((master).mnt, {__VA_ARGS__});                          \
    ASSERT_EQ(why_, "") << "slaves did not catch up";                                             \
  } while (0)

#define EXPECT_SAME_TREE(a, b)                                                                     \
  do {                                                                                            \
    std::string d_ = repl::diff_report((a).data, (b).data, {}, (a).name, (b).name);               \
    EXPECT_EQ(d_, "") << "backing directories differ: " << (a).name << " vs " << (b).name;        \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Writers used by several tests

// Appends random chunks to several files and fsyncs after each append until stopped.
class AppendWriter {
 public:
  AppendWriter(std::string dir, int files, uint64_t seed) : dir_(std::move(dir)), files_(files), seed_(seed) {}
  ~AppendWriter() { stop(); }
  void start() {
    thread_ = std::thread([this] { run(); });
  }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  uint64_t appends() const { return appends_; }
  uint64_t bytes() const { return bytes_; }
  std::string errors() {
    std::lock_guard lk(mu_);
    return errors_;
  }
  double max_fsync_seconds() const { return max_fsync_ms_ / 1000.0; }
  // Waits until `more` further appends happened; false after the timeout.
  bool wait_progress(uint64_t more, std::chrono::milliseconds timeout) {
    uint64_t target = appends_ + more;
    return repl::wait_until([&] { return appends_ >= target; }, timeout, 10ms);
  }

 private:
  void run() {
    std::mt19937_64 rng(seed_);
    std::vector<int> fds;
    for (int i = 0; i < files_; i++) {
      std::string p = dir_ + "/append" + std::to_string(i);
      int fd = open(p.c_str(), O_CREAT | O_WRONLY | O_APPEND | O_CLOEXEC, 0644);
      if (fd < 0) {
        fail("open " + p + ": " + err_text(errno));
        return;
      }
      fds.push_back(fd);
    }
    while (!stop_) {
      size_t i = rng() % fds.size();
      std::string chunk = repl::random_bytes(rng(), 1 + rng() % 65536);
      if (write(fds[i], chunk.data(), chunk.size()) != static_cast<ssize_t>(chunk.size())) {
        fail("append to append" + std::to_string(i) + ": " + err_text(errno));
        break;
      }
      auto t0 = Clock::now();
      if (fsync(fds[i]) != 0) {
        fail("fsync append" + std::to_string(i) + ": " + err_text(errno));
        break;
      }
      int64_t ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
      if (ms > max_fsync_ms_) max_fsync_ms_ = ms;
      bytes_ += chunk.size();
      appends_++;
    }
    for (int fd : fds) close(fd);
  }
  void fail(const std::string& e) {
    std::lock_guard lk(mu_);
    errors_ += e + "\n";
  }
  std::string dir_;
  int files_;
  uint64_t seed_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> appends_{0}, bytes_{0};
  std::atomic<int64_t> max_fsync_ms_{0};
  std::mutex mu_;
  std::string errors_;
};

// Some files and directories with varied metadata, so that a full copy has work to do.
void populate(const std::string& root, int files, size_t size, uint64_t seed) {
  mkdir((root + "/pre").c_str(), 0755);
  mkdir((root + "/pre/sub").c_str(), 0700);
  for (int i = 0; i < files; i++) {
    std::string p = root + (i % 3 ? "/pre/f" : "/pre/sub/f") + std::to_string(i);
    write_file(p, repl::random_bytes(seed + i, size + i * 17));
    chmod(p.c_str(), i % 2 ? 0640 : 0604);
    setxattr(p.c_str(), "user.origin", "populate", 8, 0);
  }
  symlink("sub/f0", (root + "/pre/link").c_str());
}

// ---------------------------------------------------------------------------------------------
// SQLite on the master

class Sqlite {
 public:
  Sqlite(const std::string& path, int flags) {
    rc_ = sqlite3_open_v2(path.c_str(), &db_, flags, nullptr);
    if (rc_ != SQLITE_OK) error_ = (db_ ? sqlite3_errmsg(db_) : sqlite3_errstr(rc_)) + std::string(" opening ") + path;
  }
  ~Sqlite() {
    if (db_) sqlite3_close(db_);
  }
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
    return e ? " (" + err_text(e) + ")" : "";
  }

 private:
  sqlite3* db_ = nullptr;
  int rc_ = SQLITE_ERROR;
  std::string error_;
};

// ---------------------------------------------------------------------------------------------
// A random workload on a mount: every kind of change the replication stream carries.

class Workload {
 public:
  Workload(std::string root, uint64_t seed) : root_(std::move(root)), rng_(seed) {}

  void run(int ops) {
    for (int i = 0; i < ops && !::testing::Test::HasFatalFailure(); i++) step();
  }
  std::string recent(size_t n = 25) const {
    std::string s;
    for (size_t i = log_.size() > n ? log_.size() - n : 0; i < log_.size(); i++) s += "  " + log_[i] + "\n";
    return s;
  }
  size_t ops() const { return log_.size(); }

 private:
  struct Item {
    std::string rel;
    char type;  // f, d, l, p
  };
  void list(const std::string& rel, std::vector<Item>& out) {
    std::string dir = rel.empty() ? root_ : root_ + "/" + rel;
    DIR* d = opendir(dir.c_str());
    if (!d) return;
    std::vector<std::pair<std::string, unsigned char>> names;
    while (dirent* de = readdir(d)) {
      std::string n = de->d_name;
      if (n == "." || n == "..") continue;
      if (rel.empty() && (n == "db" || n == "probe" || n == "mm")) continue;  // owned by other parts of the test
      names.push_back({n, de->d_type});
    }
    closedir(d);
    std::sort(names.begin(), names.end());
    for (auto& [n, t] : names) {
      std::string r = rel.empty() ? n : rel + "/" + n;
      struct stat st;
      if (lstat((root_ + "/" + r).c_str(), &st) != 0) continue;
      char type = S_ISREG(st.st_mode) ? 'f' : S_ISDIR(st.st_mode) ? 'd' : S_ISLNK(st.st_mode) ? 'l' : 'p';
      out.push_back({r, type});
      if (type == 'd') list(r, out);
    }
  }
  std::string abs(const std::string& rel) const { return rel.empty() ? root_ : root_ + "/" + rel; }
  uint64_t rnd(uint64_t n) { return n ? rng_() % n : 0; }
  template <class Pred>
  std::string pick(const std::vector<Item>& items, Pred pred) {
    std::vector<std::string> c;
    for (auto& it : items)
      if (pred(it)) c.push_back(it.rel);
    return c.empty() ? std::string("\x01") : c[rnd(c.size())];
  }
  std::string fresh(const std::string& dir) {
    std::string n = "n" + std::to_string(counter_++);
    return dir.empty() ? n : dir + "/" + n;
  }
  void check(bool ok, const std::string& what) {
    if (!ok) ADD_FAILURE() << "workload on the master mount: " << what << ": " << err_text(errno) << "\nrecent ops:\n" << recent();
  }
  static constexpr const char* kNone = "\x01";

  void step() {
    std::vector<Item> items;
    list("", items);
    auto is_file = [](const Item& i) { return i.type == 'f'; };
    auto is_dir = [](const Item& i) { return i.type == 'd'; };
    std::string file = pick(items, is_file);
    std::string dir = rnd(4) == 0 ? std::string() : pick(items, is_dir);
    if (dir == kNone) dir.clear();
    const bool have_file = file != kNone;
    int op = static_cast<int>(rnd(24));
    if (!have_file && op != 6 && op != 13 && op != 17) op = 0;
    std::string desc;
    switch (op) {
      case 0: case 1: {  // create
        std::string p = fresh(dir);
        mode_t mode = std::vector<mode_t>{0644, 0600, 0755, 0640, 0664}[rnd(5)];
        size_t size = rnd(4) == 0 ? 0 : rnd(300000);
        desc = "create " + p + " size " + std::to_string(size);
        log_.push_back(desc);
        int fd = open(abs(p).c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, mode);
        check(fd >= 0, desc);
        if (fd < 0) return;
        if (size) repl::pwrite_all(fd, repl::random_bytes(rng_(), size), 0);
        close(fd);
        return;
      }
      case 2: {  // overwrite a range (write-only descriptor)
        struct stat st;
        stat(abs(file).c_str(), &st);
        off_t off = static_cast<off_t>(rnd(static_cast<uint64_t>(st.st_size) + 8192));
        size_t len = 1 + rnd(65536);
        desc = "pwrite " + file + " @" + std::to_string(off) + " +" + std::to_string(len);
        log_.push_back(desc);
        int fd = open(abs(file).c_str(), (rnd(2) ? O_WRONLY : O_RDWR) | O_CLOEXEC);
        check(fd >= 0, desc);
        if (fd < 0) return;
        repl::pwrite_all(fd, repl::random_bytes(rng_(), len), off);
        close(fd);
        return;
      }
      case 3: {  // append
        size_t len = 1 + rnd(20000);
        desc = "append " + file + " +" + std::to_string(len);
        log_.push_back(desc);
        int fd = open(abs(file).c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
        check(fd >= 0, desc);
        if (fd < 0) return;
        std::string d = repl::random_bytes(rng_(), len);
        check(write(fd, d.data(), d.size()) == static_cast<ssize_t>(d.size()), desc);
        close(fd);
        return;
      }
      case 4: {  // truncate (path) or ftruncate
        struct stat st;
        stat(abs(file).c_str(), &st);
        off_t len = static_cast<off_t>(rnd(static_cast<uint64_t>(st.st_size) * 3 / 2 + 4096));
        desc = "truncate " + file + " to " + std::to_string(len);
        log_.push_back(desc);
        if (rnd(2)) {
          check(truncate(abs(file).c_str(), len) == 0, desc);
        } else {
          int fd = open(abs(file).c_str(), O_RDWR | O_CLOEXEC);
          check(fd >= 0 && ftruncate(fd, len) == 0, desc);
          if (fd >= 0) close(fd);
        }
        return;
      }
      case 5: {  // fallocate: punch a hole, zero a range, or preallocate past EOF
        struct stat st;
        stat(abs(file).c_str(), &st);
        int which = static_cast<int>(rnd(3));
        off_t off = static_cast<off_t>(rnd(static_cast<uint64_t>(st.st_size) + 1));
        if (rnd(2)) off &= ~static_cast<off_t>(4095);
        off_t len = static_cast<off_t>(1 + rnd(40000));
        int mode = which == 0 ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) : which == 1 ? FALLOC_FL_ZERO_RANGE : 0;
        if (which == 2) off = st.st_size;
        desc = std::string(which == 0 ? "punch hole " : which == 1 ? "zero range " : "preallocate ") + file + " @" +
               std::to_string(off) + " +" + std::to_string(len);
        log_.push_back(desc);
        int fd = open(abs(file).c_str(), O_RDWR | O_CLOEXEC);
        // EOPNOTSUPP: the backing file system lacks the mode (tmpfs and zero range), not our concern.
        check(fd >= 0 && (fallocate(fd, mode, off, len) == 0 || errno == EOPNOTSUPP), desc);
        if (fd >= 0) close(fd);
        return;
      }
      case 6: {  // mkdir
        std::string p = fresh(dir);
        mode_t mode = rnd(2) ? 0755 : 0700;
        desc = "mkdir " + p;
        log_.push_back(desc);
        check(mkdir(abs(p).c_str(), mode) == 0, desc);
        return;
      }
      case 7: {  // rmdir of an empty directory, if any
        std::vector<std::string> empty;
        for (auto& it : items) {
          if (it.type != 'd') continue;
          bool has = false;
          for (auto& o : items)
            if (o.rel.size() > it.rel.size() && o.rel.compare(0, it.rel.size() + 1, it.rel + "/") == 0) has = true;
          if (!has) empty.push_back(it.rel);
        }
        if (empty.empty()) return;
        std::string d = empty[rnd(empty.size())];
        desc = "rmdir " + d;
        log_.push_back(desc);
        check(rmdir(abs(d).c_str()) == 0, desc);
        return;
      }
      case 8: {  // rename a file: to a new name, or over another file
        std::string other = pick(items, is_file);
        std::string to = (rnd(3) == 0 && other != kNone && other != file) ? other : fresh(dir);
        desc = "rename " + file + " -> " + to;
        log_.push_back(desc);
        check(rename(abs(file).c_str(), abs(to).c_str()) == 0, desc);
        return;
      }
      case 9: {  // rename a directory somewhere not inside itself
        std::string d = pick(items, is_dir);
        if (d == kNone) return;
        std::string target_dir = dir;
        if (target_dir == d || target_dir.rfind(d + "/", 0) == 0) target_dir.clear();
        std::string to = fresh(target_dir);
        desc = "rename dir " + d + " -> " + to;
        log_.push_back(desc);
        check(rename(abs(d).c_str(), abs(to).c_str()) == 0, desc);
        return;
      }
      case 10: {  // RENAME_EXCHANGE or RENAME_NOREPLACE
        std::string other = pick(items, is_file);
        if (other == kNone || other == file) return;
        if (rnd(2)) {
          desc = "exchange " + file + " <-> " + other;
          log_.push_back(desc);
          check(renameat2(AT_FDCWD, abs(file).c_str(), AT_FDCWD, abs(other).c_str(), RENAME_EXCHANGE) == 0, desc);
        } else {
          std::string to = fresh(dir);
          desc = "rename noreplace " + file + " -> " + to;
          log_.push_back(desc);
          check(renameat2(AT_FDCWD, abs(file).c_str(), AT_FDCWD, abs(to).c_str(), RENAME_NOREPLACE) == 0, desc);
        }
        return;
      }
      case 11: {  // hard link
        std::string to = fresh(dir);
        desc = "link " + file + " -> " + to;
        log_.push_back(desc);
        check(link(abs(file).c_str(), abs(to).c_str()) == 0, desc);
        return;
      }
      case 12: {  // unlink
        desc = "unlink " + file;
        log_.push_back(desc);
        check(unlink(abs(file).c_str()) == 0, desc);
        return;
      }
      case 13: {  // symlink (relative, sometimes dangling, sometimes absolute)
        std::string to = fresh(dir);
        std::string target = rnd(3) == 0 ? "missing/target" + std::to_string(rnd(100)) : rnd(5) == 0 ? "/etc/hostname" : (have_file ? "../" + file : "x");
        desc = "symlink " + to + " -> " + target;
        log_.push_back(desc);
        check(symlink(target.c_str(), abs(to).c_str()) == 0, desc);
        return;
      }
      case 14: {  // set or remove a user xattr on a file or directory
        std::string on = (rnd(3) == 0 && !dir.empty()) ? dir : file;
        std::string name = "user.k" + std::to_string(rnd(4));
        if (rnd(3) == 0) {
          desc = "removexattr " + on + " " + name;
          log_.push_back(desc);
          int rc = removexattr(abs(on).c_str(), name.c_str());
          check(rc == 0 || errno == ENODATA, desc);
        } else {
          std::string v = repl::random_bytes(rng_(), rnd(200));
          desc = "setxattr " + on + " " + name + " (" + std::to_string(v.size()) + " bytes)";
          log_.push_back(desc);
          check(setxattr(abs(on).c_str(), name.c_str(), v.data(), v.size(), 0) == 0, desc);
        }
        return;
      }
      case 15: {  // chmod / chown
        std::string on = (rnd(3) == 0 && !dir.empty()) ? dir : file;
        if (rnd(2)) {
          mode_t m = static_cast<mode_t>(rnd(0777 + 1)) | (on == dir ? 0700 : 0600);
          desc = "chmod " + on + " " + std::to_string(m);
          log_.push_back(desc);
          check(chmod(abs(on).c_str(), m) == 0, desc);
        } else {
          uid_t u = static_cast<uid_t>(1000 + rnd(5));
          gid_t g = static_cast<gid_t>(100 + rnd(5));
          desc = "chown " + on + " " + std::to_string(u) + ":" + std::to_string(g);
          log_.push_back(desc);
          check(chown(abs(on).c_str(), u, g) == 0, desc);
        }
        return;
      }
      case 16: {  // utimens with explicit times
        timespec ts[2] = {{static_cast<time_t>(1500000000 + rnd(100000000)), static_cast<long>(rnd(1000000000))},
                          {static_cast<time_t>(1500000000 + rnd(100000000)), static_cast<long>(rnd(1000000000))}};
        desc = "utimens " + file;
        log_.push_back(desc);
        check(utimensat(AT_FDCWD, abs(file).c_str(), ts, 0) == 0, desc);
        return;
      }
      case 17: {  // fifo
        std::string p = fresh(dir);
        desc = "mkfifo " + p;
        log_.push_back(desc);
        check(mkfifo(abs(p).c_str(), 0640) == 0, desc);
        return;
      }
      case 18: {  // write to a file after it was unlinked, while open; then another file through a second name
        desc = "write after unlink " + file;
        log_.push_back(desc);
        int fd = open(abs(file).c_str(), O_RDWR | O_CLOEXEC);
        check(fd >= 0, desc);
        if (fd < 0) return;
        check(unlink(abs(file).c_str()) == 0, desc);
        repl::pwrite_all(fd, repl::random_bytes(rng_(), 5000), 100);
        check(fsync(fd) == 0, desc + " (fsync)");
        close(fd);
        return;
      }
      case 19: {  // O_SYNC write
        desc = "O_SYNC pwrite " + file;
        log_.push_back(desc);
        int fd = open(abs(file).c_str(), O_WRONLY | O_SYNC | O_CLOEXEC);
        check(fd >= 0, desc);
        if (fd < 0) return;
        repl::pwrite_all(fd, repl::random_bytes(rng_(), 1 + rnd(9000)), static_cast<off_t>(rnd(50000)));
        close(fd);
        return;
      }
      case 20: {  // fsync / fdatasync of a file mid-stream (a barrier)
        desc = "fsync " + file;
        log_.push_back(desc);
        int fd = open(abs(file).c_str(), O_RDONLY | O_CLOEXEC);
        check(fd >= 0 && (rnd(2) ? fsync(fd) : fdatasync(fd)) == 0, desc);
        if (fd >= 0) close(fd);
        return;
      }
      default: {  // overwrite through a shared writable mapping
        std::string p = root_ + "/mm";
        desc = "mmap write mm";
        log_.push_back(desc);
        int fd = open(p.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
        check(fd >= 0, desc);
        if (fd < 0) return;
        const size_t len = 64 * 1024;
        struct stat st;
        fstat(fd, &st);
        if (static_cast<size_t>(st.st_size) < len) check(ftruncate(fd, static_cast<off_t>(len)) == 0, desc + " (ftruncate)");
        void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        check(m != MAP_FAILED, desc + " (mmap)");
        if (m != MAP_FAILED) {
          for (int k = 0; k < 4; k++) {
            size_t off = rnd(len - 300);
            std::string d = repl::random_bytes(rng_(), 300);
            memcpy(static_cast<char*>(m) + off, d.data(), d.size());
          }
          check(msync(m, len, MS_SYNC) == 0, desc + " (msync)");
          munmap(m, len);
        }
        close(fd);
        return;
      }
    }
  }

  std::string root_;
  std::mt19937_64 rng_;
  uint64_t counter_ = 0;
  std::vector<std::string> log_;
};

std::string last_attach_method(const Node& n) {
  json j = repl::status(n.mnt);
  if (!j.is_object() || !j["last_attach"].is_object()) return "<none: " + j.dump() + ">";
  return j["last_attach"].value("method", std::string("<no method>"));
}

}  // namespace

// =============================================================================================
// 0. The comparison itself finds each kind of difference (so that a passing test means something).

TEST(ReplicationUtil, CompareTreesReportsEveryKindOfDifference) {
  TempDir tmp("repl-cmp");
  auto make = [&](const std::string& root) {
    mkdir((root + "/d").c_str(), 0755);
    write_file(root + "/d/f", repl::random_bytes(1, 20000));
    write_file(root + "/g", "same");
    link((root + "/g").c_str(), (root + "/g2").c_str());
    symlink("d/f", (root + "/l").c_str());
    setxattr((root + "/d/f").c_str(), "user.x", "1", 1, 0);
    setxattr((root + "/d/f").c_str(), "trusted.blockrepl.fid", "\x07\0\0\0\0\0\0\0", 8, 0);
    setxattr((root + "/g").c_str(), "trusted.blockrepl.fid", "\x08\0\0\0\0\0\0\0", 8, 0);
    mkdir((root + "/.blockrepl").c_str(), 0700);  // never compared
    write_file(root + "/.blockrepl/state", root);
  };
  std::string a = tmp.sub("a"), b = tmp.sub("b");
  make(a);
  make(b);
  repl::CompareOptions o;
  o.require_fid = false;
  o.dir_mtimes = false;  // trees made by hand: their directories' times differ (checked below)
  ASSERT_EQ(repl::diff_report(a, b, o), "");
  auto expect_found = [&](const std::string& what, const std::string& needle) {
    std::string r = repl::diff_report(a, b, o);
    EXPECT_NE(r.find(needle), std::string::npos) << what << " not reported; report:\n" << r;
  };
  {  // one byte in the middle of a block
    int fd = open((b + "/d/f").c_str(), O_WRONLY);
    repl::pwrite_all(fd, "\x01", 12345);
    close(fd);
    if (repl::random_bytes(1, 20000)[12345] != '\x01') expect_found("content", "d/f: contents differ: 1 bytes differ between offsets 12345 and 12345");
    write_file(b + "/d/f", repl::random_bytes(1, 20000));
  }
  chmod((b + "/g").c_str(), 0600);
  expect_found("mode", "g: mode 100644 (a) vs 100600 (b)");
  chmod((b + "/g").c_str(), 0644);
  chown((b + "/g").c_str(), 1000, 1000);
  expect_found("owner", "g: owner 0:0 (a) vs 1000:1000 (b)");
  chown((b + "/g").c_str(), 0, 0);
  setxattr((b + "/d").c_str(), "user.y", "2", 1, 0);
  expect_found("xattr", "d: xattr user.y only in b");
  removexattr((b + "/d").c_str(), "user.y");
  setxattr((b + "/g").c_str(), "trusted.blockrepl.fid", "\x09\0\0\0\0\0\0\0", 8, 0);
  expect_found("fid", "g: trusted.blockrepl.fid 0800000000000000 (a) vs 0900000000000000 (b)");
  setxattr((b + "/g").c_str(), "trusted.blockrepl.fid", "\x08\0\0\0\0\0\0\0", 8, 0);
  unlink((b + "/l").c_str());
  symlink("d/other", (b + "/l").c_str());
  expect_found("symlink target", "l: symlink target 'd/f' (a) vs 'd/other' (b)");
  unlink((b + "/l").c_str());
  symlink("d/f", (b + "/l").c_str());
  unlink((b + "/g2").c_str());
  write_file(b + "/g2", "same");
  expect_found("hard link", "g: hard-link group {g, g2} (a) vs {} (b)");
  unlink((b + "/g2").c_str());
  link((b + "/g").c_str(), (b + "/g2").c_str());
  truncate((b + "/d/f").c_str(), 100);
  expect_found("size", "d/f: size 20000 (a) vs 100 (b)");
  write_file(b + "/d/f", repl::random_bytes(1, 20000));
  mkdir((b + "/extra").c_str(), 0755);
  expect_found("extra entry", "extra: only in b (dir");
  rmdir((b + "/extra").c_str());
  unlink((b + "/g2").c_str());
  mkdir((b + "/g2").c_str(), 0755);
  expect_found("type", "g2: type file (a) vs dir (b)");
  rmdir((b + "/g2").c_str());
  link((b + "/g").c_str(), (b + "/g2").c_str());
  timespec ts[2] = {{0, UTIME_OMIT}, {1600000000, 5}};
  utimensat(AT_FDCWD, (a + "/g").c_str(), ts, 0);
  ts[1].tv_nsec = 6;
  utimensat(AT_FDCWD, (b + "/g").c_str(), ts, 0);
  o.file_mtimes = true;
  expect_found("mtime", "g: mtime 1600000000.5 (a) vs 1600000000.6 (b)");
  o.file_mtimes = false;
  ts[1] = {1600000000, 7};
  for (const std::string& root : {a, b})
    for (const char* dir : {"/d", "/"}) utimensat(AT_FDCWD, (root + dir).c_str(), ts, 0);
  o.dir_mtimes = true;
  EXPECT_EQ(repl::diff_report(a, b, o), "") << "equal directory times reported as different";
  ts[1].tv_nsec = 8;
  utimensat(AT_FDCWD, (b + "/d").c_str(), ts, 0);
  expect_found("directory mtime", "d: directory mtime 1600000000.7 (a) vs 1600000000.8 (b)");
  o.dir_mtimes = false;
  EXPECT_EQ(repl::diff_report(a, b, o), "") << "the trees should be equal again";
}

// =============================================================================================
// 1. Master -> slave -> chained slave with a random workload and SQLite.

TEST(ReplicationChain, RandomWorkloadAndSqliteReachTwoSlavesInAChain) {
  auto t0 = Clock::now();
  Cluster c("repl-chain");
  Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  Node& s1 = c.add_slave(m, {}, /*listen=*/true);
  ASSERT_TRUE(s1.ok());

  // Readers on the slave see new data: a probe read through the slave mount, changed on the master.
  const std::string probe_a = repl::random_bytes(1, 20000), probe_b = repl::random_bytes(2, 20000);
  const std::string probe_c = repl::random_bytes(3, 7000);
  ASSERT_EQ(write_and_fsync(m.file("probe"), probe_a), 0);
  EXPECT_SYNCED(m, s1.mnt);
  EXPECT_EQ(read_file(s1.file("probe")), probe_a);
  int held = open(s1.file("probe").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(held, 0) << err_text(errno);
  EXPECT_EQ(repl::pread_all(held, 100000, 0), probe_a);

  const uint64_t seed = 0x5eed0001;
  Workload w(m.mnt, seed);
  w.run(150);
  ASSERT_FALSE(::testing::Test::HasFailure()) << "seed " << seed;

  // The chained slave attaches (full copy from slave 1) to a tree with history.
  Node& s2 = c.add_slave(s1);
  ASSERT_TRUE(s2.ok());
  EXPECT_EQ(last_attach_method(s2), "full");

  w.run(250);
  ASSERT_FALSE(::testing::Test::HasFailure()) << "seed " << seed;

  // The probe changes in place (same size) and then shrinks.
  ASSERT_EQ(write_and_fsync(m.file("probe"), probe_b), 0);
  EXPECT_SYNCED(m, s1.mnt, s2.mnt);
  EXPECT_EQ(read_file(s1.file("probe")), probe_b) << "a reader of the slave mount sees stale data";
  EXPECT_EQ(read_file(s2.file("probe")), probe_b) << "a reader of the chained slave mount sees stale data";
  EXPECT_EQ(repl::pread_all(held, 100000, 0), probe_b) << "a descriptor held open on the slave sees stale data";
  ASSERT_EQ(write_and_fsync(m.file("probe"), probe_c), 0);
  EXPECT_SYNCED(m, s1.mnt, s2.mnt);
  EXPECT_EQ(read_file(s1.file("probe")), probe_c) << "a reader of the slave mount sees a stale size or data";
  EXPECT_EQ(repl::pread_all(held, 100000, 0), probe_c) << "a descriptor held open on the slave sees a stale size";
  close(held);

  // SQLite in WAL mode, synchronous=FULL, single-row transactions.
  const int kRows = 2000;
  ASSERT_EQ(mkdir(m.file("db").c_str(), 0755), 0);
  auto ts = Clock::now();
  Sqlite db(m.file("db/test.db"), SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
  ASSERT_TRUE(db.ok()) << db.error();
  ASSERT_EQ(db.query("PRAGMA journal_mode=WAL"), "wal") << db.error();
  ASSERT_TRUE(db.exec("PRAGMA synchronous=FULL")) << db.error();
  ASSERT_TRUE(db.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL, b BLOB)")) << db.error();
  {
    sqlite3_stmt* ins = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db.get(), "INSERT INTO t(id, v, b) VALUES(?, ?, randomblob(?))", -1, &ins, nullptr), SQLITE_OK);
    for (int i = 1; i <= kRows; i++) {
      std::string v = "row-" + std::to_string(i);
      sqlite3_bind_int(ins, 1, i);
      sqlite3_bind_text(ins, 2, v.c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_bind_int(ins, 3, 50 + i % 700);
      int rc = sqlite3_step(ins);
      if (rc != SQLITE_DONE) {
        ADD_FAILURE() << "insert " << i << ": " << sqlite3_errmsg(db.get()) << db.sys_error();
        break;
      }
      sqlite3_reset(ins);
    }
    sqlite3_finalize(ins);
  }
  double sqlite_secs = seconds_since(ts);
  printf("[ info ] %d SQLite single-row transactions on the sync master in %.2f s\n", kRows, sqlite_secs);
  ASSERT_EQ(db.query("SELECT count(*) FROM t"), std::to_string(kRows)) << db.error();

  // Everything, including the open database's WAL and -shm, reaches both slaves.
  EXPECT_SYNCED(m, s1.mnt, s2.mnt);
  EXPECT_EQ(repl::diff_report(m.data, s1.data, {}, "master", "slave1"), "") << "seed " << seed << "\n" << w.recent();
  EXPECT_EQ(repl::diff_report(m.data, s2.data, {}, "master", "slave2"), "") << "seed " << seed;
  EXPECT_EQ(repl::diff_report(s1.data, s2.data, {}, "slave1", "slave2"), "");
  // After a sync point, regular files' mtimes must match too (checked separately so that a
  // difference here is not confused with one in contents or other metadata).
  repl::CompareOptions mtimes_only;
  mtimes_only.file_mtimes = true;
  mtimes_only.contents = false;
  EXPECT_EQ(repl::diff_report(m.data, s1.data, mtimes_only, "master", "slave1"), "") << "regular-file mtimes after a sync point";
  EXPECT_EQ(repl::diff_report(m.data, s2.data, mtimes_only, "master", "slave2"), "") << "regular-file mtimes after a sync point";
  // What readers of the mounts see.
  repl::CompareOptions mounts;
  mounts.fid = false;
  EXPECT_EQ(repl::diff_report(m.mnt, s1.mnt, mounts, "master mount", "slave1 mount"), "");
  EXPECT_EQ(repl::diff_report(m.mnt, s2.mnt, mounts, "master mount", "slave2 mount"), "");

  // The replicated database opens read-only on each slave's backing copy and is complete.
  for (Node* s : {&s1, &s2}) {
    Sqlite ro("file:" + s->backing("db/test.db") + "?mode=ro", SQLITE_OPEN_READONLY | SQLITE_OPEN_URI);
    ASSERT_TRUE(ro.ok()) << s->name << ": " << ro.error();
    EXPECT_EQ(ro.query("PRAGMA integrity_check"), "ok") << s->name << ": " << ro.error();
    EXPECT_EQ(ro.query("SELECT count(*) FROM t"), std::to_string(kRows)) << s->name << ": " << ro.error();
    EXPECT_EQ(ro.query("SELECT v FROM t WHERE id = " + std::to_string(kRows)), "row-" + std::to_string(kRows)) << s->name;
  }
  printf("[ info ] %zu workload ops (seed %llu), total %.1f s\n", w.ops(), static_cast<unsigned long long>(seed), seconds_since(t0));
}

// =============================================================================================
// 2. Ack levels.

TEST(ReplicationAck, SyncFsyncReturnsOnlyOnceTheSlaveBackingHoldsTheData) {
  Cluster c("repl-ack-sync");
  Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());

  int fd = open(m.file("f").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0) << err_text(errno);
  std::string model;
  auto t0 = Clock::now();
  for (int i = 0; i < 200; i++) {
    // Distinct content every round, at a moving offset, sometimes growing the file.
    std::string d = repl::random_bytes(1000 + i, 512 + (i * 337) % 6000);
    size_t off = static_cast<size_t>((i * 7919) % 40) * 1024 + static_cast<size_t>(i % 3);
    repl::pwrite_all(fd, d, static_cast<off_t>(off));
    if (model.size() < off + d.size()) model.resize(off + d.size(), '\0');
    model.replace(off, d.size(), d);
    ASSERT_EQ(fsync(fd), 0) << "round " << i << ": " << err_text(errno);
    // No waiting: the sync barrier already covered the slave.
    std::string got;
    try {
      got = read_file(s.backing("f"));
    } catch (const std::exception& e) {
      FAIL() << "round " << i << ": " << e.what();
    }
    if (got != model) {
      size_t k = 0;
      while (k < got.size() && k < model.size() && got[k] == model[k]) k++;
      FAIL() << "round " << i << ": right after fsync() returned on the sync master, the slave's backing file "
             << s.backing("f") << " has " << got.size() << " bytes (expected " << model.size()
             << "), first difference at byte " << k;
    }
    // Every 20th round also a new file, fsynced: the slave must already have it.
    if (i % 20 == 0) {
      std::string name = "new" + std::to_string(i), content = repl::random_bytes(50000 + i, 3000 + i);
      ASSERT_EQ(write_and_fsync(m.file(name), content), 0);
      std::string there;
      try {
        there = read_file(s.backing(name));
      } catch (const std::exception& e) {
        FAIL() << "round " << i << ": fsync of the new file " << name << " returned but the slave lacks it: " << e.what();
      }
      ASSERT_EQ(there, content) << "round " << i << ": " << name << " on the slave right after fsync";
    }
  }
  close(fd);
  printf("[ info ] 200 write+fsync rounds in sync mode: %.2f s\n", seconds_since(t0));
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_SAME_TREE(m, s);
}

TEST(ReplicationAck, AsyncFsyncDoesNotWaitForAStoppedSlave) {
  Cluster c("repl-ack-async");
  Node& m = c.add_master({"--ack", "async", "--ack-timeout", "10s"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(write_and_fsync(m.file("a"), "before"), 0);
  EXPECT_SYNCED(m, s.mnt);

  pid_t pid = s.pid();
  ASSERT_TRUE(repl::process_alive(pid)) << "no slave daemon pid in " << s.data << "/.blockrepl/daemon.pid";
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  ContinueOnExit cont(pid);
  double worst = 0;
  for (int i = 0; i < 5; i++) {
    auto t0 = Clock::now();
    ASSERT_EQ(write_and_fsync(m.file("a" + std::to_string(i)), repl::random_bytes(i, 100000)), 0);
    worst = std::max(worst, seconds_since(t0));
  }
  EXPECT_LT(worst, 2.0) << "an async master's fsync waited for a stopped slave (ack timeout is 10 s)";
  cont.cont();
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_SAME_TREE(m, s);
}

TEST(ReplicationAck, SyncDropsAStoppedSlaveAfterTheAckTimeoutAndCarriesOn) {
  Cluster c("repl-ack-drop");
  Node& m = c.add_master({"--ack", "sync", "--ack-timeout", "1s"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(write_and_fsync(m.file("a"), "before"), 0);
  EXPECT_SYNCED(m, s.mnt);

  pid_t pid = s.pid();
  ASSERT_TRUE(repl::process_alive(pid));
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  ContinueOnExit cont(pid);
  auto t0 = Clock::now();
  ASSERT_EQ(write_and_fsync(m.file("b"), repl::random_bytes(7, 50000)), 0);
  double first = seconds_since(t0);
  EXPECT_LT(first, 5.0) << "fsync with a stopped sync slave and --ack-timeout 1s";
  // Dropped: further barriers no longer wait (five that each waited out the 1 s timeout would
  // take 5 s or more).
  double worst = 0;
  auto t1 = Clock::now();
  for (int i = 0; i < 5; i++) {
    auto t2 = Clock::now();
    ASSERT_EQ(write_and_fsync(m.file("c" + std::to_string(i)), repl::random_bytes(100 + i, 30000)), 0);
    worst = std::max(worst, seconds_since(t2));
  }
  double five = seconds_since(t1);
  EXPECT_LT(five, 2.5) << "five write+fsync rounds after the drop took " << five << " s (slowest " << worst
                       << " s): fsync still waits for the dropped slave";
  EXPECT_EQ(read_file(m.file("b")), repl::random_bytes(7, 50000));
  printf("[ info ] first fsync with the stopped slave: %.2f s, the next five %.2f s (slowest %.2f s)\n", first, five, worst);
  cont.cont();
  // It comes back by itself and converges.
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_SAME_TREE(m, s);
}

TEST(ReplicationAck, MinSyncSlavesMakesFsyncFailWithEioInsteadOfHanging) {
  Cluster c("repl-ack-min");
  Node& m = c.add_master({"--ack", "sync", "--ack-timeout", "1s", "--min-sync-slaves", "1"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(write_and_fsync(m.file("a"), "before"), 0);
  EXPECT_SYNCED(m, s.mnt);

  pid_t pid = s.pid();
  ASSERT_TRUE(repl::process_alive(pid));
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  ContinueOnExit cont(pid);
  auto t0 = Clock::now();
  int rc = write_and_fsync(m.file("b"), "needs a slave");
  double secs = seconds_since(t0);
  EXPECT_EQ(rc, EIO) << "fsync with --min-sync-slaves 1 and the only slave stopped: got " << err_text(rc) << " after "
                     << secs << " s";
  EXPECT_LT(secs, 10.0) << "fsync took too long to fail";
  EXPECT_GE(secs, 0.5) << "fsync failed before the ack timeout";
  cont.cont();
  // Once the slave is back, barriers succeed again.
  bool back = repl::wait_until(
      [&] {
        json j = repl::status(m.mnt);
        if (!j.is_object()) return false;
        for (auto& sl : j["slaves"])
          if (sl.value("state", "") == "streaming") return true;
        return false;
      },
      30s, 100ms);
  EXPECT_TRUE(back) << "the slave did not come back: " << repl::status(m.mnt).dump();
  int rc2 = EIO;
  repl::wait_until([&] { return (rc2 = write_and_fsync(m.file("c"), "slave is back")) == 0; }, 15s, 200ms);
  EXPECT_EQ(rc2, 0) << "fsync still fails after the slave came back: " << err_text(rc2);
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_SAME_TREE(m, s);
}

// =============================================================================================
// 3. A late empty slave attaches while the master is written continuously.

TEST(ReplicationAttach, LateEmptySlaveAttachesDuringContinuousWrites) {
  Cluster c("repl-late");
  Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  populate(m.mnt, 40, 1500000, 77);  // 60 MB: the copy takes a while
  AppendWriter writer(m.mnt, 4, 4242);
  writer.start();
  ASSERT_TRUE(writer.wait_progress(30, 20s)) << writer.errors();
  Node& s = c.define_slave(m);
  auto t0 = Clock::now();
  const uint64_t before_attach = writer.appends();
  ASSERT_TRUE(c.mount(s));
  const uint64_t at_attach = writer.appends();
  const double attach_secs = seconds_since(t0);
  printf("[ info ] full copy while writing: mount returned after %.2f s; %llu appends+fsyncs on the master meanwhile\n",
         attach_secs, static_cast<unsigned long long>(at_attach - before_attach));
  if (attach_secs > 1.0) {
    EXPECT_GT(at_attach, before_attach) << "the master's writes stood still during the " << attach_secs << " s full copy";
  }
  EXPECT_TRUE(writer.wait_progress(40, 30s)) << "the writer stalled after the slave attached: " << writer.errors();
  writer.stop();
  EXPECT_EQ(writer.errors(), "");
  EXPECT_LT(writer.max_fsync_seconds(), 5.0) << "an fsync on the master waited that long during the attach";
  EXPECT_EQ(last_attach_method(s), "full");
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_SAME_TREE(m, s);
  repl::CompareOptions mounts;
  mounts.fid = false;
  EXPECT_EQ(repl::diff_report(m.mnt, s.mnt, mounts, "master mount", "slave mount"), "");
}

// =============================================================================================
// 4. A slave killed with SIGKILL mid-stream comes back by being mounted again.

TEST(ReplicationFaults, SlaveKilledMidStreamCatchesUpByStream) {
  Cluster c("repl-kill");
  Node& m = c.add_master({"--ack", "sync", "--ack-timeout", "2s"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  AppendWriter writer(m.mnt, 3, 99);
  writer.start();
  ASSERT_TRUE(writer.wait_progress(30, 20s)) << writer.errors();

  pid_t pid = s.pid();
  ASSERT_TRUE(repl::process_alive(pid));
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  ASSERT_TRUE(repl::wait_dead(pid, 10s)) << "the slave daemon survived SIGKILL";
  c.detach(s);
  EXPECT_FALSE(is_mounted(s.mnt));
  EXPECT_TRUE(writer.wait_progress(30, 20s)) << "the master stopped serving writes after its slave died: " << writer.errors();

  // Mounted again on the same data directory while the writes go on.
  ASSERT_TRUE(c.mount(s));
  EXPECT_TRUE(writer.wait_progress(30, 20s)) << writer.errors();
  writer.stop();
  EXPECT_EQ(writer.errors(), "");
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_EQ(last_attach_method(s), "stream") << "the journal (256M) still covers the outage";
  EXPECT_SAME_TREE(m, s);
  printf("[ info ] writer: %llu appends, %llu bytes, slowest fsync %.2f s\n", static_cast<unsigned long long>(writer.appends()),
         static_cast<unsigned long long>(writer.bytes()), writer.max_fsync_seconds());
}

// =============================================================================================
// 5. The connection is cut in the middle of a large write; the slave reconnects by itself.

TEST(ReplicationFaults, ConnectionCutMidBatchReconnectsAndConverges) {
  Cluster c("repl-cut");
  Node& m = c.add_master({"--ack", "sync", "--ack-timeout", "2s"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  const pid_t pid = s.pid();

  const size_t kChunk = 1 << 20, kChunks = 48;
  std::atomic<size_t> written{0};
  std::string write_error;
  std::thread big([&] {
    int fd = open(m.file("big").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    if (fd < 0) {
      write_error = "open big: " + err_text(errno);
      return;
    }
    try {
      for (size_t i = 0; i < kChunks; i++) {
        repl::pwrite_all(fd, repl::random_bytes(9000 + i, kChunk), static_cast<off_t>(i * kChunk));
        written = i + 1;
        if (i % 8 == 7 && fsync(fd) != 0) throw std::runtime_error("fsync big: " + err_text(errno));
      }
      if (fsync(fd) != 0) throw std::runtime_error("final fsync big: " + err_text(errno));
    } catch (const std::exception& e) {
      write_error = e.what();
    }
    close(fd);
  });
  repl::wait_until([&] { return written >= 10; }, 30s, 5ms);
  // Kill the slave's end of the connection (the peer gets a reset); fall back to SIGKILL.
  CommandResult ss = run_command({"ss", "-K", "-t", "-n", "dst", "127.0.0.1:" + std::to_string(m.port)}, 10);
  const bool cut = ss.exit_code == 0 && ss.out.find("127.0.0.1:" + std::to_string(m.port)) != std::string::npos;
  printf("[ info ] cut at %zu MiB of %zu written: %s\n", written.load(), kChunks,
         cut ? "ss -K killed the connection" : "ss -K unavailable, SIGKILL instead");
  if (!cut) {
    kill(pid, SIGKILL);
    ASSERT_TRUE(repl::wait_dead(pid, 10s));
    c.detach(s);
  }
  big.join();
  EXPECT_EQ(write_error, "") << "the master failed the application's write because a slave's connection broke";
  if (!cut) {
    ASSERT_TRUE(c.mount(s));
  }
  EXPECT_SYNCED(m, s.mnt);
  if (cut) {
    EXPECT_EQ(s.pid(), pid) << "the slave daemon was replaced instead of reconnecting";
  }
  EXPECT_TRUE(repl::process_alive(pid) || !cut);
  printf("[ info ] slave re-attached by %s\n", last_attach_method(s).c_str());
  EXPECT_SAME_TREE(m, s);
  EXPECT_EQ(read_file(s.file("big")).size(), kChunk * kChunks);
}

// =============================================================================================
// 6. A slave that stops reading is dropped after the ack timeout; the master keeps serving.

TEST(ReplicationFaults, StalledSlaveIsDroppedAndMasterKeepsServing) {
  Cluster c("repl-stall");
  Node& m = c.add_master({"--ack", "sync", "--ack-timeout", "1s"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(write_and_fsync(m.file("a"), "x"), 0);
  EXPECT_SYNCED(m, s.mnt);
  pid_t pid = s.pid();
  ASSERT_TRUE(repl::process_alive(pid));
  ASSERT_EQ(kill(pid, SIGSTOP), 0);
  ContinueOnExit cont(pid);

  // Enough data to fill every socket buffer between them, with barriers.
  int fd = open(m.file("stall").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  const size_t kChunk = 2 << 20;
  double worst = 0;
  auto t0 = Clock::now();
  for (size_t i = 0; i < 12; i++) {
    repl::pwrite_all(fd, repl::random_bytes(300 + i, kChunk), static_cast<off_t>(i * kChunk));
    auto t1 = Clock::now();
    ASSERT_EQ(fsync(fd), 0) << "chunk " << i << ": " << err_text(errno);
    worst = std::max(worst, seconds_since(t1));
  }
  close(fd);
  printf("[ info ] 24 MiB with a stalled slave: %.2f s, slowest fsync %.2f s\n", seconds_since(t0), worst);
  EXPECT_LT(worst, 5.0) << "a barrier waited far longer than --ack-timeout 1s for a stalled slave";
  json last;
  bool gone = repl::wait_until(
      [&] {
        last = repl::status(m.mnt);
        if (!last.is_object()) return false;
        for (auto& sl : last["slaves"])
          if (sl.value("state", "") == "streaming") return false;
        return true;
      },
      15s, 100ms);
  EXPECT_TRUE(gone) << "the master still lists the stalled slave as streaming: " << last.dump();
  // The master mount still works.
  ASSERT_EQ(write_and_fsync(m.file("after"), "still serving"), 0);
  EXPECT_EQ(read_file(m.file("after")), "still serving");
  EXPECT_EQ(read_file(m.file("stall")).size(), 12 * kChunk);
  cont.cont();
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_SAME_TREE(m, s);
}

// =============================================================================================
// 7. Slave mounts are read-only.

TEST(ReplicationReadOnly, EveryChangeOnASlaveMountFailsWithErofs) {
  Cluster c("repl-ro");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(mkdir(m.file("dir").c_str(), 0755), 0);
  ASSERT_EQ(mkdir(m.file("empty").c_str(), 0755), 0);
  ASSERT_EQ(write_and_fsync(m.file("dir/file"), "content"), 0);
  ASSERT_EQ(setxattr(m.file("dir/file").c_str(), "user.a", "1", 1, 0), 0);
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  EXPECT_SYNCED(m, s.mnt);
  const std::string f = s.file("dir/file");
  EXPECT_EQ(read_file(f), "content");

  auto expect_erofs = [&](const std::string& what, int rc) {
    int e = errno;
    EXPECT_EQ(rc, -1) << what << " on the slave mount succeeded";
    if (rc == -1) {
      EXPECT_EQ(e, EROFS) << what << " on the slave mount: " << err_text(e);
    }
  };
  auto open_rc = [](const std::string& p, int flags) {
    int fd = open(p.c_str(), flags | O_CLOEXEC, 0644);
    if (fd >= 0) {
      close(fd);
      return 0;
    }
    return -1;
  };
  expect_erofs("open O_WRONLY", open_rc(f, O_WRONLY));
  expect_erofs("open O_RDWR", open_rc(f, O_RDWR));
  expect_erofs("open O_RDONLY|O_TRUNC", open_rc(f, O_RDONLY | O_TRUNC));
  expect_erofs("open O_CREAT", open_rc(s.file("dir/new"), O_CREAT | O_WRONLY));
  expect_erofs("mkdir", mkdir(s.file("newdir").c_str(), 0755));
  expect_erofs("unlink", unlink(f.c_str()));
  expect_erofs("rmdir", rmdir(s.file("empty").c_str()));
  expect_erofs("rename", rename(f.c_str(), s.file("dir/renamed").c_str()));
  expect_erofs("setxattr", setxattr(f.c_str(), "user.b", "2", 1, 0));
  expect_erofs("removexattr", removexattr(f.c_str(), "user.a"));
  expect_erofs("truncate", truncate(f.c_str(), 0));
  expect_erofs("chmod", chmod(f.c_str(), 0600));
  expect_erofs("chown", chown(f.c_str(), 1234, 1234));
  expect_erofs("utimensat", utimensat(AT_FDCWD, f.c_str(), nullptr, 0));
  expect_erofs("symlink", symlink("x", s.file("sym").c_str()));
  expect_erofs("link", link(f.c_str(), s.file("hard").c_str()));
  expect_erofs("mkfifo", mkfifo(s.file("fifo").c_str(), 0644));
  // Reads still work, and nothing changed on either side.
  EXPECT_EQ(read_file(f), "content");
  char v[8] = {0};
  EXPECT_EQ(getxattr(f.c_str(), "user.a", v, sizeof v), 1);
  EXPECT_SAME_TREE(m, s);
}

// =============================================================================================
// 8. A master that goes away and comes back; --exit-on-disconnect.

TEST(ReplicationMasterLoss, SlaveKeepsServingReadsAndResumesWhenTheMasterReturns) {
  Cluster c("repl-loss");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  const std::string before = repl::random_bytes(5, 123456);
  ASSERT_EQ(write_and_fsync(m.file("before"), before), 0);
  EXPECT_SYNCED(m, s.mnt);
  const pid_t pid = s.pid();

  c.unmount(m);
  ASSERT_FALSE(is_mounted(m.mnt));
  json last;
  bool noticed = repl::wait_until(
      [&] {
        last = repl::status(s.mnt);
        return last.is_object() && last["upstream"].is_object() && last["upstream"].value("state", "") == "disconnected";
      },
      20s, 100ms);
  EXPECT_TRUE(noticed) << "the slave's status does not show the master as disconnected: " << last.dump();
  EXPECT_EQ(read_file(s.file("before")), before) << "the slave stopped serving reads without its master";
  EXPECT_TRUE(repl::process_alive(pid));

  // The master comes back with the same data on the same port and takes new writes.
  ASSERT_TRUE(c.mount(m)) << "the master could not be mounted again on port " << m.port;
  const std::string after = repl::random_bytes(6, 54321);
  ASSERT_EQ(write_and_fsync(m.file("after"), after), 0);
  std::string why = repl::sync_and_wait(m.mnt, {s.mnt}, 40s);
  EXPECT_EQ(why, "") << "the slave did not re-attach by itself";
  EXPECT_EQ(repl::process_alive(pid) ? s.pid() : 0, pid) << "the slave daemon was not the same process";
  std::string got;
  try {
    got = read_file(s.file("after"));
  } catch (const std::exception& e) {
    got = e.what();
  }
  EXPECT_EQ(got, after) << "new writes are not visible through the slave mount";
  printf("[ info ] re-attached by %s\n", last_attach_method(s).c_str());
  EXPECT_SAME_TREE(m, s);
}

TEST(ReplicationMasterLoss, ExitOnDisconnectEndsTheSlaveDaemon) {
  Cluster c("repl-exit");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m, {"--exit-on-disconnect"});
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(write_and_fsync(m.file("x"), "x"), 0);
  EXPECT_SYNCED(m, s.mnt);
  const pid_t pid = s.pid();
  ASSERT_TRUE(repl::process_alive(pid));
  c.unmount(m);
  EXPECT_TRUE(repl::wait_dead(pid, 20s)) << "the --exit-on-disconnect slave daemon (pid " << pid
                                          << ") is still running 20 s after its master was unmounted";
  struct stat st;
  errno = 0;
  bool usable = is_mounted(s.mnt) && stat(s.file("x").c_str(), &st) == 0;
  EXPECT_FALSE(usable) << "the slave mount still serves files although its daemon should have exited";
  c.detach(s);
  EXPECT_FALSE(is_mounted(s.mnt));
}

// =============================================================================================
// 9. Operator mistakes: one clear line on stderr, non-zero exit, nothing lost, never a hang.

namespace {

constexpr int kBadInputTimeout = 30;

// Runs blockrepl mount args and checks the error contract.
void expect_refused(const std::vector<std::string>& args, const std::vector<std::string>& mentions, const std::string& mnt) {
  std::string cmd = "blockrepl";
  for (auto& a : args) cmd += " " + a;
  auto t0 = Clock::now();
  CommandResult r = run_blockrepl(args, kBadInputTimeout);
  double secs = seconds_since(t0);
  EXPECT_NE(r.exit_code, -1) << cmd << ": hung, killed after " << kBadInputTimeout << " s; stderr: " << r.err;
  EXPECT_NE(r.exit_code, 0) << cmd << ": succeeded but should have been refused; stderr: " << r.err;
  std::string line = r.err;
  while (!line.empty() && line.back() == '\n') line.pop_back();
  EXPECT_FALSE(line.empty()) << cmd << ": no message on stderr";
  EXPECT_EQ(line.find('\n'), std::string::npos) << cmd << ": the message spans several lines:\n" << r.err;
  std::string lower = line;
  for (auto& ch : lower) ch = static_cast<char>(tolower(static_cast<unsigned char>(ch)));
  for (auto& w : mentions) {
    std::string lw = w;
    for (auto& ch : lw) ch = static_cast<char>(tolower(static_cast<unsigned char>(ch)));
    EXPECT_NE(lower.find(lw), std::string::npos) << cmd << ": the message does not mention '" << w << "': " << r.err;
  }
  printf("[ info ] %.2f s, exit %d: %s\n", secs, r.exit_code, line.c_str());
  if (is_mounted(mnt)) {
    ADD_FAILURE() << cmd << ": left " << mnt << " mounted";
    run_blockrepl({"umount", mnt}, 30);
    if (is_mounted(mnt)) run_command({"fusermount3", "-u", "-z", mnt}, 30);
  }
}

}  // namespace

TEST(ReplicationBadInput, EmptySlaveWithUnreachableMaster) {
  TempDir tmp("repl-bad-unreach");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  std::string addr = "127.0.0.1:" + std::to_string(free_port());
  expect_refused({"mount", "--data", data, "--master", addr, mnt}, {addr}, mnt);
}

TEST(ReplicationBadInput, ListenPortAlreadyInUse) {
  TempDir tmp("repl-bad-port");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  write_file(data + "/keep", "precious");
  // Nothing lost: contents and metadata stay (a fresh volume may get its file ids tagged).
  auto before = repl::manifest(data, false);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(listen(fd, 4), 0);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  std::string port = std::to_string(ntohs(a.sin_port));
  expect_refused({"mount", "--data", data, "--listen", "127.0.0.1:" + port, mnt}, {port}, mnt);
  close(fd);
  EXPECT_EQ(repl::manifest_diff(before, repl::manifest(data, false)), "");
  EXPECT_EQ(read_file(data + "/keep"), "precious");
}

TEST(ReplicationBadInput, BlockSizeMismatchIsRefused) {
  Cluster c("repl-bad-bs");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(write_and_fsync(m.file("f"), "data"), 0);
  Node& s = c.define_slave(m);
  expect_refused({"mount", "--data", s.data, "--master", m.address(), "--block-size", "8192", s.mnt}, {"block size"}, s.mnt);
  // The master is not disturbed.
  ASSERT_EQ(write_and_fsync(m.file("g"), "more"), 0);
  EXPECT_EQ(read_file(m.file("f")), "data");
}

TEST(ReplicationBadInput, ClusterMismatchIsRefusedAndKeepsTheReplica) {
  Cluster c("repl-bad-cluster");
  Node& a = c.add_master();
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(write_and_fsync(a.file("from-a"), repl::random_bytes(11, 30000)), 0);
  Node& s = c.add_slave(a);
  ASSERT_TRUE(s.ok());
  EXPECT_SYNCED(a, s.mnt);
  c.unmount(s);
  auto before = repl::manifest(s.data);

  Node& b = c.add_master();  // unrelated: a cluster of its own
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(write_and_fsync(b.file("from-b"), "b"), 0);
  expect_refused({"mount", "--data", s.data, "--master", b.address(), "--log-file", s.log, s.mnt}, {"cluster"}, s.mnt);
  // If the daemon went on in the background, give it time to do damage before checking.
  pid_t stray = s.pid();
  if (stray) {
    EXPECT_TRUE(repl::wait_dead(stray, 15s)) << "a daemon for the refused replica is still running";
  }
  EXPECT_EQ(repl::manifest_diff(before, repl::manifest(s.data)), "") << "the refused mount changed the replica";
  // The replica still belongs to A and follows it.
  if (is_mounted(s.mnt)) c.detach(s);
  ASSERT_TRUE(c.mount(s));
  ASSERT_EQ(write_and_fsync(a.file("later"), "later"), 0);
  EXPECT_SYNCED(a, s.mnt);
  EXPECT_SAME_TREE(a, s);
}

TEST(ReplicationBadInput, BadAckValue) {
  TempDir tmp("repl-bad-ack");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  std::string addr = "127.0.0.1:" + std::to_string(free_port());
  expect_refused({"mount", "--data", data, "--listen", addr, "--ack", "sometimes", mnt}, {"--ack", "sometimes"}, mnt);
}

TEST(ReplicationBadInput, BadAckTimeout) {
  TempDir tmp("repl-bad-timeout");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  std::string addr = "127.0.0.1:" + std::to_string(free_port());
  for (std::string v : {"soon", "-5s", "0", "5 parsecs"})
    expect_refused({"mount", "--data", data, "--listen", addr, "--ack-timeout", v, mnt}, {"--ack-timeout"}, mnt);
}

// =============================================================================================
// 10. Hostile peers on the master's port.

namespace {

int connect_raw(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

bool send_raw(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n) {
    ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
    if (w <= 0) return false;
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// Frames a message as proto/blockrepl.capnp says: 4-byte little-endian length, then the message.
std::string frame_of(capnp::MessageBuilder& mb) {
  kj::Array<capnp::word> flat = capnp::messageToFlatArray(mb);
  auto bytes = flat.asBytes();
  uint32_t len = htole32(static_cast<uint32_t>(bytes.size()));
  std::string out(reinterpret_cast<const char*>(&len), 4);
  out.append(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
  return out;
}

// Reads exactly n bytes with a deadline; false on EOF, error or timeout.
bool read_exact(int fd, void* buf, size_t n, Clock::time_point deadline) {
  char* p = static_cast<char*>(buf);
  while (n) {
    int ms = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (ms <= 0) return false;
    pollfd pfd{fd, POLLIN, 0};
    if (poll(&pfd, 1, ms) <= 0) continue;
    ssize_t r = read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

struct Received {
  bool got_frame = false;
  std::string which;  // "error", "welcome", ...
  std::string reason;
  bool closed = false;  // EOF or reset seen
  double seconds = 0;
};

// Reads an optional first frame, then waits for the peer to close the connection.
Received read_reply_and_close(int fd, std::chrono::milliseconds timeout) {
  Received r;
  auto t0 = Clock::now(), deadline = t0 + timeout;
  uint32_t len_le = 0;
  char first[4];
  size_t have = 0;
  // First bytes: either a frame or the end of the connection.
  for (;;) {
    int ms = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (ms <= 0) break;
    pollfd pfd{fd, POLLIN, 0};
    if (poll(&pfd, 1, ms) <= 0) continue;
    ssize_t n = read(fd, first + have, 4 - have);
    if (n <= 0) {
      r.closed = true;
      break;
    }
    have += static_cast<size_t>(n);
    if (have < 4) continue;
    memcpy(&len_le, first, 4);
    uint32_t len = le32toh(len_le);
    if (len == 0 || len % 8 || len > (64u << 20)) {
      r.which = "<bad frame length " + std::to_string(len) + ">";
      break;
    }
    auto words = kj::heapArray<capnp::word>(len / 8);
    if (!read_exact(fd, words.begin(), len, deadline)) {
      r.closed = true;
      break;
    }
    r.got_frame = true;
    try {
      capnp::FlatArrayMessageReader reader(words.asPtr());
      auto msg = reader.getRoot<wire::Message>();
      switch (msg.which()) {
        case wire::Message::ERROR:
          r.which = "error";
          r.reason = msg.getError().getReason().cStr();
          break;
        case wire::Message::WELCOME: r.which = "welcome"; break;
        default: r.which = "message #" + std::to_string(static_cast<int>(msg.which())); break;
      }
    } catch (const kj::Exception& e) {
      r.which = std::string("<undecodable: ") + e.getDescription().cStr() + ">";
    }
    break;
  }
  // Then the connection must end: drain until EOF/reset.
  while (!r.closed) {
    int ms = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (ms <= 0) break;
    pollfd pfd{fd, POLLIN, 0};
    if (poll(&pfd, 1, ms) <= 0) continue;
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) r.closed = true;
  }
  r.seconds = seconds_since(t0);
  return r;
}

// The master survived: its daemon lives, its mount takes a write and an fsync promptly.
void expect_master_fine(const Node& m, pid_t pid, const std::string& after) {
  EXPECT_TRUE(repl::process_alive(pid)) << "the master daemon died after " << after;
  auto t0 = Clock::now();
  std::string content = "fine after " + after;
  EXPECT_EQ(write_and_fsync(m.file("probe"), content), 0) << "after " << after;
  EXPECT_EQ(read_file(m.file("probe")), content) << "after " << after;
  EXPECT_LT(seconds_since(t0), 5.0) << "the master mount is slow after " << after;
}

}  // namespace

TEST(ReplicationHostilePeer, MasterSurvivesMalformedAndHostileConnections) {
  Cluster c("repl-hostile");
  Node& m = c.add_master({"--ack", "sync", "--ack-timeout", "2s"});
  ASSERT_TRUE(m.ok());
  populate(m.mnt, 6, 10000, 5);
  const pid_t pid = m.pid();
  ASSERT_TRUE(repl::process_alive(pid));
  auto before = repl::manifest(m.data);

  {  // (a) Hello with protocol version 99: an error naming the protocol version, then the end.
    int fd = connect_raw(m.port);
    ASSERT_GE(fd, 0) << err_text(errno);
    capnp::MallocMessageBuilder mb;
    auto h = mb.initRoot<wire::Message>().initHello();
    h.setProtocolVersion(99);
    h.setNodeId("hostile-node");
    h.setBlockSize(4096);
    h.setHashAlgorithm("xxh3-128");
    h.setAckLevel(wire::AckLevel::SYNC);
    h.setEmpty(true);
    std::string f = frame_of(mb);
    ASSERT_TRUE(send_raw(fd, f.data(), f.size()));
    Received r = read_reply_and_close(fd, 10s);
    close(fd);
    EXPECT_TRUE(r.got_frame) << "no answer to a hello with protocol version 99";
    EXPECT_EQ(r.which, "error");
    std::string lower = r.reason;
    for (auto& ch : lower) ch = static_cast<char>(tolower(static_cast<unsigned char>(ch)));
    EXPECT_NE(lower.find("protocol version"), std::string::npos) << "error reason: " << r.reason;
    EXPECT_TRUE(r.closed) << "the master kept the connection open after refusing protocol version 99";
    printf("[ info ] protocol 99: %s '%s', closed=%d after %.2f s\n", r.which.c_str(), r.reason.c_str(), r.closed, r.seconds);
    expect_master_fine(m, pid, "a hello with protocol version 99");
  }
  {  // (b) Garbage: an HTTP request, and a frame of the right size holding junk.
    for (int k = 0; k < 2; k++) {
      int fd = connect_raw(m.port);
      ASSERT_GE(fd, 0);
      std::string junk;
      if (k == 0) {
        junk = "GET / HTTP/1.1\r\nHost: blockrepl\r\n\r\n";
      } else {
        uint32_t len = htole32(64);
        junk.assign(reinterpret_cast<const char*>(&len), 4);
        junk += std::string(64, '\xff');
      }
      ASSERT_TRUE(send_raw(fd, junk.data(), junk.size()));
      Received r = read_reply_and_close(fd, 10s);
      close(fd);
      EXPECT_TRUE(r.closed) << "garbage #" << k << ": the connection is still open after " << r.seconds << " s";
      EXPECT_LT(r.seconds, 5.0) << "garbage #" << k << ": closed only after " << r.seconds
                                << " s (a timeout, not a refusal of the bad input)";
      EXPECT_NE(r.which, "welcome") << "garbage #" << k << " was welcomed";
      printf("[ info ] garbage #%d: reply '%s' '%s', closed=%d after %.2f s\n", k, r.which.c_str(), r.reason.c_str(), r.closed, r.seconds);
      expect_master_fine(m, pid, "garbage #" + std::to_string(k));
    }
  }
  {  // (c) A length prefix of 2^31.
    int fd = connect_raw(m.port);
    ASSERT_GE(fd, 0);
    uint32_t len = htole32(0x80000000u);
    ASSERT_TRUE(send_raw(fd, &len, 4));
    std::string tail(4096, 'A');
    send_raw(fd, tail.data(), tail.size());  // may fail once the master has closed
    Received r = read_reply_and_close(fd, 10s);
    close(fd);
    EXPECT_TRUE(r.closed) << "a 2 GiB length prefix: the connection is still open after " << r.seconds << " s";
    EXPECT_LT(r.seconds, 5.0) << "a 2 GiB length prefix was not refused at once";
    printf("[ info ] 2^31 prefix: reply '%s' '%s', closed=%d after %.2f s\n", r.which.c_str(), r.reason.c_str(), r.closed, r.seconds);
    expect_master_fine(m, pid, "a 2^31 length prefix");
  }
  {  // (d) A valid frame whose root is a batch instead of a hello.
    int fd = connect_raw(m.port);
    ASSERT_GE(fd, 0);
    capnp::MallocMessageBuilder mb;
    auto recs = mb.initRoot<wire::Message>().initBatch().initRecords(2);
    recs[0].setLsn(1);
    recs[0].setOp(1);
    recs[0].setFid(1);
    recs[0].setName(kj::arrayPtr(reinterpret_cast<const capnp::byte*>("evil"), 4));
    recs[0].setData(kj::arrayPtr(reinterpret_cast<const capnp::byte*>("overwritten"), 11));
    recs[1].setLsn(2);
    recs[1].setOp(0);
    recs[1].setName(kj::arrayPtr(reinterpret_cast<const capnp::byte*>("../escape"), 9));
    std::string f = frame_of(mb);
    ASSERT_TRUE(send_raw(fd, f.data(), f.size()));
    Received r = read_reply_and_close(fd, 10s);
    close(fd);
    EXPECT_TRUE(r.closed) << "a batch instead of a hello: the connection is still open after " << r.seconds << " s";
    EXPECT_LT(r.seconds, 5.0) << "a batch instead of a hello was not refused at once";
    EXPECT_NE(r.which, "welcome");
    printf("[ info ] batch first: reply '%s' '%s', closed=%d after %.2f s\n", r.which.c_str(), r.reason.c_str(), r.closed, r.seconds);
    expect_master_fine(m, pid, "a batch instead of a hello");
  }
  // Nothing a hostile peer sent reached the volume (only the test's own probe file changed).
  auto after = repl::manifest(m.data);
  after.erase("probe");
  EXPECT_EQ(repl::manifest_diff(before, after), "");

  // A real slave still attaches and follows.
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(write_and_fsync(m.file("final"), repl::random_bytes(42, 80000)), 0);
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_SAME_TREE(m, s);
}

// =============================================================================================
// 9. A full disk: on the slave, replication stops with a clear reason and resumes by itself once
// there is room again, without losing what the slave held; on the master, the application gets
// ENOSPC and the slave stays an exact copy.

// A size-limited tmpfs over a node's (still empty) data directory, for the length of a test.
// Declared after the Cluster: it unmounts the node first, then detaches the tmpfs.
class SmallDisk {
 public:
  SmallDisk(Cluster& c, Node& n, const std::string& size) : c_(c), n_(n) {
    CommandResult r = run_command({"mount", "-t", "tmpfs", "-o", "size=" + size + ",mode=0755", "tmpfs", n.data}, 20);
    ok_ = r.exit_code == 0;
    error_ = r.err;
  }
  ~SmallDisk() {
    c_.unmount(n_);
    if (is_mounted(n_.mnt)) c_.detach(n_);
    if (ok_) umount2(n_.data.c_str(), MNT_DETACH);
  }
  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }
  bool resize(const std::string& size) {
    return run_command({"mount", "-o", "remount,size=" + size, n_.data}, 20).exit_code == 0;
  }

 private:
  Cluster& c_;
  Node& n_;
  bool ok_ = false;
  std::string error_;
};

// Writes n MiB of seeded data to path in 1 MiB pieces, then fsyncs; returns 0 or the first errno.
int write_mib(const std::string& path, size_t n, uint64_t seed) {
  int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  if (fd < 0) return errno;
  int err = 0;
  try {
    for (size_t i = 0; i < n; i++) repl::pwrite_all(fd, repl::random_bytes(seed + i, 1 << 20), static_cast<off_t>(i << 20));
  } catch (const std::exception&) {
    err = errno ? errno : EIO;
  }
  if (!err && fsync(fd) != 0) err = errno;
  if (close(fd) != 0 && !err) err = errno;
  return err;
}

using blockrepl::testing::deleted_files_held;

TEST(ReplicationFullDisk, DeletedFilesFreeTheirSpaceOnMasterAndSlaveOnceClosed) {
  Cluster c("repl-release");
  Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  // A file unlinked while open keeps taking writes, on the master and so on the slave.
  int fd = open(m.file("tmp").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  repl::pwrite_all(fd, repl::random_bytes(1, 4 << 20), 0);
  ASSERT_EQ(fsync(fd), 0);
  ASSERT_EQ(unlink(m.file("tmp").c_str()), 0);
  repl::pwrite_all(fd, repl::random_bytes(2, 4 << 20), 4 << 20);
  ASSERT_EQ(fsync(fd), 0) << "a write to an unlinked, open file did not replicate";
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_FALSE(deleted_files_held(s.pid(), s.data).empty()) << "the slave let go of a file still open on the master";
  // Several deleted files, all closed: neither daemon may keep their space.
  ASSERT_EQ(close(fd), 0);
  for (int i = 0; i < 5; i++) {
    const std::string f = m.file("gone" + std::to_string(i));
    ASSERT_EQ(write_and_fsync(f, repl::random_bytes(10 + i, 2 << 20)), 0);
    ASSERT_EQ(unlink(f.c_str()), 0);
  }
  // A file replaced by a rename loses its last name too (PostgreSQL and SQLite both do this).
  ASSERT_EQ(write_and_fsync(m.file("victim"), repl::random_bytes(20, 2 << 20)), 0);
  ASSERT_EQ(write_and_fsync(m.file("victim.new"), repl::random_bytes(21, 1 << 20)), 0);
  ASSERT_EQ(rename(m.file("victim.new").c_str(), m.file("victim").c_str()), 0);
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_EQ(read_file(s.file("victim")), repl::random_bytes(21, 1 << 20));
  std::vector<std::string> held_m, held_s;
  repl::wait_until(
      [&] {
        held_m = deleted_files_held(m.pid(), m.data);
        held_s = deleted_files_held(s.pid(), s.data);
        return held_m.empty() && held_s.empty();
      },
      10s, 100ms);
  EXPECT_TRUE(held_m.empty()) << "the master keeps " << held_m.size() << " deleted files open, e.g. " << held_m.front();
  EXPECT_TRUE(held_s.empty()) << "the slave keeps " << held_s.size() << " deleted files open, e.g. " << held_s.front();
  EXPECT_SAME_TREE(m, s);
}

// A file renamed over (or unlinked) while open on the master keeps taking writes there; the
// slave must pin it although it holds no descriptor of it (here: the slave was restarted since
// it last touched the file). It used to lose the inode with its name and fail the next record
// naming it ("cannot apply ... No such file or directory"), found by the exerciser.
TEST(ReplicationRelease, FileReplacedWhileOpenKeepsTakingWritesOnASlaveThatHeldNoDescriptor) {
  Cluster c("repl-pin");
  Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(write_and_fsync(m.file("victim"), repl::random_bytes(1, 64 << 10)), 0);
  ASSERT_EQ(write_and_fsync(m.file("doomed"), repl::random_bytes(2, 64 << 10)), 0);
  EXPECT_SYNCED(m, s.mnt);
  c.unmount(s);
  ASSERT_TRUE(c.mount(s));
  EXPECT_SYNCED(m, s.mnt);
  int victim = open(m.file("victim").c_str(), O_RDWR | O_CLOEXEC);
  int doomed = open(m.file("doomed").c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(victim, 0);
  ASSERT_GE(doomed, 0);
  ASSERT_EQ(write_and_fsync(m.file("new"), "replacement"), 0);
  ASSERT_EQ(rename(m.file("new").c_str(), m.file("victim").c_str()), 0);
  ASSERT_EQ(unlink(m.file("doomed").c_str()), 0);
  repl::pwrite_all(victim, repl::random_bytes(3, 8192), 4096);
  ASSERT_EQ(fsync(victim), 0) << "a write to a renamed-over, open file did not replicate";
  repl::pwrite_all(doomed, repl::random_bytes(4, 8192), 4096);
  ASSERT_EQ(fchmod(doomed, 0600), 0);
  ASSERT_EQ(fsync(doomed), 0) << "a write to an unlinked, open file did not replicate";
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_EQ(read_file(s.file("victim")), "replacement");
  EXPECT_EQ(read_file(s.log).find("cannot apply"), std::string::npos) << read_file(s.log);
  close(victim);
  close(doomed);
  EXPECT_SAME_TREE(m, s);
}

TEST(ReplicationFullDisk, SlaveOutOfSpaceStopsClearlyKeepsItsDataAndResumesWhenThereIsRoom) {
  Cluster c("repl-fulls");
  Node& m = c.add_master({"--ack", "sync", "--ack-timeout", "2s"});
  ASSERT_TRUE(m.ok());
  Node& s = c.define_slave(m);
  SmallDisk disk(c, s, "24m");
  ASSERT_TRUE(disk.ok()) << "cannot mount a tmpfs for the slave: " << disk.error();
  ASSERT_TRUE(c.mount(s));
  const std::string kept = repl::random_bytes(77, 300000);
  ASSERT_EQ(write_and_fsync(m.file("kept"), kept), 0);
  EXPECT_SYNCED(m, s.mnt);
  const pid_t pid = s.pid();

  // 40 MiB do not fit on the slave's 24 MiB: the master's application must not notice.
  const auto t0 = Clock::now();
  EXPECT_EQ(write_mib(m.file("big"), 40, 500), 0) << "the master failed a write because its slave's disk is full";
  EXPECT_LT(seconds_since(t0), 30.0);
  json st;
  bool reported = repl::wait_until(
      [&] {
        st = repl::status(s.mnt);
        return st.is_object() && st["upstream"].is_object() &&
               st["upstream"].value("last_error", "").find("No space left on device") != std::string::npos;
      },
      20s, 100ms);
  EXPECT_TRUE(reported) << "the slave's status does not say its disk is full: " << st.dump();
  EXPECT_TRUE(repl::process_alive(pid)) << "the slave daemon died of a full disk";
  EXPECT_EQ(read_file(s.file("kept")), kept) << "the slave lost what it held when its disk filled";
  std::string log = read_file(s.log);
  EXPECT_NE(log.find("No space left on device"), std::string::npos) << "no log line names the full disk";
  // The master kept serving: more writes and fsyncs return.
  ASSERT_EQ(write_and_fsync(m.file("later"), repl::random_bytes(78, 5000)), 0);

  // Room again: the slave catches up by itself, the same daemon, and ends an exact copy.
  ASSERT_TRUE(disk.resize("256m"));
  std::string why = repl::sync_and_wait(m.mnt, {s.mnt}, 60s);
  EXPECT_EQ(why, "") << "the slave did not resume once its disk had room";
  EXPECT_EQ(s.pid(), pid);
  EXPECT_SAME_TREE(m, s);
  printf("[ info ] re-attached by %s after the disk filled\n", last_attach_method(s).c_str());
}

TEST(ReplicationFullDisk, MasterOutOfSpaceFailsTheWriteWithEnospcAndTheSlaveStaysACopy) {
  Cluster c("repl-fullm");
  Node& m = c.define_master({"--ack", "sync"});
  SmallDisk disk(c, m, "24m");
  ASSERT_TRUE(disk.ok()) << "cannot mount a tmpfs for the master: " << disk.error();
  ASSERT_TRUE(c.mount(m));
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  const std::string kept = repl::random_bytes(81, 200000);
  ASSERT_EQ(write_and_fsync(m.file("kept"), kept), 0);

  EXPECT_EQ(write_mib(m.file("big"), 40, 900), ENOSPC) << "a write past the master's free space did not fail with ENOSPC";
  // The volume still works: free the space, write again. The space of a deleted file comes back
  // once the kernel and the daemon have let go of it, which is asynchronous (a moment).
  ASSERT_EQ(unlink(m.file("big").c_str()), 0);
  int after_err = -1;
  repl::wait_until([&] { return (after_err = write_and_fsync(m.file("after"), repl::random_bytes(82, 100000))) == 0; },
                   10s, 100ms);
  ASSERT_EQ(after_err, 0) << "the space of a deleted file did not come back: " << err_text(after_err);
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_EQ(read_file(m.file("kept")), kept);
  EXPECT_EQ(read_file(s.file("kept")), kept);
  EXPECT_SAME_TREE(m, s);
}

// A small ext4 on a loop device as a node's data directory, for the length of a test: a real
// file system that fills up the way a user's does (unlike tmpfs, it keeps delayed allocation
// and its own reserve). Declared after the Cluster: it unmounts the node first.
class NodeOnSmallExt4 {
 public:
  NodeOnSmallExt4(Cluster& c, Node& n, const std::string& size) : c_(c), n_(n), disk_(n.data, size) {}
  ~NodeOnSmallExt4() {
    c_.unmount(n_);
    if (is_mounted(n_.mnt)) c_.detach(n_);
  }
  bool ok() const { return disk_.ok(); }
  const std::string& error() const { return disk_.error(); }

 private:
  Cluster& c_;
  Node& n_;
  SmallExt4 disk_;
};

off_t file_size(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? st.st_size : -1;
}

TEST(ReplicationFullDisk, SlaveWhoseDiskFilledCatchesUpByItselfOnceTheMastersStateFits) {
  Cluster c("repl-fulls-ext4");
  Node& m = c.add_master({"--ack", "sync", "--ack-timeout", "2s"});
  ASSERT_TRUE(m.ok());
  Node& s = c.define_slave(m);
  NodeOnSmallExt4 disk(c, s, "96M");
  ASSERT_TRUE(disk.ok()) << "cannot make a small ext4 for the slave: " << disk.error();
  ASSERT_TRUE(c.mount(s));
  const std::string kept = repl::random_bytes(91, 300000);
  ASSERT_EQ(write_and_fsync(m.file("kept"), kept), 0);
  EXPECT_SYNCED(m, s.mnt);
  const pid_t pid = s.pid();

  // 150 MiB with an fsync per MiB do not fit on the slave's 96 MiB; the master's application
  // does not notice.
  int fd = open(m.file("big").c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  for (int i = 0; i < 150; i++) {
    repl::pwrite_all(fd, repl::random_bytes(600 + i, 1 << 20), static_cast<off_t>(i) << 20);
    ASSERT_EQ(fsync(fd), 0) << "fsync " << i << " on the master: " << err_text(errno);
  }
  ASSERT_EQ(close(fd), 0);
  json st;
  bool reported = repl::wait_until(
      [&] {
        st = repl::status(s.mnt);
        return st.is_object() && st["upstream"].is_object() &&
               st["upstream"].value("last_error", "").find("No space left on device") != std::string::npos &&
               !st["upstream"].value("waiting_for", "").empty();
      },
      60s, 200ms);
  EXPECT_TRUE(reported) << "the slave's status does not say that its disk is full and what it waits for: " << st.dump();
  printf("[ info ] slave waiting: %s\n", st["upstream"].dump().c_str());
  EXPECT_EQ(read_file(s.file("kept")), kept) << "the slave stopped serving what it held";

  // The master deletes the file: its state fits again, and the slave catches up by itself,
  // although the records that free the space come after the one it could not apply.
  ASSERT_EQ(unlink(m.file("big").c_str()), 0);
  ASSERT_EQ(write_and_fsync(m.file("after"), repl::random_bytes(92, 50000)), 0);
  std::string why = repl::sync_and_wait(m.mnt, {s.mnt}, 90s);
  EXPECT_EQ(why, "") << "the slave did not catch up once the master's state fit on its disk";
  EXPECT_EQ(s.pid(), pid) << "the slave daemon was restarted";
  st = repl::status(s.mnt);
  EXPECT_EQ(st["upstream"].value("state", ""), "streaming") << st.dump();
  EXPECT_FALSE(st["upstream"].contains("waiting_for")) << st.dump();
  printf("[ info ] caught up by %s\n", last_attach_method(s).c_str());
  EXPECT_SAME_TREE(m, s);
  CommandResult v = run_blockrepl({"verify", s.mnt}, 120);
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  // And it keeps following.
  ASSERT_EQ(write_and_fsync(m.file("later"), repl::random_bytes(93, 4 << 20)), 0);
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_SAME_TREE(m, s);
}

TEST(ReplicationFullDisk, MasterOnAFullExt4AgreesWithItsDiskAndItsSlaveAfterTheError) {
  Cluster c("repl-fullm-ext4");
  Node& m = c.define_master({"--ack", "sync"});
  NodeOnSmallExt4 disk(c, m, "64M");
  ASSERT_TRUE(disk.ok()) << "cannot make a small ext4 for the master: " << disk.error();
  ASSERT_TRUE(c.mount(m));
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());

  // dd if=/dev/urandom of=MNT/big bs=1M count=100 conv=fsync
  int fd = open(m.file("big").c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  int write_err = 0;
  for (int i = 0; i < 100 && !write_err; i++) {
    const std::string chunk = repl::random_bytes(700 + i, 1 << 20);
    if (pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(i) << 20) < 0) write_err = errno;
  }
  const int fsync_err = fsync(fd) == 0 ? 0 : errno;
  const int close_err = close(fd) == 0 ? 0 : errno;
  printf("[ info ] write: %s, fsync: %s, close: %s\n", write_err ? err_text(write_err).c_str() : "ok",
         fsync_err ? err_text(fsync_err).c_str() : "ok", close_err ? err_text(close_err).c_str() : "ok");
  EXPECT_TRUE(write_err == ENOSPC || fsync_err == ENOSPC)
      << "the application was not told that its data did not fit: write " << err_text(write_err) << ", fsync "
      << err_text(fsync_err);

  // Afterwards the mount shows what the disk holds: the same size and the same bytes.
  std::string through_mount, on_disk;
  bool agree = repl::wait_until(
      [&] {
        if (file_size(m.file("big")) != file_size(m.backing("big"))) return false;
        through_mount = read_file(m.file("big"));
        on_disk = read_file(m.backing("big"));
        return through_mount == on_disk;
      },
      10s, 200ms);
  EXPECT_TRUE(agree) << "the mount says " << file_size(m.file("big")) << " bytes, the backing file " << file_size(m.backing("big"))
                     << (through_mount == on_disk ? "" : "; their contents differ");
  // ... and so does the slave.
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_EQ(file_size(s.file("big")), file_size(m.backing("big")));
  EXPECT_TRUE(read_file(s.file("big")) == on_disk) << "the slave's copy differs from the master's disk";
  EXPECT_SAME_TREE(m, s);
  // Room again: the volume goes on working.
  ASSERT_EQ(unlink(m.file("big").c_str()), 0);
  int after_err = -1;
  repl::wait_until([&] { return (after_err = write_and_fsync(m.file("after"), repl::random_bytes(94, 100000))) == 0; },
                   10s, 100ms);
  ASSERT_EQ(after_err, 0) << err_text(after_err);
  EXPECT_SYNCED(m, s.mnt);
  EXPECT_SAME_TREE(m, s);
}

}  // namespace blockrepl::test
