// Randomized operation exerciser for one blockrepl mount, checked against an in-memory model and
// against the backing directory, before and after a remount.
//
// Several threads each own a disjoint set of names (t<thread>_<n>) in the mount root, so each
// thread's model is exact while the threads still race on the shared directory. Operations:
// writes (tiny, unaligned, page sized, > 1 MiB), overwrites, ftruncate/truncate grow and shrink,
// fallocate (plain, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE), renames (also onto existing names and
// between two links of one file), hard links, unlinks (also of files still open, which are then
// written and read through the descriptor), fsync/fdatasync, and stores through MAP_SHARED
// mappings followed by msync.
//
// SyncPairFourWritersReplicaMatchesMaster runs the same four threads on the master of a sync pair
// (--ack sync, one slave), each also making conflicting changes to a tree all threads share
// (SharedOps: overlapping writes to the same files, truncates, syncs, and creates, renames, links
// and unlinks of the same names, see below). The master is the truth there; its backing
// directory and mount and the slave's backing directory and mount must then be identical (bytes,
// metadata, mtimes, hard links, xattrs), also after the slave unmounts and re-attaches.
//
// The seed is printed; BLOCKREPL_SEED=N replays a run (each thread's sequence depends only on the
// seed; only the time budget, BLOCKREPL_EXERCISER_SECONDS, default 20 (30 on the pair), can cut it
// short; the shared operations race by design, so what they leave is replayed only approximately).
// BLOCKREPL_EXERCISER_OPS=N runs N private operations in all instead of ~3000 (~2000 on the pair;
// about as many shared ones come on top), for longer soaks.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <dirent.h>
#include <fcntl.h>
#include <iostream>
#include <linux/falloc.h>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

constexpr int kThreads = 4;
int g_ops_per_thread = 750;  // ~3000 operations in all; BLOCKREPL_EXERCISER_OPS=N sets the total
constexpr int kCheckpointEvery = 250;
constexpr size_t kMaxFileSize = 8u << 20;
constexpr size_t kMaxNamesPerThread = 10;
constexpr size_t kMaxOpenPerThread = 6;
constexpr size_t kPage = 4096;

long first_diff(const std::string& a, const std::string& b) {
  size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; i++)
    if (a[i] != b[i]) return static_cast<long>(i);
  return a.size() == b.size() ? -1 : static_cast<long>(n);
}

// "" if equal, else a description of the first difference.
std::string compare(const std::string& expected, const std::string& actual) {
  long d = first_diff(expected, actual);
  if (d < 0) return "";
  std::ostringstream os;
  os << "expected " << expected.size() << " bytes, got " << actual.size() << "; first difference at offset " << d;
  if (static_cast<size_t>(d) < expected.size() && static_cast<size_t>(d) < actual.size())
    os << " (expected byte 0x" << std::hex << (static_cast<unsigned>(expected[d]) & 0xff) << ", got 0x"
       << (static_cast<unsigned>(actual[d]) & 0xff) << std::dec << ")";
  // Length of the differing run, to tell a stale page from a single bad byte.
  size_t end = static_cast<size_t>(d);
  while (end < std::min(expected.size(), actual.size()) && expected[end] != actual[end]) end++;
  os << ", differing run of " << end - static_cast<size_t>(d) << " bytes";
  return os.str();
}

std::string pread_all(int fd, size_t len, off_t off) {
  std::string out(len, '\0');
  size_t got = 0;
  while (got < len) {
    ssize_t n = pread(fd, out.data() + got, len - got, off + static_cast<off_t>(got));
    if (n < 0) fail_sys("pread(" + std::to_string(len - got) + " at " + std::to_string(off + static_cast<off_t>(got)) + ")");
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  out.resize(got);
  return out;
}

std::string read_whole(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_sys("open(" + path + ")");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    fail_sys("fstat(" + path + ")");
  }
  std::string s;
  try {
    s = pread_all(fd, static_cast<size_t>(st.st_size) + 4096, 0);
  } catch (...) {
    close(fd);
    throw;
  }
  close(fd);
  return s;
}

void fsync_path(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_sys("open(" + path + ") for fsync");
  int r = fsync(fd);
  int e = errno;
  close(fd);
  if (r != 0) {
    errno = e;
    fail_sys("fsync(" + path + ")");
  }
}


std::string set_str(const std::set<std::string>& s) {
  std::string out;
  for (auto& x : s) out += (out.empty() ? "" : " ") + x;
  return "{" + out + "}";
}

class SharedOps;

// --- the model -------------------------------------------------------------------------------

struct Obj {
  int id = 0;
  std::string data;  // holes are zeros
  int nlink = 1;
};
using ObjP = std::shared_ptr<Obj>;

struct OpenFile {
  int fd = -1;
  ObjP obj;
  int acc = O_RDWR;  // O_RDWR or O_WRONLY
};

class Worker {
 public:
  // shared: operations on names every thread uses (the sync pair test), interleaved with this
  // thread's own; they draw from their own generator, so this thread's sequence stays the same.
  Worker(int tid, uint64_t seed, std::string mnt, std::string data, std::chrono::steady_clock::time_point deadline,
         SharedOps* shared = nullptr)
      : tid_(tid), rng_(seed), mnt_(std::move(mnt)), data_(std::move(data)), deadline_(deadline), shared_(shared) {}

  void run() {
    try {
      for (ops_ = 0; ops_ < g_ops_per_thread; ops_++) {
        if (std::chrono::steady_clock::now() > deadline_) {
          stopped_early_ = true;
          break;
        }
        run_shared();
        step();
        if ((ops_ + 1) % kCheckpointEvery == 0) checkpoint();
      }
      note("final checkpoint");
      checkpoint();
    } catch (const std::exception& ex) {
      error_ = std::string("thread ") + std::to_string(tid_) + ", op #" + std::to_string(ops_) + ": " + ex.what();
    }
  }

  // Makes everything durable and closes every descriptor; unlinked files vanish from the model.
  void finish() {
    for (auto& of : open_) {
      if (fsync(of.fd) != 0 && error_.empty()) error_ = "thread " + std::to_string(tid_) + ": final fsync: " + errname(errno);
      close(of.fd);
    }
    open_.clear();
  }

  const std::string& error() const { return error_; }
  std::string recent_ops() const {
    std::string s;
    for (auto& l : log_) s += "    " + l + "\n";
    return s;
  }
  const std::map<std::string, ObjP>& names() const { return names_; }
  int ops() const { return ops_; }
  bool stopped_early() const { return stopped_early_; }
  const std::map<std::string, int>& counts() const { return counts_; }

 private:
  uint64_t rnd(uint64_t n) { return n ? rng_() % n : 0; }
  bool chance(int pct) { return static_cast<int>(rnd(100)) < pct; }
  std::string mpath(const std::string& name) const { return mnt_ + "/" + name; }
  std::string bpath(const std::string& name) const { return data_ + "/" + name; }

  void note(const std::string& s) {
    log_.push_back("#" + std::to_string(ops_) + " " + s);
    if (log_.size() > 40) log_.pop_front();
  }
  void count(const std::string& op) { counts_[op]++; }

  std::string random_bytes(size_t n) {
    std::string s(n, '\0');
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t v = rng_();
      memcpy(s.data() + i, &v, 8);
    }
    uint64_t v = rng_();
    for (; i < n; i++, v >>= 8) s[i] = static_cast<char>(v & 0xff);
    return s;
  }

  size_t random_len() {
    int r = static_cast<int>(rnd(100));
    if (r < 25) return 1 + rnd(100);
    if (r < 50) return 1 + rnd(8192);
    if (r < 70) return kPage * (1 + rnd(16));
    if (r < 88) return 1 + rnd(256 * 1024);
    return (1u << 20) + 1 + rnd(2u << 20);  // > 1 MiB: split by the kernel into several writes
  }

  size_t random_offset(size_t size) {
    int r = static_cast<int>(rnd(100));
    if (r < 40) return rnd(size + 1);
    if (r < 60) return kPage * rnd(size / kPage + 16);
    if (r < 80) return size + rnd(65536);  // past EOF: leaves a hole
    return rnd(kMaxFileSize);
  }

  // Clamps [off, off+len) into the size cap; len stays >= 1.
  static void clamp(size_t& off, size_t& len) {
    if (off >= kMaxFileSize) off = off % (kMaxFileSize / 2);
    if (off + len > kMaxFileSize) len = kMaxFileSize - off;
    if (len == 0) len = 1;
  }

  std::string new_name() { return "t" + std::to_string(tid_) + "_" + std::to_string(next_name_++); }

  std::string random_name() {
    auto it = names_.begin();
    std::advance(it, static_cast<long>(rnd(names_.size())));
    return it->first;
  }

  void close_open(size_t i) {
    close(open_[i].fd);
    open_.erase(open_.begin() + static_cast<long>(i));
  }

  // An open descriptor to work on: an existing one, or a new open of one of our names.
  // need_read: must allow reading (O_RDWR). Returns an index into open_, or -1 if there is none.
  long pick_fd(bool need_read) {
    std::vector<size_t> ok;
    for (size_t i = 0; i < open_.size(); i++)
      if (!need_read || open_[i].acc == O_RDWR) ok.push_back(i);
    if (!ok.empty() && (names_.empty() || chance(50))) return static_cast<long>(ok[rnd(ok.size())]);
    if (names_.empty()) return -1;
    if (open_.size() >= kMaxOpenPerThread) close_open(rnd(open_.size()));
    std::string name = random_name();
    int acc = need_read || chance(60) ? O_RDWR : O_WRONLY;
    int fd = open(mpath(name).c_str(), acc | O_CLOEXEC);
    if (fd < 0) fail_sys("open(" + name + (acc == O_RDWR ? ", O_RDWR)" : ", O_WRONLY)"));
    open_.push_back({fd, names_[name], acc});
    note("open " + name + (acc == O_RDWR ? " rw" : " wo") + " -> fd " + std::to_string(fd) + " (obj " + std::to_string(names_[name]->id) + ")");
    return static_cast<long>(open_.size() - 1);
  }

  static std::string obj_tag(const OpenFile& of) {
    return "fd " + std::to_string(of.fd) + " (obj " + std::to_string(of.obj->id) + (of.obj->nlink == 0 ? ", unlinked" : "") + ")";
  }

  // --- operations ---

  void op_create() {
    if (names_.size() >= kMaxNamesPerThread) return op_unlink();
    std::string name = new_name();
    int fd = open(mpath(name).c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644);
    if (fd < 0) fail_sys("create " + name);
    auto obj = std::make_shared<Obj>();
    obj->id = tid_ * 1000000 + next_obj_++;  // unique across threads
    names_[name] = obj;
    note("create " + name + " (obj " + std::to_string(obj->id) + ")");
    count("create");
    if (open_.size() < kMaxOpenPerThread && chance(50)) open_.push_back({fd, obj, O_RDWR});
    else close(fd);
  }

  void op_write() {
    long i = pick_fd(false);
    if (i < 0) return op_create();
    OpenFile& of = open_[static_cast<size_t>(i)];
    std::string& d = of.obj->data;
    size_t off = random_offset(d.size()), len = random_len();
    clamp(off, len);
    std::string buf = random_bytes(len);
    note("pwrite " + obj_tag(of) + " off " + std::to_string(off) + " len " + std::to_string(len) + (off > d.size() ? " (past EOF)" : ""));
    size_t done = 0;
    while (done < len) {
      ssize_t n = pwrite(of.fd, buf.data() + done, len - done, static_cast<off_t>(off + done));
      if (n < 0) fail_sys("pwrite(" + obj_tag(of) + ", " + std::to_string(len) + " at " + std::to_string(off) + ")");
      if (n == 0) throw std::runtime_error("pwrite returned 0");
      done += static_cast<size_t>(n);
    }
    if (d.size() < off + len) d.resize(off + len, '\0');
    d.replace(off, len, buf);
    count(len > (1u << 20) ? "write>1MiB" : "write");
  }

  void op_read_verify() {
    long i = pick_fd(true);
    if (i < 0) return op_create();
    OpenFile& of = open_[static_cast<size_t>(i)];
    const std::string& d = of.obj->data;
    size_t off = chance(20) ? 0 : rnd(d.size() + 8192);
    size_t len = chance(20) ? d.size() + 100 : random_len();
    note("verify read " + obj_tag(of) + " off " + std::to_string(off) + " len " + std::to_string(len));
    std::string got = pread_all(of.fd, len, static_cast<off_t>(off));
    std::string want = off < d.size() ? d.substr(off, len) : std::string();
    std::string diff = compare(want, got);
    if (!diff.empty())
      throw std::runtime_error("read of " + obj_tag(of) + " [" + std::to_string(off) + ", +" + std::to_string(len) + ") differs from the model: " + diff);
    struct stat st;
    if (fstat(of.fd, &st) != 0) fail_sys("fstat");
    if (static_cast<size_t>(st.st_size) != d.size())
      throw std::runtime_error("fstat of " + obj_tag(of) + ": st_size " + std::to_string(st.st_size) + ", model " + std::to_string(d.size()));
    if (st.st_nlink != static_cast<nlink_t>(of.obj->nlink))
      throw std::runtime_error("fstat of " + obj_tag(of) + ": st_nlink " + std::to_string(st.st_nlink) + ", model " + std::to_string(of.obj->nlink));
    count("read");
  }

  size_t random_new_size(size_t size) {
    int r = static_cast<int>(rnd(100));
    if (r < 35) return size ? rnd(size) : 0;                          // shrink
    if (r < 45) return size ? (rnd(size) / kPage) * kPage : 0;        // shrink to a page boundary
    if (r < 55) return 0;
    return std::min(kMaxFileSize, size + 1 + rnd(r < 90 ? 65536 : (2u << 20)));  // grow
  }

  void op_ftruncate() {
    long i = pick_fd(false);
    if (i < 0) return op_create();
    OpenFile& of = open_[static_cast<size_t>(i)];
    size_t ns = random_new_size(of.obj->data.size());
    note("ftruncate " + obj_tag(of) + " " + std::to_string(of.obj->data.size()) + " -> " + std::to_string(ns));
    if (ftruncate(of.fd, static_cast<off_t>(ns)) != 0) fail_sys("ftruncate(" + obj_tag(of) + ", " + std::to_string(ns) + ")");
    of.obj->data.resize(ns, '\0');
    count("ftruncate");
  }

  void op_truncate_path() {
    if (names_.empty()) return op_create();
    std::string name = random_name();
    ObjP o = names_[name];
    size_t ns = random_new_size(o->data.size());
    note("truncate " + name + " " + std::to_string(o->data.size()) + " -> " + std::to_string(ns));
    if (truncate(mpath(name).c_str(), static_cast<off_t>(ns)) != 0) fail_sys("truncate(" + name + ", " + std::to_string(ns) + ")");
    o->data.resize(ns, '\0');
    count("truncate");
  }

  void op_fallocate() {
    long i = pick_fd(false);
    if (i < 0) return op_create();
    OpenFile& of = open_[static_cast<size_t>(i)];
    std::string& d = of.obj->data;
    size_t off = chance(70) ? rnd(d.size() + 1) : random_offset(d.size());
    size_t len = 1 + rnd(chance(80) ? 65536 : (1u << 20));
    if (chance(40)) {  // page aligned
      off = off / kPage * kPage;
      len = (len + kPage - 1) / kPage * kPage;
    }
    clamp(off, len);
    static const struct {
      int mode;
      const char* name;
    } modes[] = {{0, "alloc"},
                 {FALLOC_FL_KEEP_SIZE, "keep_size"},
                 {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "punch_hole"},
                 {FALLOC_FL_ZERO_RANGE, "zero_range"},
                 {FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "zero_range|keep_size"}};
    const auto& md = modes[rnd(5)];
    note(std::string("fallocate ") + md.name + " " + obj_tag(of) + " off " + std::to_string(off) + " len " + std::to_string(len) +
         " (size " + std::to_string(d.size()) + ")");
    if (fallocate(of.fd, md.mode, static_cast<off_t>(off), static_cast<off_t>(len)) != 0)
      fail_sys(std::string("fallocate(") + md.name + ", " + obj_tag(of) + ", " + std::to_string(off) + ", " + std::to_string(len) + ")");
    size_t end = off + len;
    bool keep = md.mode & FALLOC_FL_KEEP_SIZE;
    if (md.mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
      size_t zend = std::min(end, d.size());
      if (off < zend) std::fill(d.begin() + static_cast<long>(off), d.begin() + static_cast<long>(zend), '\0');
    }
    if (!keep && d.size() < end) d.resize(end, '\0');
    count(std::string("fallocate ") + md.name);
  }

  void op_rename() {
    if (names_.empty()) return op_create();
    std::string from = random_name();
    std::string to = names_.size() > 1 && chance(50) ? random_name() : new_name();
    if (to == from) to = new_name();
    bool same = names_.count(to) && names_[to] == names_[from];
    note("rename " + from + " -> " + to + (names_.count(to) ? (same ? " (both links of one file)" : " (replacing)") : ""));
    if (rename(mpath(from).c_str(), mpath(to).c_str()) != 0) fail_sys("rename(" + from + ", " + to + ")");
    if (same) {
      // POSIX: renaming a name onto another link of the same file does nothing; both stay.
      count("rename same-file");
      return;
    }
    if (auto it = names_.find(to); it != names_.end()) it->second->nlink--;
    names_[to] = names_[from];
    names_.erase(from);
    count("rename");
  }

  void op_link() {
    if (names_.empty()) return op_create();
    if (names_.size() >= kMaxNamesPerThread) return op_unlink();
    std::string from = random_name(), to = new_name();
    note("link " + from + " -> " + to);
    if (link(mpath(from).c_str(), mpath(to).c_str()) != 0) fail_sys("link(" + from + ", " + to + ")");
    names_[to] = names_[from];
    names_[to]->nlink++;
    count("link");
  }

  void op_unlink() {
    if (names_.empty()) return op_create();
    std::string name = random_name();
    note("unlink " + name);
    if (unlink(mpath(name).c_str()) != 0) fail_sys("unlink(" + name + ")");
    names_[name]->nlink--;
    names_.erase(name);
    count("unlink");
  }

  // Unlinks a file that is open, then writes and reads through the descriptor.
  void op_unlink_open() {
    if (names_.empty()) return op_create();
    std::string name = random_name();
    ObjP o = names_[name];
    if (open_.size() >= kMaxOpenPerThread) close_open(rnd(open_.size()));
    int fd = open(mpath(name).c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) fail_sys("open(" + name + ")");
    open_.push_back({fd, o, O_RDWR});
    note("unlink while open " + name + " (obj " + std::to_string(o->id) + ", fd " + std::to_string(fd) + ")");
    if (unlink(mpath(name).c_str()) != 0) fail_sys("unlink(" + name + ") while open");
    o->nlink--;
    names_.erase(name);
    size_t off = rnd(o->data.size() + 4096), len = 1 + rnd(chance(20) ? (2u << 20) : 20000);
    clamp(off, len);
    std::string buf = random_bytes(len);
    ssize_t n = pwrite(fd, buf.data(), len, static_cast<off_t>(off));
    if (n != static_cast<ssize_t>(len)) fail_sys("pwrite after unlink (" + std::to_string(n) + " of " + std::to_string(len) + ")");
    if (o->data.size() < off + len) o->data.resize(off + len, '\0');
    o->data.replace(off, len, buf);
    std::string got = pread_all(fd, o->data.size() + 10, 0);
    std::string diff = compare(o->data, got);
    if (!diff.empty()) throw std::runtime_error("read back through the descriptor of unlinked " + name + ": " + diff);
    struct stat st;
    if (fstat(fd, &st) != 0) fail_sys("fstat after unlink");
    if (st.st_nlink != static_cast<nlink_t>(o->nlink))
      throw std::runtime_error("fstat after unlink of " + name + ": st_nlink " + std::to_string(st.st_nlink) + ", model " + std::to_string(o->nlink));
    count("unlink while open");
  }

  void op_fsync() {
    long i = pick_fd(false);
    if (i < 0) return op_create();
    OpenFile& of = open_[static_cast<size_t>(i)];
    bool data_only = chance(50);
    note(std::string(data_only ? "fdatasync " : "fsync ") + obj_tag(of));
    if ((data_only ? fdatasync(of.fd) : fsync(of.fd)) != 0) fail_sys(std::string(data_only ? "fdatasync(" : "fsync(") + obj_tag(of) + ")");
    count(data_only ? "fdatasync" : "fsync");
  }

  void op_mmap_write() {
    long i = pick_fd(true);
    if (i < 0) return op_create();
    OpenFile& of = open_[static_cast<size_t>(i)];
    std::string& d = of.obj->data;
    if (d.empty()) return op_write();
    size_t start = (rnd(d.size()) / kPage) * kPage;
    size_t maplen = std::min(d.size() - start, static_cast<size_t>(1 + rnd(chance(20) ? (1u << 20) : 65536)));
    size_t woff = rnd(maplen), wlen = 1 + rnd(maplen - woff);  // stores stay below EOF
    note("mmap write " + obj_tag(of) + " map [" + std::to_string(start) + ", +" + std::to_string(maplen) + ") store at " +
         std::to_string(start + woff) + " len " + std::to_string(wlen));
    void* p = mmap(nullptr, maplen, PROT_READ | PROT_WRITE, MAP_SHARED, of.fd, static_cast<off_t>(start));
    if (p == MAP_FAILED) fail_sys("mmap(" + obj_tag(of) + ")");
    char* c = static_cast<char*>(p);
    // The mapping shows the current contents.
    std::string diff = compare(d.substr(start, maplen), std::string(c, maplen));
    if (!diff.empty()) {
      munmap(p, maplen);
      throw std::runtime_error("mapping of " + obj_tag(of) + " at " + std::to_string(start) + " differs from the model: " + diff);
    }
    std::string buf = random_bytes(wlen);
    memcpy(c + woff, buf.data(), wlen);
    int r = msync(p, maplen, MS_SYNC);
    int e = errno;
    munmap(p, maplen);
    if (r != 0) {
      errno = e;
      fail_sys("msync(" + obj_tag(of) + ")");
    }
    d.replace(start + woff, wlen, buf);
    count("mmap write");
  }

  void op_close() {
    if (open_.empty()) return op_write();
    size_t i = rnd(open_.size());
    note("close " + obj_tag(open_[i]));
    close_open(i);
    count("close");
  }

  void step() {
    int r = static_cast<int>(rnd(100));
    if (r < 7) op_create();
    else if (r < 32) op_write();
    else if (r < 41) op_read_verify();
    else if (r < 47) op_ftruncate();
    else if (r < 50) op_truncate_path();
    else if (r < 59) op_fallocate();
    else if (r < 65) op_rename();
    else if (r < 69) op_link();
    else if (r < 73) op_unlink();
    else if (r < 76) op_unlink_open();
    else if (r < 82) op_fsync();
    else if (r < 89) op_mmap_write();
    else if (r < 94) op_close();
    else op_write();
  }

  // Every name of this thread read whole through the mount and, after fsync, from the backing
  // directory; every open descriptor of an unlinked file read whole too.
  void checkpoint() {
    for (auto& [name, obj] : names_) {
      std::string got = read_whole(mpath(name));
      std::string diff = compare(obj->data, got);
      if (!diff.empty()) throw std::runtime_error("checkpoint: " + name + " (obj " + std::to_string(obj->id) + ") on the mount: " + diff);
      fsync_path(mpath(name));
      got = read_whole(bpath(name));
      diff = compare(obj->data, got);
      if (!diff.empty()) throw std::runtime_error("checkpoint: backing file of " + name + " after fsync: " + diff);
    }
    for (auto& of : open_) {
      if (of.acc != O_RDWR || of.obj->nlink != 0) continue;
      std::string got = pread_all(of.fd, of.obj->data.size() + 10, 0);
      std::string diff = compare(of.obj->data, got);
      if (!diff.empty()) throw std::runtime_error("checkpoint: unlinked " + obj_tag(of) + ": " + diff);
    }
    count("checkpoint");
  }

  void run_shared();  // defined after SharedOps

  int tid_;
  std::mt19937_64 rng_;
  std::string mnt_, data_;
  std::chrono::steady_clock::time_point deadline_;
  SharedOps* shared_ = nullptr;
  std::map<std::string, ObjP> names_;
  std::vector<OpenFile> open_;
  int next_name_ = 0, next_obj_ = 0, ops_ = 0;
  bool stopped_early_ = false;
  std::deque<std::string> log_;
  std::map<std::string, int> counts_;
  std::string error_;
};

// --- the shared part (sync pair test) ---------------------------------------------------------
//
// Names every thread uses, so that the master really sees conflicting changes at the same time:
//   shared/f0..f3     permanent data files; every thread holds a descriptor to each and writes,
//                     truncates, fallocates and syncs overlapping ranges of the first 512 KiB
//   shared/{d,e}/n0..n5, shared/{d,e}/nJ/x0..x1
//                     created, written, renamed (plain, NOREPLACE, EXCHANGE, across the two
//                     directories), linked, unlinked (also while open), made directories,
//                     symlinks and fifos, chmodded, chowned, given user.* xattrs and times.
// There is no model: what the master ends with is the truth, and the slave must equal it. Errors
// that races cause (ENOENT, EEXIST, ENOTEMPTY, ...) are expected and counted per operation; any
// other errno fails the test.

constexpr int kSharedFiles = 4;
constexpr int kSharedNames = 6;
constexpr size_t kSharedSpan = 512 * 1024;
constexpr size_t kMaxSharedHeld = 3;

// Creates the shared tree on the master before the threads start.
void make_shared_tree(const std::string& mnt) {
  for (const char* d : {"shared", "shared/d", "shared/e"})
    if (mkdir((mnt + "/" + d).c_str(), 0755) != 0) fail_sys(std::string("mkdir ") + d);
  for (int i = 0; i < kSharedFiles; i++) {
    std::string p = mnt + "/shared/f" + std::to_string(i);
    int fd = open(p.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
    if (fd < 0) fail_sys("create " + p);
    close(fd);
  }
}

class SharedOps {
 public:
  SharedOps(int tid, uint64_t seed, std::string mnt) : tid_(tid), rng_(seed), root_(std::move(mnt) + "/shared") {}
  ~SharedOps() { finish(); }

  // About one shared operation per private one, on average.
  void steps() {
    int n = static_cast<int>(rnd(3));
    for (int i = 0; i < n; i++) step();
  }

  void finish() {
    for (int& fd : data_fds_)
      if (fd >= 0) close(fd), fd = -1;
    for (auto& h : held_) close(h.fd);
    held_.clear();
  }

  int ops() const { return ops_; }
  const std::map<std::string, int>& counts() const { return counts_; }
  // Unexpected errors: how many, and the first ones with the operations before them.
  int failed() const { return failed_; }
  const std::vector<std::string>& failures() const { return failures_; }
  std::string recent_ops() const {
    std::string s;
    for (auto& l : log_) s += "    " + l + "\n";
    return s;
  }

 private:
  struct Held {
    int fd;
    std::string name;  // the name it was opened by (it may since be renamed or unlinked)
  };

  uint64_t rnd(uint64_t n) { return n ? rng_() % n : 0; }
  bool chance(int pct) { return static_cast<int>(rnd(100)) < pct; }
  std::string path(const std::string& rel) const { return root_ + "/" + rel; }
  void note(const std::string& s) {
    log_.push_back("s#" + std::to_string(ops_) + " " + s);
    if (log_.size() > 40) log_.pop_front();
  }
  void count(const std::string& op) { counts_["shared " + op]++; }

  // r is the call's result; an error is counted if its errno is one the races explain, else thrown.
  // ELOOP is always one: d/nJ may be a symlink in a loop, and d/nJ/x0 resolves through it.
  bool check(long r, const std::string& what, std::initializer_list<int> expected) {
    if (r >= 0) {
      count(what);
      return true;
    }
    int e = errno;
    if (e == ELOOP) {
      count(what + " ELOOP");
      note("  -> ELOOP");
      return false;
    }
    for (int x : expected)
      if (x == e) {
        const char* n = strerrorname_np(e);
        count(what + " " + (n ? n : "E?"));
        note("  -> " + std::string(n ? n : "E?"));
        return false;
      }
    errno = e;
    fail_sys("shared " + what + " (thread " + std::to_string(tid_) + ")");
  }

  std::string random_bytes(size_t n) {
    std::string s(n, '\0');
    for (size_t i = 0; i < n; i += 8) {
      uint64_t v = rng_();
      memcpy(s.data() + i, &v, std::min<size_t>(8, n - i));
    }
    return s;
  }

  size_t random_len() {
    int r = static_cast<int>(rnd(100));
    if (r < 55) return 1 + rnd(8192);
    if (r < 80) return kPage * (1 + rnd(16));
    if (r < 95) return 1 + rnd(256 * 1024);
    return (1u << 20) + 1 + rnd(512 * 1024);  // > 1 MiB: several FUSE writes
  }

  // A name in the shared directories: mostly d/nJ or e/nJ, sometimes one level below (which
  // exists only while d/nJ is a directory).
  std::string random_name() {
    std::string n = std::string(chance(50) ? "d" : "e") + "/n" + std::to_string(rnd(kSharedNames));
    if (chance(15)) n += "/x" + std::to_string(rnd(2));
    return n;
  }

  int data_fd(int i) {
    if (data_fds_[i] < 0) {
      data_fds_[i] = open(path("f" + std::to_string(i)).c_str(), O_RDWR | O_CLOEXEC);
      if (data_fds_[i] < 0) fail_sys("open shared/f" + std::to_string(i));
    }
    return data_fds_[i];
  }

  // A descriptor to write through: a shared data file, or one held of a shared name.
  std::pair<int, std::string> random_fd() {
    if (!held_.empty() && chance(35)) {
      auto& h = held_[rnd(held_.size())];
      return {h.fd, h.name + " (held fd " + std::to_string(h.fd) + ")"};
    }
    int i = static_cast<int>(rnd(kSharedFiles));
    return {data_fd(i), "f" + std::to_string(i)};
  }

  void hold(int fd, const std::string& name) {
    if (held_.size() >= kMaxSharedHeld) {
      size_t i = rnd(held_.size());
      close(held_[i].fd);
      held_.erase(held_.begin() + static_cast<long>(i));
    }
    held_.push_back({fd, name});
  }

  void op_pwrite() {
    auto [fd, what] = random_fd();
    size_t off = chance(80) ? rnd(kSharedSpan) : rnd(kSharedSpan / kPage) * kPage, len = random_len();
    std::string buf = random_bytes(len);
    note("pwrite " + what + " off " + std::to_string(off) + " len " + std::to_string(len));
    size_t done = 0;
    while (done < len) {
      ssize_t n = pwrite(fd, buf.data() + done, len - done, static_cast<off_t>(off + done));
      if (n <= 0) fail_sys("shared pwrite " + what + " (" + std::to_string(len) + " at " + std::to_string(off) + ")");
      done += static_cast<size_t>(n);
    }
    count(len > (1u << 20) ? "write>1MiB" : "write");
  }

  void op_ftruncate() {
    auto [fd, what] = random_fd();
    size_t ns = chance(20) ? 0 : rnd(kSharedSpan + 65536);
    note("ftruncate " + what + " -> " + std::to_string(ns));
    if (ftruncate(fd, static_cast<off_t>(ns)) != 0) fail_sys("shared ftruncate " + what);
    count("ftruncate");
  }

  void op_fallocate() {
    auto [fd, what] = random_fd();
    static const int modes[] = {0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE};
    int mode = modes[rnd(5)];
    size_t off = rnd(kSharedSpan), len = 1 + rnd(chance(80) ? 65536 : 262144);
    note("fallocate mode " + std::to_string(mode) + " " + what + " off " + std::to_string(off) + " len " + std::to_string(len));
    if (fallocate(fd, mode, static_cast<off_t>(off), static_cast<off_t>(len)) != 0) fail_sys("shared fallocate " + what);
    count("fallocate");
  }

  void op_sync() {
    auto [fd, what] = random_fd();
    int r = static_cast<int>(rnd(10));
    const char* name = r < 4 ? "fsync" : r < 8 ? "fdatasync" : "syncfs";
    note(std::string(name) + " " + what);
    int rc = r < 4 ? fsync(fd) : r < 8 ? fdatasync(fd) : syncfs(fd);
    if (rc != 0) fail_sys(std::string("shared ") + name + " " + what);
    count(name);
  }

  void op_create() {
    std::string n = random_name();
    note("create " + n);
    int fd = open(path(n).c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, chance(50) ? 0644 : 0600);
    if (!check(fd, "create", {EEXIST, ENOENT, ENOTDIR})) return;
    std::string buf = random_bytes(1 + rnd(chance(80) ? 20000 : 300000));
    if (pwrite(fd, buf.data(), buf.size(), 0) != static_cast<ssize_t>(buf.size())) fail_sys("shared write after create " + n);
    if (held_.size() < kMaxSharedHeld && chance(50)) hold(fd, n);
    else close(fd);
  }

  // Opens an existing shared name for writing and writes to it; keeps the descriptor sometimes
  // (it may then be written after the name was renamed over or unlinked by another thread).
  void op_open_write() {
    std::string n = random_name();
    note("open+write " + n);
    int fd = open(path(n).c_str(), O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    // ENXIO: a fifo with no reader; ELOOP: a symlink (O_NOFOLLOW); EISDIR: a directory.
    if (!check(fd, "open", {ENOENT, ENOTDIR, EISDIR, ELOOP, ENXIO})) return;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      close(fd);
      count("open (not a regular file)");
      return;
    }
    size_t off = rnd(65536), len = 1 + rnd(16384);
    std::string buf = random_bytes(len);
    if (pwrite(fd, buf.data(), len, static_cast<off_t>(off)) != static_cast<ssize_t>(len)) fail_sys("shared pwrite " + n);
    if (chance(30) && fdatasync(fd) != 0) fail_sys("shared fdatasync " + n);
    if (chance(40)) hold(fd, n);
    else close(fd);
  }

  void op_rename() {
    std::string a = random_name(), b = random_name();
    int r = static_cast<int>(rnd(100));
    unsigned flags = r < 70 ? 0 : r < 85 ? RENAME_NOREPLACE : RENAME_EXCHANGE;
    note("rename " + a + " -> " + b + (flags == RENAME_NOREPLACE ? " NOREPLACE" : flags == RENAME_EXCHANGE ? " EXCHANGE" : ""));
    long rc = renameat2(AT_FDCWD, path(a).c_str(), AT_FDCWD, path(b).c_str(), flags);
    // EINVAL: a directory into itself; EBUSY never (no mount points here).
    check(rc, flags == RENAME_EXCHANGE ? "rename exchange" : flags ? "rename noreplace" : "rename",
          {ENOENT, EEXIST, ENOTDIR, EISDIR, ENOTEMPTY, EINVAL});
  }

  void op_link() {
    std::string a = random_name(), b = random_name();
    note("link " + a + " -> " + b);
    check(link(path(a).c_str(), path(b).c_str()), "link", {ENOENT, EEXIST, ENOTDIR, EPERM});
  }

  void op_unlink() {
    std::string n = random_name();
    note("unlink " + n);
    check(unlink(path(n).c_str()), "unlink", {ENOENT, ENOTDIR, EISDIR});
  }

  void op_mkdir() {
    std::string n = random_name();
    note("mkdir " + n);
    check(mkdir(path(n).c_str(), chance(50) ? 0755 : 0700), "mkdir", {EEXIST, ENOENT, ENOTDIR});
  }

  void op_rmdir() {
    std::string n = random_name();
    note("rmdir " + n);
    check(rmdir(path(n).c_str()), "rmdir", {ENOENT, ENOTDIR, ENOTEMPTY});
  }

  void op_symlink() {
    std::string n = random_name();
    // Targets that resolve (to another shared name, possibly a loop of symlinks) or dangle.
    std::string target = chance(60) ? "../" + random_name() : "nowhere/" + std::to_string(rnd(1000));
    note("symlink " + n + " -> " + target);
    check(symlink(target.c_str(), path(n).c_str()), "symlink", {EEXIST, ENOENT, ENOTDIR});
  }

  void op_mkfifo() {
    std::string n = random_name();
    note("mkfifo " + n);
    check(mkfifo(path(n).c_str(), 0640), "mkfifo", {EEXIST, ENOENT, ENOTDIR});
  }

  void op_chmod() {
    static const mode_t modes[] = {0600, 0644, 0640, 0755, 0700, 0444};
    std::string n = random_name();
    mode_t m = modes[rnd(6)];
    note("chmod " + n + " " + std::to_string(m));
    // Follows symlinks, as chmod(1) does: ELOOP from a loop of them.
    check(chmod(path(n).c_str(), m), "chmod", {ENOENT, ENOTDIR, ELOOP});
  }

  void op_chown() {
    static const uid_t ids[] = {0, 1000, 1001, 65534};
    std::string n = random_name();
    uid_t u = ids[rnd(4)];
    gid_t g = ids[rnd(4)];
    note("lchown " + n + " " + std::to_string(u) + ":" + std::to_string(g));
    check(lchown(path(n).c_str(), u, g), "lchown", {ENOENT, ENOTDIR});
  }

  void op_xattr() {
    std::string n = chance(20) ? "f" + std::to_string(rnd(kSharedFiles)) : random_name();
    std::string k = "user.k" + std::to_string(rnd(3));
    if (chance(70)) {
      std::string v = random_bytes(1 + rnd(chance(90) ? 64 : 4000));
      note("lsetxattr " + n + " " + k + " (" + std::to_string(v.size()) + " bytes)");
      // EPERM: user.* xattrs exist only on regular files and directories (symlinks, fifos).
      // ENOSPC: an entry's xattrs together outgrow the room the backing file system gives them
      // (one 4 KiB block on ext4), which another thread's value of up to 4000 bytes under
      // another key can fill (seed 5129055527149703897 did).
      check(lsetxattr(path(n).c_str(), k.c_str(), v.data(), v.size(), 0), "setxattr", {ENOENT, ENOTDIR, EPERM, ENOSPC});
    } else {
      note("lremovexattr " + n + " " + k);
      check(lremovexattr(path(n).c_str(), k.c_str()), "removexattr", {ENOENT, ENOTDIR, ENODATA, EPERM});
    }
  }

  void op_truncate_path() {
    std::string n = random_name();
    size_t ns = rnd(200000);
    note("truncate " + n + " -> " + std::to_string(ns));
    // Follows symlinks; EINVAL for a fifo, EISDIR for a directory.
    check(truncate(path(n).c_str(), static_cast<off_t>(ns)), "truncate", {ENOENT, ENOTDIR, EISDIR, EINVAL, ELOOP});
  }

  void op_utimens() {
    std::string n = chance(15) ? "f" + std::to_string(rnd(kSharedFiles)) : random_name();
    timespec ts[2];
    ts[0] = {static_cast<time_t>(1500000000 + rnd(100000000)), static_cast<long>(rnd(1000000000))};
    ts[1] = {static_cast<time_t>(1500000000 + rnd(100000000)), static_cast<long>(rnd(1000000000))};
    if (chance(20)) ts[1].tv_nsec = UTIME_NOW;
    note("utimensat " + n);
    check(utimensat(AT_FDCWD, path(n).c_str(), ts, AT_SYMLINK_NOFOLLOW), "utimensat", {ENOENT, ENOTDIR});
  }

  void op_close() {
    if (held_.empty()) return op_pwrite();
    size_t i = rnd(held_.size());
    note("close held fd " + std::to_string(held_[i].fd) + " (" + held_[i].name + ")");
    close(held_[i].fd);
    held_.erase(held_.begin() + static_cast<long>(i));
    count("close");
  }

  // One operation. A failure does not stop the thread: the shared part has no model to lose, and
  // the comparison of the trees at the end still tells what else went wrong.
  void step() {
    ops_++;
    try {
      dispatch();
    } catch (const std::exception& e) {
      if (failures_.size() < 10)
        failures_.push_back("thread " + std::to_string(tid_) + ", shared op #" + std::to_string(ops_) + ": " + e.what() +
                            "\n  last shared operations of that thread:\n" + recent_ops());
      failed_++;
    }
  }

  void dispatch() {
    int r = static_cast<int>(rnd(100));
    if (r < 22) op_pwrite();
    else if (r < 27) op_ftruncate();
    else if (r < 31) op_fallocate();
    else if (r < 37) op_sync();
    else if (r < 45) op_create();
    else if (r < 51) op_open_write();
    else if (r < 60) op_rename();
    else if (r < 64) op_link();
    else if (r < 70) op_unlink();
    else if (r < 73) op_mkdir();
    else if (r < 76) op_rmdir();
    else if (r < 79) op_symlink();
    else if (r < 80) op_mkfifo();
    else if (r < 83) op_chmod();
    else if (r < 85) op_chown();
    else if (r < 90) op_xattr();
    else if (r < 93) op_truncate_path();
    else if (r < 96) op_utimens();
    else op_close();
  }

  int tid_;
  std::mt19937_64 rng_;
  std::string root_;
  std::vector<int> data_fds_ = std::vector<int>(kSharedFiles, -1);
  std::vector<Held> held_;
  int ops_ = 0, failed_ = 0;
  std::deque<std::string> log_;
  std::map<std::string, int> counts_;
  std::vector<std::string> failures_;
};

void Worker::run_shared() {
  if (shared_) shared_->steps();
}

// --- whole-volume checks ---------------------------------------------------------------------

struct Expected {
  std::map<std::string, ObjP> names;  // every name of every thread
};

// not_modelled: top-level names the model does not describe (the sync pair test's shared tree,
// whose truth is the master).
void verify_volume(const Expected& ex, const std::string& mnt, const std::string& data, const std::string& when,
                   const std::set<std::string>& not_modelled = {}) {
  SCOPED_TRACE(when);
  std::set<std::string> model_names;
  for (auto& [n, o] : ex.names) model_names.insert(n);
  std::set<std::string> mount_names = list_dir(mnt);
  std::set<std::string> backing_names = list_dir(data);
  for (auto& n : not_modelled) {
    EXPECT_EQ(mount_names.erase(n), 1u) << n << " missing on the mount";
    EXPECT_EQ(backing_names.erase(n), 1u) << n << " missing in the backing dir";
  }
  EXPECT_EQ(backing_names.count(".blockrepl"), 1u) << "the backing dir must hold .blockrepl";
  backing_names.erase(".blockrepl");
  EXPECT_EQ(mount_names.count(".blockrepl"), 0u) << "the mount must not list .blockrepl";
  EXPECT_EQ(mount_names, model_names) << "mount listing vs model: mount " << set_str(mount_names) << " model " << set_str(model_names);
  EXPECT_EQ(backing_names, model_names) << "backing listing vs model: backing " << set_str(backing_names) << " model " << set_str(model_names);

  std::map<int, ino_t> mount_ino, backing_ino;   // obj id -> inode, for hard links
  std::map<int, std::string> fid_of;             // obj id -> trusted.blockrepl.fid of the backing file
  std::map<std::string, int> obj_of_fid;
  for (auto& [name, obj] : ex.names) {
    std::string mp = mnt + "/" + name, bp = data + "/" + name;
    try {
      fsync_path(mp);
      std::string got = read_whole(mp);
      std::string diff = compare(obj->data, got);
      EXPECT_TRUE(diff.empty()) << name << " (obj " << obj->id << ") on the mount differs from the model: " << diff;
      got = read_whole(bp);
      diff = compare(obj->data, got);
      EXPECT_TRUE(diff.empty()) << name << " (obj " << obj->id << ") in the backing dir differs from the model: " << diff;
    } catch (const std::exception& e) {
      ADD_FAILURE() << name << ": " << e.what();
      continue;
    }
    struct stat sm, sb;
    if (lstat(mp.c_str(), &sm) != 0 || lstat(bp.c_str(), &sb) != 0) {
      ADD_FAILURE() << "lstat of " << name << ": " << errname(errno);
      continue;
    }
    EXPECT_EQ(static_cast<size_t>(sm.st_size), obj->data.size()) << name << ": st_size on the mount vs model";
    EXPECT_EQ(sm.st_size, sb.st_size) << name << ": st_size mount vs backing";
    EXPECT_EQ(sm.st_mode, sb.st_mode) << name << ": st_mode mount vs backing";
    EXPECT_TRUE(S_ISREG(sm.st_mode)) << name << ": must be a regular file";
    EXPECT_EQ(sm.st_nlink, static_cast<nlink_t>(obj->nlink)) << name << ": st_nlink on the mount vs model";
    EXPECT_EQ(sm.st_nlink, sb.st_nlink) << name << ": st_nlink mount vs backing";
    EXPECT_EQ(sm.st_uid, sb.st_uid) << name << ": st_uid mount vs backing";
    if (auto [it, fresh] = mount_ino.emplace(obj->id, sm.st_ino); !fresh) {
      EXPECT_EQ(it->second, sm.st_ino) << name << ": hard links of one file must share the inode on the mount";
    }
    if (auto [it, fresh] = backing_ino.emplace(obj->id, sb.st_ino); !fresh) {
      EXPECT_EQ(it->second, sb.st_ino) << name << ": hard links of one file must share the inode in the backing dir";
    }

    // The file id: present on the backing file, the same for all links, distinct between files,
    // and never visible through the mount.
    char fid[256];
    ssize_t n = getxattr(bp.c_str(), "trusted.blockrepl.fid", fid, sizeof fid);
    EXPECT_GT(n, 0) << name << ": backing file must carry trusted.blockrepl.fid (" << errname(errno) << ")";
    if (n > 0) {
      std::string f(fid, static_cast<size_t>(n));
      if (auto [it, fresh] = fid_of.emplace(obj->id, f); !fresh) {
        EXPECT_EQ(it->second, f) << name << ": links of one file must share the file id";
      }
      if (auto [it, fresh] = obj_of_fid.emplace(f, obj->id); !fresh) {
        EXPECT_EQ(it->second, obj->id) << name << ": two different files share a file id";
      }
    }
    char list[4096];
    ssize_t ln = listxattr(mp.c_str(), list, sizeof list);
    EXPECT_GE(ln, 0) << name << ": listxattr on the mount: " << errname(errno);
    for (ssize_t i = 0; i < ln;) {
      std::string x(list + i);
      EXPECT_NE(x.rfind("trusted.blockrepl.", 0), 0u) << name << ": listxattr on the mount shows " << x;
      i += static_cast<ssize_t>(x.size()) + 1;
    }
    EXPECT_LT(getxattr(mp.c_str(), "trusted.blockrepl.fid", fid, sizeof fid), 0) << name << ": getxattr of the file id through the mount must fail";
  }
}

uint64_t choose_seed() {
  if (const char* s = getenv("BLOCKREPL_SEED"); s && *s) return std::strtoull(s, nullptr, 0);
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

TEST(ExerciserFs, RandomOperationsMatchModelAndBackingDirectory) {
  const uint64_t seed = choose_seed();
  std::cout << "[ exerciser ] seed " << seed << " (BLOCKREPL_SEED=" << seed << " replays it)" << std::endl;
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  SCOPED_TRACE("seed " + std::to_string(seed) + " (BLOCKREPL_SEED=" + std::to_string(seed) + " replays it)");
  int budget_s = 20;
  if (const char* s = getenv("BLOCKREPL_EXERCISER_SECONDS"); s && *s) budget_s = atoi(s);
  if (const char* s = getenv("BLOCKREPL_EXERCISER_OPS"); s && *s) g_ops_per_thread = std::max(1, atoi(s) / kThreads);

  TempDir tmp("exerciser");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  Expected ex;
  {
    Mount m(data, mnt);
    ASSERT_TRUE(m.ok()) << m.error();
    auto start = std::chrono::steady_clock::now();
    auto deadline = start + std::chrono::seconds(budget_s);
    std::vector<std::unique_ptr<Worker>> workers;
    for (int t = 0; t < kThreads; t++)
      workers.push_back(std::make_unique<Worker>(t, seed * 1000003u + static_cast<uint64_t>(t) * 7919u, mnt, data, deadline));
    std::vector<std::thread> threads;
    for (auto& w : workers) threads.emplace_back([&w] { w->run(); });
    for (auto& th : threads) th.join();
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    int total = 0;
    std::map<std::string, int> counts;
    bool failed = false;
    for (auto& w : workers) {
      total += w->ops();
      for (auto& [k, v] : w->counts()) counts[k] += v;
      if (!w->error().empty()) {
        failed = true;
        ADD_FAILURE() << w->error() << "\n  last operations of that thread:\n" << w->recent_ops();
      }
      EXPECT_FALSE(w->stopped_early()) << "a thread ran out of its " << budget_s << " s budget after " << w->ops() << " ops (mount too slow?)";
    }
    std::cout << "[ exerciser ] " << total << " operations in " << secs << " s:";
    for (auto& [k, v] : counts) std::cout << " " << k << "=" << v;
    std::cout << std::endl;
    for (auto& w : workers) w->finish();
    if (failed) return;  // the model no longer describes the volume

    for (auto& w : workers)
      for (auto& [n, o] : w->names()) ex.names[n] = o;
    verify_volume(ex, mnt, data, "after the run, still mounted");
    m.unmount();
    ASSERT_FALSE(is_mounted(mnt)) << "unmount failed";
  }
  // The backing directory alone, then a fresh mount of it.
  {
    std::set<std::string> backing = list_dir(data);
    backing.erase(".blockrepl");
    for (auto& [name, obj] : ex.names) {
      std::string diff = compare(obj->data, read_whole(data + "/" + name));
      EXPECT_TRUE(diff.empty()) << "unmounted backing file " << name << ": " << diff;
    }
  }
  Mount m2(data, mnt);
  ASSERT_TRUE(m2.ok()) << "remount failed: " << m2.error();
  verify_volume(ex, mnt, data, "after unmount and remount");
  // The remounted volume is writable and consistent for further changes.
  if (!ex.names.empty()) {
    const std::string name = ex.names.begin()->first;
    ObjP o = ex.names.begin()->second;
    int fd = open((mnt + "/" + name).c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    ASSERT_GE(fd, 0) << errname(errno);
    ASSERT_EQ(write(fd, "after remount", 13), 13) << errname(errno);
    ASSERT_EQ(fsync(fd), 0) << errname(errno);
    close(fd);
    o->data += "after remount";
    EXPECT_EQ(compare(o->data, read_whole(mnt + "/" + name)), "") << "append after remount (mount)";
    EXPECT_EQ(compare(o->data, read_whole(data + "/" + name)), "") << "append after remount (backing)";
  }
}

// --- the sync pair ---------------------------------------------------------------------------

// What four views of one volume must agree on: the master's backing directory and mount, the
// slave's backing directory and mount. Names (recursively), types, sizes, bytes, modes, owners,
// symlink targets, user.* xattrs, hard-link groups, and the mtimes of files and directories
// (README "Times": replicas carry the master's mtimes exactly); the backing directories also
// the same file ids. Returns how many entries the master's backing tree holds.
size_t expect_four_views_agree(const repl::Node& m, const repl::Node& s, const std::string& when) {
  SCOPED_TRACE(when);
  repl::CompareOptions all;
  all.file_mtimes = true;
  repl::CompareOptions mount = all;
  mount.fid = false;  // the mount never shows trusted.blockrepl.fid
  EXPECT_EQ(repl::diff_report(m.data, s.data, all, "master backing", "slave backing"), "");
  EXPECT_EQ(repl::diff_report(s.data, s.mnt, mount, "slave backing", "slave mount"), "");
  // The master's mount against the rest, its regular files' mtimes apart, which are the
  // kernel's own under the writeback cache and checked on their own below.
  repl::CompareOptions master_mount = mount;
  master_mount.file_mtimes = false;
  EXPECT_EQ(repl::diff_report(m.data, m.mnt, master_mount, "master backing", "master mount"), "");
  EXPECT_EQ(repl::diff_report(m.mnt, s.mnt, master_mount, "master mount", "slave mount"), "");
  // Not compared: the master mount's own view of file mtimes against its backing directory.
  // Under the writeback cache the kernel keeps a written file's mtime itself (the time of the
  // write(2)), while the backing file gets the time the daemon wrote the pages; the two can
  // differ by the writeback delay. Replicas carry the backing directory's times (compared above).
  return repl::scan_tree(m.data).size();
}

// A slave never fails to apply a record of its master (it would stop streaming and re-attach).
void expect_clean_slave_log(const repl::Node& s) {
  std::string log;
  try {
    log = read_file(s.log);
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
    return;
  }
  std::istringstream in(log);
  std::string line, bad;
  while (std::getline(in, line))
    if (line.find("cannot apply") != std::string::npos) bad += "  " + line + "\n";
  EXPECT_EQ(bad, "") << "the slave failed to apply records of its master:\n" << bad;
}

// The slave holds the master's last LSN: durable there (wait_durable), and its own lsn the same.
void expect_slave_at_master_lsn(const repl::Node& m, const repl::Node& s) {
  uint64_t lsn = 0;
  ASSERT_NO_THROW(lsn = repl::lsn_of(m.mnt));
  ASSERT_EQ(repl::wait_durable(s.mnt, lsn, std::chrono::seconds(60)), "");
  uint64_t slsn = 0;
  EXPECT_TRUE(repl::wait_until([&] { return (slsn = repl::lsn_of(s.mnt)) == lsn; }, std::chrono::seconds(10)))
      << "slave lsn " << slsn << ", master lsn " << lsn;
  std::cout << "[ exerciser ] master and slave at lsn " << lsn << std::endl;
}

// Four threads on the master of a sync pair: each runs the model-checked exerciser on its own
// names and, interleaved, conflicting operations on the shared tree (SharedOps). The lead's
// parallel apply must publish them in one LSN order that replays to the master's state: the
// slave must end byte for byte equal to the master, and again after it re-attaches.
TEST(ExerciserFs, SyncPairFourWritersReplicaMatchesMaster) {
  const uint64_t seed = choose_seed();
  std::cout << "[ exerciser ] seed " << seed << " (BLOCKREPL_SEED=" << seed << " replays it)" << std::endl;
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  SCOPED_TRACE("seed " + std::to_string(seed) + " (BLOCKREPL_SEED=" + std::to_string(seed) + " replays it)");
  int budget_s = 30;
  if (const char* s = getenv("BLOCKREPL_EXERCISER_SECONDS"); s && *s) budget_s = atoi(s);
  g_ops_per_thread = 500;  // ~2000 private operations and about as many shared ones
  if (const char* s = getenv("BLOCKREPL_EXERCISER_OPS"); s && *s) g_ops_per_thread = std::max(1, atoi(s) / kThreads);
  const auto t0 = std::chrono::steady_clock::now();

  repl::Cluster c("exerciser-pair");
  repl::Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  repl::Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  ASSERT_NO_THROW(make_shared_tree(m.mnt));
  // Streaming before the load starts, so that every barrier of the run waits for the slave.
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");

  Expected ex;
  {
    auto start = std::chrono::steady_clock::now();
    auto deadline = start + std::chrono::seconds(budget_s);
    std::vector<std::unique_ptr<SharedOps>> shared;
    std::vector<std::unique_ptr<Worker>> workers;
    for (int t = 0; t < kThreads; t++) {
      shared.push_back(std::make_unique<SharedOps>(t, seed * 7777777u + static_cast<uint64_t>(t) * 104729u, m.mnt));
      workers.push_back(std::make_unique<Worker>(t, seed * 1000003u + static_cast<uint64_t>(t) * 7919u, m.mnt, m.data,
                                                 deadline, shared.back().get()));
    }
    std::vector<std::thread> threads;
    for (auto& w : workers) threads.emplace_back([&w] { w->run(); });
    for (auto& th : threads) th.join();
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    int total = 0, shared_total = 0;
    std::map<std::string, int> counts;
    bool failed = false;
    for (int t = 0; t < kThreads; t++) {
      Worker& w = *workers[static_cast<size_t>(t)];
      total += w.ops();
      shared_total += shared[static_cast<size_t>(t)]->ops();
      for (auto& [k, v] : w.counts()) counts[k] += v;
      for (auto& [k, v] : shared[static_cast<size_t>(t)]->counts()) counts[k] += v;
      if (!w.error().empty()) {
        failed = true;
        ADD_FAILURE() << w.error() << "\n  last operations of that thread:\n" << w.recent_ops()
                      << "  and its last shared operations:\n" << shared[static_cast<size_t>(t)]->recent_ops();
      }
      EXPECT_FALSE(w.stopped_early()) << "a thread ran out of its " << budget_s << " s budget after " << w.ops()
                                      << " ops (mount too slow?)";
      const SharedOps& sh = *shared[static_cast<size_t>(t)];
      for (auto& f : sh.failures()) ADD_FAILURE() << f;
      EXPECT_EQ(sh.failed(), 0) << "thread " << t << ": shared operations that failed with an errno no race explains";
    }
    std::cout << "[ exerciser ] " << total << " private and " << shared_total << " shared operations in " << secs << " s:";
    for (auto& [k, v] : counts) std::cout << " " << k << "=" << v;
    std::cout << std::endl;
    for (auto& w : workers) w->finish();
    for (auto& sh : shared) sh->finish();
    if (failed) return;  // a private model no longer describes the volume
    for (auto& w : workers)
      for (auto& [n, o] : w->names()) ex.names[n] = o;
  }
  verify_volume(ex, m.mnt, m.data, "master after the run", {"shared"});

  // Everything durable on the master (syncfs, then the sync point's fsyncs and its barrier);
  // with --ack sync that holds the slave too, and its status must say so.
  {
    int fd = open(m.mnt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << errname(errno);
    EXPECT_EQ(syncfs(fd), 0) << errname(errno);
    close(fd);
  }
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}, std::chrono::seconds(60)), "");
  expect_slave_at_master_lsn(m, s);
  size_t entries = expect_four_views_agree(m, s, "after the run");
  std::cout << "[ exerciser ] " << entries << " entries compared in each view" << std::endl;
  expect_clean_slave_log(s);
  CommandResult v = run_blockrepl({"verify", s.mnt}, 120);
  EXPECT_EQ(v.exit_code, 0) << "blockrepl verify " << s.mnt << ": " << v.out << v.err;

  // The slave leaves and comes back: a re-attach must give the same state again.
  c.unmount(s);
  ASSERT_FALSE(is_mounted(s.mnt)) << "the slave did not unmount";
  ASSERT_TRUE(c.mount(s)) << "the slave did not mount again";
  expect_slave_at_master_lsn(m, s);
  if (auto st = repl::status(s.mnt); st.is_object() && st["last_attach"].is_object())
    std::cout << "[ exerciser ] the slave re-attached by " << st["last_attach"].value("method", std::string("?")) << std::endl;
  expect_four_views_agree(m, s, "after the slave re-attached");
  expect_clean_slave_log(s);
  verify_volume(ex, m.mnt, m.data, "master at the end", {"shared"});
  std::cout << "[ exerciser ] total " << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
            << " s" << std::endl;
}

}  // namespace
}  // namespace blockrepl::test
