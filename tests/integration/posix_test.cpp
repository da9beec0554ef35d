// POSIX behaviours that storage engines rely on, one focused test each, on a real blockrepl mount.
// Every test asserts real values (contents, sizes, modes, errnos), on the mount and, where the
// behaviour must reach the disk, on the backing file as well.
#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <dirent.h>
#include <fcntl.h>
#include <functional>
#include <grp.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>
#include <vector>

#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

constexpr const char kFidXattr[] = "trusted.blockrepl.fid";
constexpr const char kReservedPrefix[] = "trusted.blockrepl.";

// A descriptor that is closed at scope exit.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  void reset() {
    if (fd >= 0) close(fd);
    fd = -1;
  }
  operator int() const { return fd; }
};

int open_or_throw(const std::string& p, int flags, mode_t mode = 0644) {
  int fd = open(p.c_str(), flags | O_CLOEXEC, mode);
  if (fd < 0) fail_sys("open(" + p + ")");
  return fd;
}

void pwrite_all(int fd, const void* buf, size_t len, off_t off) {
  const char* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = pwrite(fd, p, len, off);
    if (n < 0) fail_sys("pwrite at " + std::to_string(off));
    if (n == 0) throw std::runtime_error("pwrite returned 0");
    p += n;
    len -= static_cast<size_t>(n);
    off += n;
  }
}
void pwrite_all(int fd, const std::string& s, off_t off) { pwrite_all(fd, s.data(), s.size(), off); }

void write_all(int fd, const std::string& s) {
  ssize_t n = write(fd, s.data(), s.size());
  if (n < 0) fail_sys("write");
  if (static_cast<size_t>(n) != s.size())
    throw std::runtime_error("short write: " + std::to_string(n) + " of " + std::to_string(s.size()));
}

std::string pread_n(int fd, size_t len, off_t off) {
  std::string out(len, '\0');
  size_t got = 0;
  while (got < len) {
    ssize_t n = pread(fd, out.data() + got, len - got, off + static_cast<off_t>(got));
    if (n < 0) fail_sys("pread at " + std::to_string(off + static_cast<off_t>(got)));
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  out.resize(got);
  return out;
}

struct stat stat_of(const std::string& p) {
  struct stat st;
  if (stat(p.c_str(), &st) != 0) fail_sys("stat(" + p + ")");
  return st;
}
struct stat lstat_of(const std::string& p) {
  struct stat st;
  if (lstat(p.c_str(), &st) != 0) fail_sys("lstat(" + p + ")");
  return st;
}
struct stat fstat_of(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) fail_sys("fstat");
  return st;
}

// errno of stat(p), 0 if it exists.
int stat_errno(const std::string& p) {
  struct stat st;
  return lstat(p.c_str(), &st) == 0 ? 0 : errno;
}


// Deterministic, non-repeating-looking bytes.
std::string pattern(size_t n, uint32_t seed) {
  std::string s(n, '\0');
  uint32_t x = seed * 2654435761u + 12345u;
  for (size_t i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    s[i] = static_cast<char>('a' + x % 26);
  }
  return s;
}

// Offset of the first differing byte, or -1 if equal (sizes included).
long first_diff(const std::string& a, const std::string& b) {
  size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; i++)
    if (a[i] != b[i]) return static_cast<long>(i);
  return a.size() == b.size() ? -1 : static_cast<long>(n);
}

#define EXPECT_SAME_BYTES(expected, actual, what)                                                   \
  do {                                                                                              \
    const std::string& e_ = (expected);                                                             \
    const std::string& a_ = (actual);                                                               \
    EXPECT_TRUE(e_ == a_) << what << ": expected " << e_.size() << " bytes, got " << a_.size()     \
                          << " bytes; first difference at offset " << first_diff(e_, a_);          \
  } while (0)

std::vector<std::string> list_xattrs(const std::string& p) {
  ssize_t n = listxattr(p.c_str(), nullptr, 0);
  if (n < 0) fail_sys("listxattr(" + p + ", size query)");
  std::vector<char> buf(static_cast<size_t>(n) + 1);
  n = listxattr(p.c_str(), buf.data(), buf.size());
  if (n < 0) fail_sys("listxattr(" + p + ")");
  std::vector<std::string> names;
  for (ssize_t i = 0; i < n;) {
    std::string nm(buf.data() + i);
    names.push_back(nm);
    i += static_cast<ssize_t>(nm.size()) + 1;
  }
  return names;
}

bool has_reserved_xattr(const std::vector<std::string>& names) {
  for (auto& n : names)
    if (n.rfind(kReservedPrefix, 0) == 0) return true;
  return false;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += (s.empty() ? "" : ",") + x;
  return "[" + s + "]";
}

std::string get_xattr(const std::string& p, const char* name) {
  ssize_t n = getxattr(p.c_str(), name, nullptr, 0);
  if (n < 0) fail_sys(std::string("getxattr(") + p + ", " + name + ")");
  std::string v(static_cast<size_t>(n), '\0');
  n = getxattr(p.c_str(), name, v.data(), v.size());
  if (n < 0) fail_sys(std::string("getxattr(") + p + ", " + name + ")");
  v.resize(static_cast<size_t>(n));
  return v;
}

// Runs fn in a forked child; returns what fn returned ("" means success) or how the child died.
std::string in_child(const std::function<std::string()>& fn) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) fail_sys("pipe");
  pid_t pid = fork();
  if (pid < 0) fail_sys("fork");
  if (pid == 0) {
    close(p[0]);
    std::string r;
    try {
      r = fn();
    } catch (const std::exception& ex) {
      r = std::string("exception: ") + ex.what();
    }
    if (!r.empty()) (void)!write(p[1], r.data(), r.size());
    _exit(0);
  }
  close(p[1]);
  std::string msg;
  char buf[512];
  ssize_t n;
  while ((n = read(p[0], buf, sizeof buf)) > 0) msg.append(buf, static_cast<size_t>(n));
  close(p[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    msg += " (child ended abnormally, status " + std::to_string(status) + ")";
  return msg;
}

// Drops the privileges of the calling (child) process to uid/gid; returns "" or an error.
std::string become(uid_t uid, gid_t gid) {
  if (setgroups(0, nullptr) != 0) return "setgroups: " + errname(errno);
  if (setgid(gid) != 0) return "setgid: " + errname(errno);
  if (setuid(uid) != 0) return "setuid: " + errname(errno);
  return "";
}

struct AlignedBuf {
  void* p = nullptr;
  explicit AlignedBuf(size_t n) {
    if (posix_memalign(&p, 4096, n) != 0) throw std::runtime_error("posix_memalign");
  }
  ~AlignedBuf() { free(p); }
  char* data() { return static_cast<char*>(p); }
};

struct Mapping {
  void* p = MAP_FAILED;
  size_t len = 0;
  Mapping(int fd, size_t n, int prot) : len(n) {
    p = mmap(nullptr, n, prot, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) fail_sys("mmap");
  }
  ~Mapping() {
    if (p != MAP_FAILED) munmap(p, len);
  }
  char* data() { return static_cast<char*>(p); }
};

// One mount for the whole suite (mounting and unmounting costs seconds); every test works in a
// directory of its own below the mount root, named after the test.
class PosixFs : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = new TempDir("posix");
    data_ = tmp_->sub("data");
    mnt_ = tmp_->sub("mnt");
    mount_ = new Mount(data_, mnt_);
  }
  static void TearDownTestSuite() {
    delete mount_;
    mount_ = nullptr;
    delete tmp_;
    tmp_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(mount_ && mount_->ok()) << "mount of " << data_ << " on " << mnt_ << " failed: " << (mount_ ? mount_->error() : "");
    ASSERT_TRUE(is_mounted(mnt_)) << mnt_ << " is not mounted any more (an earlier test broke the mount?)";
    name_ = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    dir_ = mnt_ + "/" + name_;
    bdir_ = data_ + "/" + name_;
    ASSERT_EQ(mkdir(dir_.c_str(), 0755), 0) << "mkdir " << dir_ << ": " << errname(errno);
  }
  std::string m(const std::string& rel) const { return dir_ + "/" + rel; }   // through the mount
  std::string b(const std::string& rel) const { return bdir_ + "/" + rel; }  // the backing file

  static TempDir* tmp_;
  static std::string data_, mnt_;
  static Mount* mount_;
  std::string name_, dir_, bdir_;
};
TempDir* PosixFs::tmp_ = nullptr;
std::string PosixFs::data_, PosixFs::mnt_;
Mount* PosixFs::mount_ = nullptr;

// --- durability calls ------------------------------------------------------------------------

TEST_F(PosixFs, FsyncFdatasyncAndFsyncdirReturnZero) {
  Fd fd(open_or_throw(m("f"), O_CREAT | O_RDWR));
  pwrite_all(fd, "durable data", 0);
  EXPECT_EQ(fsync(fd), 0) << "fsync on a file: expected 0, got errno " << errname(errno);
  pwrite_all(fd, "more", 12);
  EXPECT_EQ(fdatasync(fd), 0) << "fdatasync on a file: expected 0, got errno " << errname(errno);
  // Repeat: a filesystem that once answered ENOSYS makes the kernel skip the call forever after.
  EXPECT_EQ(fsync(fd), 0) << "second fsync: expected 0, got errno " << errname(errno);
  EXPECT_EQ(fdatasync(fd), 0) << "second fdatasync: expected 0, got errno " << errname(errno);
  EXPECT_EQ(read_file(b("f")), "durable datamore") << "after fsync the backing file must hold the data";

  Fd ro(open_or_throw(m("f"), O_RDONLY));
  EXPECT_EQ(fsync(ro), 0) << "fsync on a read-only descriptor: expected 0, got errno " << errname(errno);

  ASSERT_EQ(mkdir(m("dir").c_str(), 0755), 0) << errname(errno);
  Fd dfd(open_or_throw(m("dir"), O_RDONLY | O_DIRECTORY));
  EXPECT_EQ(fsync(dfd), 0) << "fsync on a directory (fsyncdir): expected 0, got errno " << errname(errno);
  EXPECT_EQ(fdatasync(dfd), 0) << "fdatasync on a directory: expected 0, got errno " << errname(errno);
  EXPECT_EQ(fsync(dfd), 0) << "second fsyncdir: expected 0, got errno " << errname(errno);
  Fd root(open_or_throw(mnt_, O_RDONLY | O_DIRECTORY));
  EXPECT_EQ(fsync(root), 0) << "fsync on the mount root: expected 0, got errno " << errname(errno);
  EXPECT_EQ(syncfs(fd), 0) << "syncfs: expected 0, got errno " << errname(errno);
}

// The kernel writes back the times of a file that was renamed over after its last close; the
// daemon cannot find that file any more, and syncfs must still succeed (it failed with ENOENT).
TEST_F(PosixFs, SyncfsAfterAWrittenFileWasRenamedOverSucceeds) {
  {
    Fd a(open_or_throw(m("a"), O_CREAT | O_RDWR));
    pwrite_all(a, std::string(100, 'x'), 0);
  }
  {
    Fd b(open_or_throw(m("b"), O_CREAT | O_RDWR));
    pwrite_all(b, "y", 0);
  }
  ASSERT_EQ(rename(m("b").c_str(), m("a").c_str()), 0) << errname(errno);
  Fd root(open_or_throw(mnt_, O_RDONLY | O_DIRECTORY));
  EXPECT_EQ(syncfs(root), 0) << "syncfs: expected 0, got errno " << errname(errno);
  EXPECT_EQ(read_file(b("a")), "y");
}

// The return value cannot show an ENOSYS answer: the kernel turns it into 0 and stops sending
// fsync/fsyncdir for good. So this test traces the FUSE requests (--fuse-debug, libfuse 3.14's
// "unique: N, opcode: FSYNCDIR (30)" / "unique: N, success" lines) and checks that every call
// reached the daemon and was answered with success.
TEST(PosixFsOwnMount, FsyncAndFsyncdirReachTheDaemon) {
  TempDir tmp("posix-trace");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt"), log = tmp.path() + "/fuse.log";
  {
    Mount mount(data, mnt, {"--fuse-debug", "--log-file", log});
    ASSERT_TRUE(mount.ok()) << mount.error();
    Fd fd(open_or_throw(mnt + "/f", O_CREAT | O_RDWR));
    Fd dir(open_or_throw(mnt, O_RDONLY | O_DIRECTORY));
    for (int i = 0; i < 3; i++) {
      pwrite_all(fd, "data " + std::to_string(i), 0);
      EXPECT_EQ(fsync(fd), 0) << "fsync #" << i << ": " << errname(errno);
      pwrite_all(fd, "more " + std::to_string(i), 100);
      EXPECT_EQ(fdatasync(fd), 0) << "fdatasync #" << i << ": " << errname(errno);
      EXPECT_EQ(fsync(dir), 0) << "fsyncdir #" << i << ": " << errname(errno);
    }
    fd.reset();
    dir.reset();
    mount.unmount();
  }
  std::string text;
  ASSERT_NO_THROW(text = read_file(log)) << "the daemon wrote no log at " << log;
  std::map<std::string, std::string> op_of;  // unique -> opcode
  std::map<std::string, int> ok, failed;
  std::string failures;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    std::string line = text.substr(pos, eol - pos);
    pos = eol + 1;
    size_t u = line.find("unique: ");
    if (u == std::string::npos) continue;
    size_t comma = line.find(',', u);
    if (comma == std::string::npos) continue;
    std::string id = line.substr(u + 8, comma - u - 8);
    size_t o = line.find("opcode: ", comma);
    if (o != std::string::npos) {
      op_of[id] = line.substr(o + 8, line.find(' ', o + 8) - o - 8);
    } else if (op_of.count(id)) {
      const std::string& op = op_of[id];
      if (line.find("success", comma) != std::string::npos) ok[op]++;
      else if (line.find("error", comma) != std::string::npos) {
        failed[op]++;
        if (op.rfind("FSYNC", 0) == 0) failures += "\n  " + op + ": " + line;
      }
    }
  }
  ASSERT_FALSE(op_of.empty()) << "no FUSE requests traced in " << log << " (did --fuse-debug/--log-file change?)";
  EXPECT_GE(ok["FSYNC"], 6) << "3 fsync + 3 fdatasync calls must each reach the daemon as FSYNC and succeed; "
                            << ok["FSYNC"] << " did" << failures;
  EXPECT_GE(ok["FSYNCDIR"], 3) << "3 fsync calls on a directory must each reach the daemon as FSYNCDIR and succeed; "
                               << ok["FSYNCDIR"] << " did" << failures;
  EXPECT_EQ(failed["FSYNC"], 0) << "FSYNC answered with an error" << failures;
  EXPECT_EQ(failed["FSYNCDIR"], 0) << "FSYNCDIR answered with an error" << failures;
}

TEST_F(PosixFs, OSyncAndODsyncWritesReachTheBackingFile) {
  Fd s(open_or_throw(m("sync"), O_CREAT | O_WRONLY | O_SYNC));
  write_all(s, "o_sync write");
  EXPECT_EQ(read_file(b("sync")), "o_sync write") << "an O_SYNC write must be in the backing file when write() returns";
  Fd d(open_or_throw(m("dsync"), O_CREAT | O_WRONLY | O_DSYNC));
  write_all(d, "o_dsync write");
  EXPECT_EQ(read_file(b("dsync")), "o_dsync write") << "an O_DSYNC write must be in the backing file when write() returns";
}

// --- O_APPEND --------------------------------------------------------------------------------

TEST_F(PosixFs, AppendFromTwoDescriptorsInterleaved) {
  write_file(m("log"), "base:");
  Fd a(open_or_throw(m("log"), O_WRONLY | O_APPEND));
  Fd c(open_or_throw(m("log"), O_WRONLY | O_APPEND));
  std::string expected = "base:";
  for (int i = 0; i < 200; i++) {
    std::string rec = std::string(i % 2 ? "B" : "A") + std::to_string(i) + (i % 7 == 0 ? std::string(5000, 'x') : "") + ";";
    write_all(i % 2 ? c : a, rec);
    expected += rec;
    off_t pos = lseek(i % 2 ? c : a, 0, SEEK_CUR);
    ASSERT_EQ(pos, static_cast<off_t>(expected.size())) << "after append #" << i << " the file offset must be the new end of file";
  }
  EXPECT_SAME_BYTES(expected, read_file(m("log")), "interleaved appends read through the mount");
  EXPECT_EQ(fstat_of(a).st_size, static_cast<off_t>(expected.size())) << "st_size after appends";
  ASSERT_EQ(fsync(a), 0) << errname(errno);
  ASSERT_EQ(fsync(c), 0) << errname(errno);
  EXPECT_SAME_BYTES(expected, read_file(b("log")), "interleaved appends in the backing file");
}

TEST_F(PosixFs, AppendAfterTheFileWasChangedThroughAnotherDescriptor) {
  write_file(m("f"), "0123456789");
  Fd ap(open_or_throw(m("f"), O_WRONLY | O_APPEND));
  Fd rw(open_or_throw(m("f"), O_RDWR));
  std::string expected = "0123456789";

  // Extended by a pwrite through another descriptor: the append lands after it.
  pwrite_all(rw, "XYZ", 100);
  expected.resize(100, '\0');
  expected += "XYZ";
  write_all(ap, "tail");
  expected += "tail";
  EXPECT_SAME_BYTES(expected, read_file(m("f")), "append after another descriptor extended the file by pwrite");

  // Extended by ftruncate through another descriptor.
  ASSERT_EQ(ftruncate(rw, 200), 0) << errname(errno);
  expected.resize(200, '\0');
  write_all(ap, "more");
  expected += "more";
  EXPECT_SAME_BYTES(expected, read_file(m("f")), "append after another descriptor grew the file by ftruncate");

  // Shrunk through another descriptor: the append lands at the new, smaller end.
  ASSERT_EQ(ftruncate(rw, 50), 0) << errname(errno);
  expected.resize(50);
  write_all(ap, "end");
  expected += "end";
  EXPECT_SAME_BYTES(expected, read_file(m("f")), "append after another descriptor shrank the file");

  // Extended through the path by a different open (as another process would).
  {
    Fd other(open_or_throw(m("f"), O_WRONLY));
    pwrite_all(other, "far", 4096 + 10);
  }
  expected.resize(4096 + 10, '\0');
  expected += "far";
  write_all(ap, "!");
  expected += "!";
  EXPECT_SAME_BYTES(expected, read_file(m("f")), "append after a separate open extended the file");

  ASSERT_EQ(fsync(ap), 0) << errname(errno);
  EXPECT_SAME_BYTES(expected, read_file(b("f")), "backing file after appends");
}

// --- O_DIRECT --------------------------------------------------------------------------------

TEST_F(PosixFs, ODirectAlignedWriteAndRead) {
  constexpr size_t kA = 64 * 1024, kB = 8 * 1024;
  int raw = open(m("direct").c_str(), O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0644);
  ASSERT_GE(raw, 0) << "open(O_CREAT|O_RDWR|O_DIRECT): expected a descriptor, got " << errname(errno);
  Fd fd(raw);
  AlignedBuf wa(kA), wb(kB), r(kA);
  std::string pa = pattern(kA, 1), pb = pattern(kB, 2);
  memcpy(wa.data(), pa.data(), kA);
  memcpy(wb.data(), pb.data(), kB);
  ASSERT_EQ(pwrite(fd, wa.data(), kA, 0), static_cast<ssize_t>(kA)) << "O_DIRECT pwrite at 0: " << errname(errno);
  ASSERT_EQ(pwrite(fd, wb.data(), kB, 128 * 1024), static_cast<ssize_t>(kB)) << "O_DIRECT pwrite at 128 KiB: " << errname(errno);
  std::string expected = pa + std::string(64 * 1024, '\0') + pb;

  ASSERT_EQ(pread(fd, r.data(), kA, 0), static_cast<ssize_t>(kA)) << "O_DIRECT pread at 0: " << errname(errno);
  EXPECT_SAME_BYTES(pa, std::string(r.data(), kA), "O_DIRECT read back at 0");
  ASSERT_EQ(pread(fd, r.data(), kB, 128 * 1024), static_cast<ssize_t>(kB)) << "O_DIRECT pread at 128 KiB: " << errname(errno);
  EXPECT_SAME_BYTES(pb, std::string(r.data(), kB), "O_DIRECT read back at 128 KiB");
  ASSERT_EQ(pread(fd, r.data(), kA, 64 * 1024), static_cast<ssize_t>(kA)) << "O_DIRECT pread of the hole: " << errname(errno);
  EXPECT_SAME_BYTES(std::string(kA, '\0'), std::string(r.data(), kA), "O_DIRECT read of the hole between the writes");

  EXPECT_SAME_BYTES(expected, read_file(m("direct")), "normal read of an O_DIRECT-written file");
  ASSERT_EQ(fsync(fd), 0) << errname(errno);
  EXPECT_SAME_BYTES(expected, read_file(b("direct")), "backing file of an O_DIRECT-written file");

  // Coherence: a buffered descriptor caches pages, an O_DIRECT write replaces them, the buffered
  // descriptor must see the new data; and a buffered write is seen by an O_DIRECT read.
  Fd buffered(open_or_throw(m("direct"), O_RDWR));
  EXPECT_EQ(pread_n(buffered, kA, 0), pa) << "buffered read before the O_DIRECT overwrite";
  std::string pc = pattern(kA, 3);
  memcpy(wa.data(), pc.data(), kA);
  ASSERT_EQ(pwrite(fd, wa.data(), kA, 0), static_cast<ssize_t>(kA)) << errname(errno);
  EXPECT_SAME_BYTES(pc, pread_n(buffered, kA, 0), "buffered read after an O_DIRECT overwrite (stale page cache?)");
  std::string pd = pattern(4096, 4);
  pwrite_all(buffered, pd, 4096);
  ASSERT_EQ(pread(fd, r.data(), 8192, 0), 8192) << errname(errno);
  EXPECT_SAME_BYTES(pc.substr(0, 4096) + pd, std::string(r.data(), 8192), "O_DIRECT read after a buffered write");
  ASSERT_EQ(fsync(buffered), 0) << errname(errno);
  std::string now = read_file(b("direct"));
  EXPECT_SAME_BYTES(pc.substr(0, 4096) + pd + pc.substr(8192), now.substr(0, kA), "backing file after mixed direct/buffered writes");
}

// --- large sequential writes -------------------------------------------------------------------

// The mount bounds its dirty pages (fs/filesystem.cpp, kMaxDirtyBytes: 64 MiB), so a large
// sequential write reaches the daemon, and the backing file, while it is being written instead
// of all at its final fsync (the kernel's writeback would otherwise wait up to 30 s). And the
// daemon writes such large aligned pieces past the backing file's page cache (O_DIRECT,
// replica.cpp): the mount's own page cache already holds them.
TEST_F(PosixFs, ALargeSequentialWriteReachesTheBackingFileBeforeItsFsync) {
  constexpr size_t kChunk = size_t{1} << 20, kTotal = 256 * kChunk;
  Fd fd(open_or_throw(m("big"), O_CREAT | O_WRONLY | O_TRUNC));
  const std::string chunk = pattern(kChunk, 7);
  for (size_t off = 0; off < kTotal; off += kChunk) pwrite_all(fd, chunk, static_cast<off_t>(off));
  const uint64_t reached = static_cast<uint64_t>(stat_of(b("big")).st_blocks) * 512;
  EXPECT_GE(reached, kTotal / 2) << "of " << kTotal << " bytes written, only " << reached
                                 << " reached the backing file before fsync: the mount's dirty pages are not bounded";
  ASSERT_EQ(fsync(fd), 0) << errname(errno);
  EXPECT_EQ(static_cast<uint64_t>(stat_of(b("big")).st_size), kTotal);

  Fd backing(open_or_throw(b("big"), O_RDONLY));
  Mapping map(backing, kTotal, PROT_READ);
  std::vector<unsigned char> resident(kTotal / 4096);
  ASSERT_EQ(mincore(map.data(), kTotal, resident.data()), 0) << errname(errno);
  const size_t cached = static_cast<size_t>(std::count_if(resident.begin(), resident.end(), [](unsigned char c) { return c & 1; }));
  EXPECT_LT(cached, resident.size() / 4) << cached << " of " << resident.size()
                                         << " pages of the backing file are in its page cache: the daemon wrote them buffered";
  EXPECT_SAME_BYTES(chunk, pread_n(backing, kChunk, static_cast<off_t>(kTotal - kChunk)), "the backing file's last MiB");
  ASSERT_EQ(unlink(m("big").c_str()), 0) << errname(errno);
}

// --- writeback cache ---------------------------------------------------------------------------

TEST_F(PosixFs, WriteOnlyDescriptorWritesAreSeenByOtherReaders) {
  // A file whose pages are not in the page cache, so partial-page writes through a write-only
  // descriptor make the kernel read the rest of each page from the daemon.
  std::string expected = pattern(3 * 4096 + 100, 7);
  write_file(m("wo"), expected);
  {
    Fd f(open_or_throw(m("wo"), O_RDONLY));
    ASSERT_EQ(fsync(f), 0) << errname(errno);
    ASSERT_EQ(posix_fadvise(f, 0, 0, POSIX_FADV_DONTNEED), 0);
  }
  Fd w(open_or_throw(m("wo"), O_WRONLY));
  pwrite_all(w, "HELLO", 4094);  // straddles the first page boundary
  expected.replace(4094, 5, "HELLO");
  pwrite_all(w, "mid", 2 * 4096 + 1);
  expected.replace(2 * 4096 + 1, 3, "mid");
  pwrite_all(w, "tail", static_cast<off_t>(expected.size()) + 50);  // past EOF: a hole, then data
  expected.resize(expected.size() + 50, '\0');
  expected += "tail";

  Fd r(open_or_throw(m("wo"), O_RDONLY));
  EXPECT_SAME_BYTES(expected, pread_n(r, expected.size() + 100, 0), "read through another descriptor while the writer is open");
  EXPECT_EQ(fstat_of(r).st_size, static_cast<off_t>(expected.size())) << "st_size seen by the reader";
  {
    Mapping map(r, expected.size(), PROT_READ);
    EXPECT_SAME_BYTES(expected, std::string(map.data(), expected.size()), "read through a shared read-only mapping");
  }
  ASSERT_EQ(fsync(w), 0) << errname(errno);
  EXPECT_SAME_BYTES(expected, read_file(b("wo")), "backing file after fsync of the write-only descriptor");
  w.reset();
  EXPECT_SAME_BYTES(expected, read_file(m("wo")), "read after the writer closed");
}

// --- truncate --------------------------------------------------------------------------------

TEST_F(PosixFs, TruncateAndFtruncateGrowAndShrink) {
  std::string a = pattern(10000, 11);
  write_file(m("t"), a);

  ASSERT_EQ(truncate(m("t").c_str(), 20000), 0) << "truncate(path) grow: " << errname(errno);
  EXPECT_EQ(stat_of(m("t")).st_size, 20000) << "size after truncate(path, 20000)";
  EXPECT_SAME_BYTES(a + std::string(10000, '\0'), read_file(m("t")), "contents after truncate(path) grow (zeros past old EOF)");

  Fd fd(open_or_throw(m("t"), O_RDWR));
  ASSERT_EQ(ftruncate(fd, 3000), 0) << "ftruncate shrink: " << errname(errno);
  EXPECT_EQ(fstat_of(fd).st_size, 3000) << "size after ftruncate(3000)";
  EXPECT_SAME_BYTES(a.substr(0, 3000), read_file(m("t")), "contents after ftruncate shrink");

  // Growing again must show zeros, never the old bytes that were cut off.
  ASSERT_EQ(ftruncate(fd, 8000), 0) << "ftruncate grow: " << errname(errno);
  EXPECT_EQ(stat_of(m("t")).st_size, 8000) << "size after ftruncate(8000)";
  EXPECT_SAME_BYTES(a.substr(0, 3000) + std::string(5000, '\0'), read_file(m("t")),
                    "contents after shrink then grow (old data must not reappear)");

  // The same with dirty (not yet written back) pages.
  pwrite_all(fd, std::string(5000, 'Z'), 0);
  ASSERT_EQ(ftruncate(fd, 100), 0) << errname(errno);
  ASSERT_EQ(ftruncate(fd, 6000), 0) << errname(errno);
  std::string expected = std::string(100, 'Z') + std::string(5900, '\0');
  EXPECT_SAME_BYTES(expected, pread_n(fd, 10000, 0), "dirty data cut by ftruncate must not come back on grow");

  // Shrink in the middle of a page and grow: the tail of that page must be zero.
  ASSERT_EQ(truncate(m("t").c_str(), 50), 0) << errname(errno);
  ASSERT_EQ(truncate(m("t").c_str(), 4096), 0) << errname(errno);
  expected = std::string(50, 'Z') + std::string(4046, '\0');
  EXPECT_SAME_BYTES(expected, read_file(m("t")), "truncate to mid-page then grow");

  ASSERT_EQ(fsync(fd), 0) << errname(errno);
  EXPECT_EQ(stat_of(b("t")).st_size, 4096) << "backing size";
  EXPECT_SAME_BYTES(expected, read_file(b("t")), "backing file after truncates");

  ASSERT_EQ(truncate(m("t").c_str(), 0), 0) << errname(errno);
  EXPECT_EQ(stat_of(m("t")).st_size, 0) << "size after truncate(0)";
  EXPECT_EQ(stat_of(b("t")).st_size, 0) << "backing size after truncate(0)";

  // O_TRUNC on open.
  write_file(m("ot"), "something long enough");
  { Fd t(open_or_throw(m("ot"), O_WRONLY | O_TRUNC)); EXPECT_EQ(fstat_of(t).st_size, 0) << "size after open(O_TRUNC)"; }
  EXPECT_EQ(read_file(m("ot")), "") << "contents after open(O_TRUNC)";
  EXPECT_EQ(stat_of(b("ot")).st_size, 0) << "backing size after open(O_TRUNC)";
}

// --- attributes ------------------------------------------------------------------------------

TEST_F(PosixFs, ChmodChownUtimensVisibleOnMountAndBacking) {
  write_file(m("f"), "x");
  ASSERT_EQ(mkdir(m("d").c_str(), 0755), 0) << errname(errno);

  ASSERT_EQ(chmod(m("f").c_str(), 0640), 0) << "chmod: " << errname(errno);
  EXPECT_EQ(stat_of(m("f")).st_mode & 07777, 0640u) << "mode on the mount after chmod 0640";
  EXPECT_EQ(stat_of(b("f")).st_mode & 07777, 0640u) << "mode of the backing file after chmod 0640";
  ASSERT_EQ(chmod(m("d").c_str(), 01750), 0) << "chmod dir: " << errname(errno);
  EXPECT_EQ(stat_of(m("d")).st_mode & 07777, 01750u) << "dir mode on the mount after chmod 01750";
  EXPECT_EQ(stat_of(b("d")).st_mode & 07777, 01750u) << "backing dir mode after chmod 01750";
  {
    Fd fd(open_or_throw(m("f"), O_RDONLY));
    ASSERT_EQ(fchmod(fd, 0604), 0) << "fchmod: " << errname(errno);
  }
  EXPECT_EQ(stat_of(m("f")).st_mode & 07777, 0604u) << "mode on the mount after fchmod 0604";
  EXPECT_EQ(stat_of(b("f")).st_mode & 07777, 0604u) << "backing mode after fchmod 0604";

  ASSERT_EQ(chown(m("f").c_str(), 1234, 2345), 0) << "chown 1234:2345: " << errname(errno);
  struct stat sm = stat_of(m("f")), sb = stat_of(b("f"));
  EXPECT_EQ(sm.st_uid, 1234u) << "uid on the mount after chown";
  EXPECT_EQ(sm.st_gid, 2345u) << "gid on the mount after chown";
  EXPECT_EQ(sb.st_uid, 1234u) << "uid of the backing file after chown";
  EXPECT_EQ(sb.st_gid, 2345u) << "gid of the backing file after chown";
  ASSERT_EQ(chown(m("f").c_str(), static_cast<uid_t>(-1), 3456), 0) << "chown -1:3456: " << errname(errno);
  EXPECT_EQ(stat_of(m("f")).st_uid, 1234u) << "uid must stay when chown passes -1";
  EXPECT_EQ(stat_of(b("f")).st_gid, 3456u) << "backing gid after chown -1:3456";
  ASSERT_EQ(symlink("f", m("l").c_str()), 0) << errname(errno);
  ASSERT_EQ(lchown(m("l").c_str(), 4321, 4321), 0) << "lchown on a symlink: " << errname(errno);
  EXPECT_EQ(lstat_of(m("l")).st_uid, 4321u) << "symlink uid on the mount after lchown";
  EXPECT_EQ(lstat_of(b("l")).st_uid, 4321u) << "backing symlink uid after lchown";
  EXPECT_EQ(stat_of(b("f")).st_uid, 1234u) << "lchown must not follow the link";

  // Explicit times, nanoseconds included.
  struct timespec ts[2] = {{1000000000, 123456789}, {1100000000, 987654321}};
  ASSERT_EQ(utimensat(AT_FDCWD, m("f").c_str(), ts, 0), 0) << "utimensat explicit: " << errname(errno);
  sm = stat_of(m("f"));
  sb = stat_of(b("f"));
  EXPECT_EQ(sm.st_atim.tv_sec, 1000000000) << "atime sec on the mount";
  EXPECT_EQ(sm.st_atim.tv_nsec, 123456789) << "atime nsec on the mount";
  EXPECT_EQ(sm.st_mtim.tv_sec, 1100000000) << "mtime sec on the mount";
  EXPECT_EQ(sm.st_mtim.tv_nsec, 987654321) << "mtime nsec on the mount";
  EXPECT_EQ(sb.st_atim.tv_sec, 1000000000) << "atime sec of the backing file";
  EXPECT_EQ(sb.st_atim.tv_nsec, 123456789) << "atime nsec of the backing file";
  EXPECT_EQ(sb.st_mtim.tv_sec, 1100000000) << "mtime sec of the backing file";
  EXPECT_EQ(sb.st_mtim.tv_nsec, 987654321) << "mtime nsec of the backing file";

  // UTIME_OMIT leaves one alone.
  struct timespec ts2[2] = {{0, UTIME_OMIT}, {1200000000, 5}};
  ASSERT_EQ(utimensat(AT_FDCWD, m("f").c_str(), ts2, 0), 0) << "utimensat with UTIME_OMIT: " << errname(errno);
  sm = stat_of(m("f"));
  sb = stat_of(b("f"));
  EXPECT_EQ(sm.st_atim.tv_sec, 1000000000) << "atime must stay with UTIME_OMIT (mount)";
  EXPECT_EQ(sb.st_atim.tv_sec, 1000000000) << "atime must stay with UTIME_OMIT (backing)";
  EXPECT_EQ(sm.st_mtim.tv_sec, 1200000000) << "mtime on the mount after the second utimensat";
  EXPECT_EQ(sb.st_mtim.tv_sec, 1200000000) << "backing mtime after the second utimensat";

  // UTIME_NOW.
  struct timespec before, after;
  clock_gettime(CLOCK_REALTIME, &before);
  struct timespec now[2] = {{0, UTIME_NOW}, {0, UTIME_NOW}};
  ASSERT_EQ(utimensat(AT_FDCWD, m("f").c_str(), now, 0), 0) << "utimensat UTIME_NOW: " << errname(errno);
  clock_gettime(CLOCK_REALTIME, &after);
  sm = stat_of(m("f"));
  sb = stat_of(b("f"));
  for (auto [what, t] : {std::pair{"mount atime", sm.st_atim}, {"mount mtime", sm.st_mtim},
                         {"backing atime", sb.st_atim}, {"backing mtime", sb.st_mtim}}) {
    EXPECT_GE(t.tv_sec, before.tv_sec - 2) << what << " after UTIME_NOW must be about now (" << before.tv_sec << ")";
    EXPECT_LE(t.tv_sec, after.tv_sec + 2) << what << " after UTIME_NOW must be about now (" << after.tv_sec << ")";
  }

  // Directory times.
  ASSERT_EQ(utimensat(AT_FDCWD, m("d").c_str(), ts, 0), 0) << "utimensat on a directory: " << errname(errno);
  EXPECT_EQ(stat_of(m("d")).st_mtim.tv_sec, 1100000000) << "directory mtime on the mount";
  EXPECT_EQ(stat_of(b("d")).st_mtim.tv_sec, 1100000000) << "backing directory mtime";
}

// --- rename ----------------------------------------------------------------------------------

int renameat2_(const std::string& from, const std::string& to, unsigned flags) {
  return static_cast<int>(syscall(SYS_renameat2, AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), flags));
}

TEST_F(PosixFs, RenamePlainOverwrites) {
  write_file(m("a"), "contents of a");
  write_file(m("b"), "contents of b");
  Fd keep(open_or_throw(m("b"), O_RDONLY));  // the replaced file stays readable through its descriptor
  ASSERT_EQ(rename(m("a").c_str(), m("b").c_str()), 0) << "rename a -> b: " << errname(errno);
  EXPECT_EQ(stat_errno(m("a")), ENOENT) << "old name after rename: expected ENOENT";
  EXPECT_EQ(read_file(m("b")), "contents of a") << "target after rename over it";
  EXPECT_EQ(stat_errno(b("a")), ENOENT) << "old backing name after rename: expected ENOENT";
  EXPECT_EQ(read_file(b("b")), "contents of a") << "backing target after rename";
  EXPECT_EQ(pread_n(keep, 100, 0), "contents of b") << "an open descriptor of the replaced file keeps its data";
  EXPECT_EQ(list_dir(dir_), (std::set<std::string>{"b"})) << "directory after rename";

  // Across directories, and a directory with contents.
  ASSERT_EQ(mkdir(m("d1").c_str(), 0755), 0) << errname(errno);
  ASSERT_EQ(mkdir(m("d2").c_str(), 0755), 0) << errname(errno);
  write_file(m("d1/x"), "xx");
  ASSERT_EQ(rename(m("d1/x").c_str(), m("d2/y").c_str()), 0) << "rename across directories: " << errname(errno);
  ASSERT_EQ(rename(m("d2").c_str(), m("d3").c_str()), 0) << "rename of a directory: " << errname(errno);
  EXPECT_EQ(read_file(m("d3/y")), "xx") << "file inside the renamed directory";
  EXPECT_EQ(read_file(b("d3/y")), "xx") << "backing file inside the renamed directory";
  EXPECT_EQ(stat_errno(m("d1/x")), ENOENT) << "source after rename across directories";
  EXPECT_EQ(stat_errno(m("d2")), ENOENT) << "old directory name after rename";
  // A directory over a non-empty directory fails.
  write_file(m("d1/z"), "z");
  ASSERT_EQ(mkdir(m("d4").c_str(), 0755), 0) << errname(errno);
  EXPECT_EQ(rename(m("d4").c_str(), m("d1").c_str()), -1) << "rename of a directory over a non-empty one must fail";
  EXPECT_TRUE(errno == ENOTEMPTY || errno == EEXIST) << "expected ENOTEMPTY, got " << errname(errno);
  EXPECT_EQ(read_file(m("d1/z")), "z") << "the non-empty target must be untouched";
}

TEST_F(PosixFs, RenameNoReplace) {
  write_file(m("src"), "source");
  write_file(m("dst"), "destination");
  EXPECT_EQ(renameat2_(m("src"), m("dst"), RENAME_NOREPLACE), -1) << "RENAME_NOREPLACE onto an existing name must fail";
  EXPECT_EQ(errno, EEXIST) << "RENAME_NOREPLACE onto an existing name: expected EEXIST, got " << errname(errno);
  EXPECT_EQ(read_file(m("src")), "source") << "source must be untouched after the refused rename";
  EXPECT_EQ(read_file(m("dst")), "destination") << "target must be untouched after the refused rename";
  EXPECT_EQ(read_file(b("dst")), "destination") << "backing target must be untouched after the refused rename";

  ASSERT_EQ(renameat2_(m("src"), m("fresh"), RENAME_NOREPLACE), 0) << "RENAME_NOREPLACE to a new name: " << errname(errno);
  EXPECT_EQ(stat_errno(m("src")), ENOENT) << "source name after RENAME_NOREPLACE";
  EXPECT_EQ(read_file(m("fresh")), "source") << "new name after RENAME_NOREPLACE";
  EXPECT_EQ(read_file(b("fresh")), "source") << "backing new name after RENAME_NOREPLACE";
  EXPECT_EQ(stat_errno(b("src")), ENOENT) << "backing source name after RENAME_NOREPLACE";
}

TEST_F(PosixFs, RenameExchange) {
  write_file(m("one"), "first file");
  write_file(m("two"), "second, longer file");
  ino_t i1 = stat_of(m("one")).st_ino, i2 = stat_of(m("two")).st_ino;
  ASSERT_EQ(renameat2_(m("one"), m("two"), RENAME_EXCHANGE), 0) << "RENAME_EXCHANGE: " << errname(errno);
  EXPECT_EQ(read_file(m("one")), "second, longer file") << "'one' after RENAME_EXCHANGE";
  EXPECT_EQ(read_file(m("two")), "first file") << "'two' after RENAME_EXCHANGE";
  EXPECT_EQ(stat_of(m("one")).st_ino, i2) << "'one' must now be the former 'two' inode";
  EXPECT_EQ(stat_of(m("two")).st_ino, i1) << "'two' must now be the former 'one' inode";
  EXPECT_EQ(read_file(b("one")), "second, longer file") << "backing 'one' after RENAME_EXCHANGE";
  EXPECT_EQ(read_file(b("two")), "first file") << "backing 'two' after RENAME_EXCHANGE";

  // A file and a directory.
  ASSERT_EQ(mkdir(m("dir").c_str(), 0755), 0) << errname(errno);
  write_file(m("dir/inner"), "inner");
  ASSERT_EQ(renameat2_(m("one"), m("dir"), RENAME_EXCHANGE), 0) << "RENAME_EXCHANGE file<->dir: " << errname(errno);
  EXPECT_TRUE(S_ISDIR(stat_of(m("one")).st_mode)) << "'one' must be the directory after the exchange";
  EXPECT_EQ(read_file(m("one/inner")), "inner") << "file inside the exchanged directory";
  EXPECT_EQ(read_file(m("dir")), "second, longer file") << "'dir' must be the file after the exchange";
  EXPECT_EQ(read_file(b("one/inner")), "inner") << "backing: file inside the exchanged directory";

  EXPECT_EQ(renameat2_(m("two"), m("missing"), RENAME_EXCHANGE), -1) << "RENAME_EXCHANGE with a missing target must fail";
  EXPECT_EQ(errno, ENOENT) << "RENAME_EXCHANGE with a missing target: expected ENOENT, got " << errname(errno);
  EXPECT_EQ(read_file(m("two")), "first file") << "source after a failed exchange";
}

// --- links, special files, directories ------------------------------------------------------

TEST_F(PosixFs, HardLinkSharesContents) {
  write_file(m("a"), "shared");
  ASSERT_EQ(link(m("a").c_str(), m("b").c_str()), 0) << "link: " << errname(errno);
  struct stat sa = stat_of(m("a")), sb = stat_of(m("b"));
  EXPECT_EQ(sa.st_nlink, 2u) << "nlink of the original after link";
  EXPECT_EQ(sb.st_nlink, 2u) << "nlink of the new name after link";
  EXPECT_EQ(sa.st_ino, sb.st_ino) << "both names must be the same inode";
  EXPECT_EQ(stat_of(b("a")).st_nlink, 2u) << "backing nlink after link";
  EXPECT_EQ(stat_of(b("a")).st_ino, stat_of(b("b")).st_ino) << "backing names must share the inode";
  {
    Fd fd(open_or_throw(m("b"), O_WRONLY));
    pwrite_all(fd, "SH", 0);
    pwrite_all(fd, "+appended", 6);
  }
  EXPECT_EQ(read_file(m("a")), "SHared+appended") << "write through one name must be seen through the other";
  EXPECT_EQ(stat_of(m("a")).st_size, 15) << "size through the other name";
  EXPECT_EQ(read_file(b("a")), "SHared+appended") << "backing file through the other name";
  EXPECT_EQ(link(m("a").c_str(), m("b").c_str()), -1) << "link onto an existing name must fail";
  EXPECT_EQ(errno, EEXIST) << "link onto an existing name: expected EEXIST, got " << errname(errno);

  ASSERT_EQ(unlink(m("a").c_str()), 0) << errname(errno);
  EXPECT_EQ(stat_of(m("b")).st_nlink, 1u) << "nlink after unlinking one of two names";
  EXPECT_EQ(stat_of(b("b")).st_nlink, 1u) << "backing nlink after unlinking one of two names";
  EXPECT_EQ(read_file(m("b")), "SHared+appended") << "remaining name keeps the data";
}

TEST_F(PosixFs, SymlinkAndReadlink) {
  write_file(m("target"), "through the link");
  ASSERT_EQ(symlink("target", m("link").c_str()), 0) << "symlink: " << errname(errno);
  ASSERT_EQ(symlink("../elsewhere/dangling", m("dangling").c_str()), 0) << "dangling symlink: " << errname(errno);
  char buf[256];
  ssize_t n = readlink(m("link").c_str(), buf, sizeof buf);
  ASSERT_GE(n, 0) << errname(errno);
  EXPECT_EQ(std::string(buf, static_cast<size_t>(n)), "target") << "readlink on the mount";
  n = readlink(m("dangling").c_str(), buf, sizeof buf);
  ASSERT_GE(n, 0) << errname(errno);
  EXPECT_EQ(std::string(buf, static_cast<size_t>(n)), "../elsewhere/dangling") << "readlink of a dangling link";
  EXPECT_TRUE(S_ISLNK(lstat_of(m("link")).st_mode)) << "lstat must report a symlink";
  EXPECT_EQ(read_file(m("link")), "through the link") << "reading through the symlink";
  n = readlink(b("link").c_str(), buf, sizeof buf);
  ASSERT_GE(n, 0) << "backing readlink: " << errname(errno);
  EXPECT_EQ(std::string(buf, static_cast<size_t>(n)), "target") << "backing symlink target";
  EXPECT_EQ(stat_errno(m("dangling/x")), ENOENT) << "path through a dangling link";
}

TEST_F(PosixFs, MknodFifo) {
  ASSERT_EQ(mknod(m("fifo").c_str(), S_IFIFO | 0600, 0), 0) << "mknod S_IFIFO: " << errname(errno);
  struct stat sm = lstat_of(m("fifo")), sb = lstat_of(b("fifo"));
  EXPECT_TRUE(S_ISFIFO(sm.st_mode)) << "mount must report a FIFO, mode " << std::oct << sm.st_mode;
  EXPECT_EQ(sm.st_mode & 07777, 0600u) << "FIFO permissions on the mount";
  EXPECT_TRUE(S_ISFIFO(sb.st_mode)) << "backing must be a FIFO, mode " << std::oct << sb.st_mode;
  // The pipe works (the kernel runs it, not the daemon).
  Fd fd(open(m("fifo").c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC));
  ASSERT_GE(fd.fd, 0) << "open of the FIFO: " << errname(errno);
  ASSERT_EQ(write(fd, "ping", 4), 4) << errname(errno);
  char buf[8] = {};
  ASSERT_EQ(read(fd, buf, sizeof buf), 4) << errname(errno);
  EXPECT_EQ(std::string(buf, 4), "ping") << "data through the FIFO";
  ASSERT_EQ(mkfifo(m("fifo2").c_str(), 0644), 0) << "mkfifo: " << errname(errno);
  EXPECT_TRUE(S_ISFIFO(lstat_of(b("fifo2")).st_mode)) << "backing of mkfifo";
  ASSERT_EQ(unlink(m("fifo").c_str()), 0) << errname(errno);
  EXPECT_EQ(stat_errno(b("fifo")), ENOENT) << "backing FIFO after unlink";
}

TEST_F(PosixFs, MkdirRmdirUnlink) {
  ASSERT_EQ(mkdir(m("d").c_str(), 0750), 0) << "mkdir: " << errname(errno);
  EXPECT_TRUE(S_ISDIR(stat_of(m("d")).st_mode)) << "mkdir must make a directory";
  mode_t mask = umask(0);
  umask(mask);
  EXPECT_EQ(stat_of(m("d")).st_mode & 07777, 0750u & ~mask) << "directory mode after mkdir 0750 (umask " << std::oct << mask << ")";
  EXPECT_EQ(stat_of(b("d")).st_mode & 07777, 0750u & ~mask) << "backing directory mode after mkdir 0750";
  EXPECT_TRUE(S_ISDIR(stat_of(b("d")).st_mode)) << "backing directory";
  EXPECT_EQ(mkdir(m("d").c_str(), 0755), -1) << "mkdir of an existing name must fail";
  EXPECT_EQ(errno, EEXIST) << "mkdir of an existing name: expected EEXIST, got " << errname(errno);
  ASSERT_EQ(mkdir(m("d/sub").c_str(), 0755), 0) << errname(errno);
  write_file(m("d/sub/f"), "f");
  EXPECT_EQ(stat_of(m("d")).st_nlink, 3u) << "nlink of a directory with one subdirectory";

  EXPECT_EQ(rmdir(m("d/sub").c_str()), -1) << "rmdir of a non-empty directory must fail";
  EXPECT_EQ(errno, ENOTEMPTY) << "rmdir of a non-empty directory: expected ENOTEMPTY, got " << errname(errno);
  EXPECT_EQ(read_file(m("d/sub/f")), "f") << "contents must survive the refused rmdir";
  EXPECT_EQ(rmdir(m("d/sub/f").c_str()), -1) << "rmdir of a file must fail";
  EXPECT_EQ(errno, ENOTDIR) << "rmdir of a file: expected ENOTDIR, got " << errname(errno);
  EXPECT_EQ(unlink(m("d/sub").c_str()), -1) << "unlink of a directory must fail";
  EXPECT_TRUE(errno == EISDIR || errno == EPERM) << "unlink of a directory: expected EISDIR, got " << errname(errno);

  ASSERT_EQ(unlink(m("d/sub/f").c_str()), 0) << "unlink: " << errname(errno);
  EXPECT_EQ(stat_errno(m("d/sub/f")), ENOENT) << "unlinked file on the mount";
  EXPECT_EQ(stat_errno(b("d/sub/f")), ENOENT) << "unlinked file in the backing dir";
  EXPECT_EQ(unlink(m("d/sub/f").c_str()), -1) << "second unlink must fail";
  EXPECT_EQ(errno, ENOENT) << "second unlink: expected ENOENT, got " << errname(errno);
  ASSERT_EQ(rmdir(m("d/sub").c_str()), 0) << "rmdir of the emptied directory: " << errname(errno);
  ASSERT_EQ(rmdir(m("d").c_str()), 0) << errname(errno);
  EXPECT_EQ(stat_errno(m("d")), ENOENT) << "removed directory on the mount";
  EXPECT_EQ(stat_errno(b("d")), ENOENT) << "removed directory in the backing dir";
  EXPECT_EQ(list_dir(dir_), std::set<std::string>{}) << "the test directory must be empty again";
}

TEST_F(PosixFs, StatfsIsPlausible) {
  struct statvfs sm, sb;
  ASSERT_EQ(statvfs(mnt_.c_str(), &sm), 0) << "statvfs on the mount: " << errname(errno);
  ASSERT_EQ(statvfs(data_.c_str(), &sb), 0) << errname(errno);
  EXPECT_GT(sm.f_blocks, 0u) << "f_blocks must be > 0";
  EXPECT_GT(sm.f_bsize, 0u) << "f_bsize must be > 0";
  EXPECT_GT(sm.f_frsize, 0u) << "f_frsize must be > 0";
  EXPECT_LE(sm.f_bfree, sm.f_blocks) << "f_bfree <= f_blocks";
  EXPECT_LE(sm.f_bavail, sm.f_bfree) << "f_bavail <= f_bfree";
  EXPECT_GE(sm.f_namemax, 255u) << "f_namemax";
  double total_m = static_cast<double>(sm.f_blocks) * static_cast<double>(sm.f_frsize);
  double total_b = static_cast<double>(sb.f_blocks) * static_cast<double>(sb.f_frsize);
  EXPECT_NEAR(total_m / total_b, 1.0, 0.05) << "total size of the mount (" << total_m << " B) must be the backing fs's (" << total_b << " B)";
  double avail_m = static_cast<double>(sm.f_bavail) * static_cast<double>(sm.f_frsize);
  double avail_b = static_cast<double>(sb.f_bavail) * static_cast<double>(sb.f_frsize);
  EXPECT_NEAR(avail_m / total_b, avail_b / total_b, 0.05) << "available space of the mount must be the backing fs's";
  if (sb.f_files > 0) {
    EXPECT_GT(sm.f_files, 0u) << "f_files";
  }
}

// --- xattrs ----------------------------------------------------------------------------------

TEST_F(PosixFs, ExtendedAttributes) {
  write_file(m("f"), "x");
  ASSERT_EQ(mkdir(m("d").c_str(), 0755), 0) << errname(errno);
  // The backing file carries the reserved id; the mount must not show it.
  ASSERT_NO_THROW(get_xattr(b("f"), kFidXattr)) << "precondition: the backing file has " << kFidXattr;
  std::string fid = get_xattr(b("f"), kFidXattr);

  ASSERT_EQ(setxattr(m("f").c_str(), "user.test", "value1", 6, 0), 0) << "setxattr user.test: " << errname(errno);
  EXPECT_EQ(get_xattr(m("f"), "user.test"), "value1") << "getxattr on the mount";
  EXPECT_EQ(get_xattr(b("f"), "user.test"), "value1") << "getxattr on the backing file";
  char small[2];
  EXPECT_EQ(getxattr(m("f").c_str(), "user.test", small, sizeof small), -1) << "getxattr into a too small buffer must fail";
  EXPECT_EQ(errno, ERANGE) << "getxattr into a too small buffer: expected ERANGE, got " << errname(errno);

  std::vector<std::string> names = list_xattrs(m("f"));
  EXPECT_NE(std::find(names.begin(), names.end(), "user.test"), names.end()) << "listxattr must contain user.test: " << join(names);
  EXPECT_FALSE(has_reserved_xattr(names)) << "listxattr on the mount must not show trusted.blockrepl.*: " << join(names);
  ssize_t need = listxattr(m("f").c_str(), nullptr, 0);
  size_t actual = 0;
  for (auto& n : names) actual += n.size() + 1;
  EXPECT_EQ(need, static_cast<ssize_t>(actual)) << "listxattr size query must match the filtered list";
  for (const std::string& p : {mnt_, m("d")}) {
    auto dn = list_xattrs(p);
    EXPECT_FALSE(has_reserved_xattr(dn)) << "listxattr on " << p << " must not show trusted.blockrepl.*: " << join(dn);
  }
  char vbuf[64];
  EXPECT_EQ(getxattr(m("f").c_str(), kFidXattr, vbuf, sizeof vbuf), -1) << "getxattr of " << kFidXattr << " on the mount must fail";
  EXPECT_EQ(errno, ENODATA) << "getxattr of " << kFidXattr << " on the mount: expected ENODATA, got " << errname(errno);
  EXPECT_EQ(getxattr(m("f").c_str(), kFidXattr, nullptr, 0), -1) << "size query of " << kFidXattr << " must fail too";
  // Writing or removing the reserved name through the mount must not change the file's identity.
  (void)setxattr(m("f").c_str(), kFidXattr, "forged!!", 8, 0);
  (void)removexattr(m("f").c_str(), kFidXattr);
  EXPECT_EQ(get_xattr(b("f"), kFidXattr), fid) << "the backing file id must not change through the mount";

  EXPECT_EQ(setxattr(m("f").c_str(), "user.test", "v", 1, XATTR_CREATE), -1) << "XATTR_CREATE on an existing name must fail";
  EXPECT_EQ(errno, EEXIST) << "XATTR_CREATE on an existing name: expected EEXIST, got " << errname(errno);
  EXPECT_EQ(get_xattr(m("f"), "user.test"), "value1") << "value must be unchanged after the refused XATTR_CREATE";
  EXPECT_EQ(setxattr(m("f").c_str(), "user.other", "v", 1, XATTR_REPLACE), -1) << "XATTR_REPLACE of a missing name must fail";
  EXPECT_EQ(errno, ENODATA) << "XATTR_REPLACE of a missing name: expected ENODATA, got " << errname(errno);
  ASSERT_EQ(setxattr(m("f").c_str(), "user.test", "replaced value", 14, XATTR_REPLACE), 0) << errname(errno);
  EXPECT_EQ(get_xattr(m("f"), "user.test"), "replaced value") << "value after XATTR_REPLACE";
  std::string big(3000, 'v');
  ASSERT_EQ(setxattr(m("d").c_str(), "user.big", big.data(), big.size(), 0), 0) << "setxattr on a directory: " << errname(errno);
  EXPECT_EQ(get_xattr(m("d"), "user.big"), big) << "large xattr on a directory";

  ASSERT_EQ(removexattr(m("f").c_str(), "user.test"), 0) << "removexattr: " << errname(errno);
  EXPECT_EQ(getxattr(m("f").c_str(), "user.test", vbuf, sizeof vbuf), -1) << "getxattr after removexattr must fail";
  EXPECT_EQ(errno, ENODATA) << "getxattr after removexattr: expected ENODATA, got " << errname(errno);
  EXPECT_EQ(getxattr(b("f").c_str(), "user.test", vbuf, sizeof vbuf), -1) << "backing xattr after removexattr must be gone";
  names = list_xattrs(m("f"));
  EXPECT_EQ(std::find(names.begin(), names.end(), "user.test"), names.end()) << "listxattr after removexattr: " << join(names);
  EXPECT_EQ(removexattr(m("f").c_str(), "user.test"), -1) << "removexattr of a missing name must fail";
  EXPECT_EQ(errno, ENODATA) << "removexattr of a missing name: expected ENODATA, got " << errname(errno);
}

// --- fallocate -------------------------------------------------------------------------------

TEST_F(PosixFs, FallocateModes) {
  constexpr off_t MiB = 1 << 20;
  Fd fd(open_or_throw(m("fa"), O_CREAT | O_RDWR));

  // Default mode allocates and grows the size; contents are zeros; existing data stays.
  pwrite_all(fd, std::string(4096, 'x'), 0);
  ASSERT_EQ(fallocate(fd, 0, 0, MiB), 0) << "fallocate(0, 0, 1 MiB): " << errname(errno);
  EXPECT_EQ(fstat_of(fd).st_size, MiB) << "size after a default-mode fallocate of 1 MiB";
  EXPECT_EQ(stat_of(b("fa")).st_size, MiB) << "backing size after a default-mode fallocate";
  EXPECT_GE(stat_of(b("fa")).st_blocks * 512, MiB) << "backing blocks must be allocated by fallocate";
  EXPECT_SAME_BYTES(std::string(4096, 'x') + std::string(MiB - 4096, '\0'), read_file(m("fa")),
                    "contents after fallocate (existing data kept, zeros after)");

  // KEEP_SIZE allocates past EOF without changing the size.
  ASSERT_EQ(fallocate(fd, FALLOC_FL_KEEP_SIZE, MiB, MiB), 0) << "fallocate(KEEP_SIZE): " << errname(errno);
  EXPECT_EQ(fstat_of(fd).st_size, MiB) << "size after KEEP_SIZE fallocate must stay 1 MiB";
  EXPECT_EQ(stat_of(b("fa")).st_size, MiB) << "backing size after KEEP_SIZE fallocate must stay 1 MiB";
  EXPECT_GE(stat_of(b("fa")).st_blocks * 512, 2 * MiB) << "backing blocks after KEEP_SIZE fallocate of another MiB";

  // PUNCH_HOLE|KEEP_SIZE: zeros, same size, fewer blocks in the backing file.
  std::string data(MiB, '\xab');
  pwrite_all(fd, data, 0);
  ASSERT_EQ(fsync(fd), 0) << errname(errno);
  ASSERT_EQ(ftruncate(fd, MiB), 0) << errname(errno);  // drop the KEEP_SIZE preallocation past EOF
  ASSERT_EQ(fsync(fd), 0) << errname(errno);
  blkcnt_t blocks_before = stat_of(b("fa")).st_blocks;
  ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 256 * 1024, 512 * 1024), 0)
      << "fallocate(PUNCH_HOLE|KEEP_SIZE): " << errname(errno);
  std::string expected = data;
  std::fill(expected.begin() + 256 * 1024, expected.begin() + 768 * 1024, '\0');
  EXPECT_EQ(fstat_of(fd).st_size, MiB) << "size after punching a hole must stay";
  EXPECT_SAME_BYTES(expected, read_file(m("fa")), "contents after PUNCH_HOLE (zeros in the hole)");
  ASSERT_EQ(fsync(fd), 0) << errname(errno);
  struct stat sb = stat_of(b("fa"));
  EXPECT_EQ(sb.st_size, MiB) << "backing size after PUNCH_HOLE";
  EXPECT_LT(sb.st_blocks, blocks_before) << "backing file must hold fewer blocks after PUNCH_HOLE (before " << blocks_before << ")";
  EXPECT_LE(sb.st_blocks, blocks_before - 1024) << "512 KiB punched = 1024 sectors fewer";
  EXPECT_SAME_BYTES(expected, read_file(b("fa")), "backing contents after PUNCH_HOLE");

  // Punch over dirty (not yet written back) pages: they must not resurrect.
  pwrite_all(fd, std::string(64 * 1024, 'D'), 0);
  ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192), 0) << errname(errno);
  std::fill(expected.begin(), expected.begin() + 64 * 1024, 'D');
  std::fill(expected.begin() + 4096, expected.begin() + 12288, '\0');
  EXPECT_SAME_BYTES(expected, read_file(m("fa")), "contents after punching over dirty pages");

  // ZERO_RANGE, unaligned, inside the file.
  ASSERT_EQ(fallocate(fd, FALLOC_FL_ZERO_RANGE, 100 * 1024 + 100, 5000), 0) << "fallocate(ZERO_RANGE): " << errname(errno);
  std::fill(expected.begin() + 100 * 1024 + 100, expected.begin() + 100 * 1024 + 5100, '\0');
  EXPECT_EQ(fstat_of(fd).st_size, MiB) << "size after ZERO_RANGE inside the file";
  EXPECT_SAME_BYTES(expected, read_file(m("fa")), "contents after ZERO_RANGE");
  // ZERO_RANGE past EOF grows the file; with KEEP_SIZE it does not.
  ASSERT_EQ(fallocate(fd, FALLOC_FL_ZERO_RANGE, MiB - 10, 4106), 0) << errname(errno);
  std::fill(expected.end() - 10, expected.end(), '\0');
  expected.resize(MiB + 4096, '\0');
  EXPECT_EQ(fstat_of(fd).st_size, MiB + 4096) << "size after ZERO_RANGE past EOF";
  ASSERT_EQ(fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, MiB, MiB), 0) << errname(errno);
  EXPECT_EQ(fstat_of(fd).st_size, MiB + 4096) << "size after ZERO_RANGE|KEEP_SIZE past EOF must stay";
  EXPECT_SAME_BYTES(expected, read_file(m("fa")), "contents after ZERO_RANGE at the end");
  ASSERT_EQ(fsync(fd), 0) << errname(errno);
  EXPECT_SAME_BYTES(expected, read_file(b("fa")), "backing contents after all fallocate calls");
}

// --- SEEK_DATA / SEEK_HOLE -------------------------------------------------------------------

// A 2 MiB file: data [0, 4096), hole, data [1 MiB, 1 MiB + 4096), hole to the end.
void make_sparse(int fd) {
  pwrite_all(fd, std::string(4096, 'a'), 0);
  pwrite_all(fd, std::string(4096, 'b'), 1 << 20);
  if (ftruncate(fd, 2 << 20) != 0) fail_sys("ftruncate");
}

TEST_F(PosixFs, SeekDataAndHoleOnASparseFile) {
  constexpr off_t MiB = 1 << 20;
  Fd fd(open_or_throw(m("sparse"), O_CREAT | O_RDWR));
  make_sparse(fd);
  ASSERT_EQ(fsync(fd), 0) << errname(errno);
  EXPECT_EQ(lseek(fd, 0, SEEK_DATA), 0) << "SEEK_DATA from 0: " << errname(errno);
  EXPECT_EQ(lseek(fd, 0, SEEK_HOLE), 4096) << "SEEK_HOLE from 0 (the first data block ends at 4096): " << errname(errno);
  EXPECT_EQ(lseek(fd, 4096, SEEK_DATA), MiB) << "SEEK_DATA from 4096 must find the data at 1 MiB: " << errname(errno);
  EXPECT_EQ(lseek(fd, 100000, SEEK_DATA), MiB) << "SEEK_DATA from inside the hole: " << errname(errno);
  EXPECT_EQ(lseek(fd, MiB, SEEK_HOLE), MiB + 4096) << "SEEK_HOLE from 1 MiB: " << errname(errno);
  EXPECT_EQ(lseek(fd, MiB + 4096, SEEK_DATA), -1) << "SEEK_DATA in the trailing hole must fail";
  EXPECT_EQ(errno, ENXIO) << "SEEK_DATA in the trailing hole: expected ENXIO, got " << errname(errno);
  EXPECT_EQ(lseek(fd, MiB + 4096, SEEK_HOLE), MiB + 4096) << "SEEK_HOLE inside a hole returns the offset itself";
  EXPECT_EQ(lseek(fd, 2 * MiB, SEEK_HOLE), -1) << "SEEK_HOLE at EOF must fail";
  EXPECT_EQ(errno, ENXIO) << "SEEK_HOLE at EOF: expected ENXIO, got " << errname(errno);
  // The file offset is left where SEEK_DATA put it.
  EXPECT_EQ(lseek(fd, 4096, SEEK_DATA), MiB);
  EXPECT_EQ(lseek(fd, 0, SEEK_CUR), MiB) << "file offset after SEEK_DATA";
}

TEST_F(PosixFs, SeekDataAndHoleNeverCallDirtyDataAHole) {
  // Without fsync the data may still be in the page cache only. A filesystem may call a hole
  // data, but calling data a hole makes `cp` and backup tools skip it.
  constexpr off_t MiB = 1 << 20;
  Fd fd(open_or_throw(m("sparse"), O_CREAT | O_RDWR));
  make_sparse(fd);
  EXPECT_EQ(lseek(fd, 0, SEEK_DATA), 0) << "SEEK_DATA from 0 on dirty data: " << errname(errno);
  off_t hole = lseek(fd, 0, SEEK_HOLE);
  EXPECT_GE(hole, 4096) << "SEEK_HOLE from 0 must not report a hole inside the dirty first block (" << errname(errno) << ")";
  off_t data = lseek(fd, 4096, SEEK_DATA);
  EXPECT_GE(data, 4096) << "SEEK_DATA from 4096: " << errname(errno);
  EXPECT_LE(data, MiB) << "SEEK_DATA from 4096 must not skip the dirty data at 1 MiB (got " << data << ", "
                       << (data < 0 ? errname(errno) : std::string("ok")) << ")";
  off_t hole2 = lseek(fd, MiB, SEEK_HOLE);
  EXPECT_GE(hole2, MiB + 4096) << "SEEK_HOLE from 1 MiB must not be inside the dirty block";
}

// --- locks -----------------------------------------------------------------------------------

TEST_F(PosixFs, FlockConflictsBetweenOpenFileDescriptions) {
  write_file(m("lock"), "l");
  Fd a(open_or_throw(m("lock"), O_RDWR));
  Fd c(open_or_throw(m("lock"), O_RDWR));
  ASSERT_EQ(flock(a, LOCK_EX | LOCK_NB), 0) << "first LOCK_EX: " << errname(errno);
  EXPECT_EQ(flock(c, LOCK_EX | LOCK_NB), -1) << "LOCK_EX|LOCK_NB on a second open file description must fail while the first holds it";
  EXPECT_EQ(errno, EWOULDBLOCK) << "expected EWOULDBLOCK, got " << errname(errno);
  EXPECT_EQ(flock(c, LOCK_SH | LOCK_NB), -1) << "LOCK_SH must conflict with a held LOCK_EX";
  EXPECT_EQ(errno, EWOULDBLOCK) << "expected EWOULDBLOCK, got " << errname(errno);
  // A forked child inherits a's description (same lock) but a fresh open conflicts.
  std::string child = in_child([&]() -> std::string {
    int f = open(m("lock").c_str(), O_RDWR);
    if (f < 0) return "child open: " + errname(errno);
    if (flock(f, LOCK_EX | LOCK_NB) == 0) return "child's LOCK_EX on its own open succeeded while the parent holds LOCK_EX";
    if (errno != EWOULDBLOCK) return "child's LOCK_EX: expected EWOULDBLOCK, got " + errname(errno);
    return "";
  });
  EXPECT_EQ(child, "") << "flock in a child process";
  ASSERT_EQ(flock(a, LOCK_UN), 0) << errname(errno);
  EXPECT_EQ(flock(c, LOCK_EX | LOCK_NB), 0) << "LOCK_EX after the holder unlocked: " << errname(errno);
  ASSERT_EQ(flock(c, LOCK_UN), 0) << errname(errno);
  EXPECT_EQ(flock(a, LOCK_SH | LOCK_NB), 0) << "first LOCK_SH: " << errname(errno);
  EXPECT_EQ(flock(c, LOCK_SH | LOCK_NB), 0) << "two shared locks must coexist: " << errname(errno);
  EXPECT_EQ(flock(c, LOCK_EX | LOCK_NB), -1) << "upgrade to LOCK_EX while another holds LOCK_SH must fail";
  // Closing the holder releases its lock.
  a.reset();
  EXPECT_EQ(flock(c, LOCK_EX | LOCK_NB), 0) << "LOCK_EX after the other holder closed: " << errname(errno);
}

TEST_F(PosixFs, PosixRecordLocksConflictAcrossProcesses) {
  write_file(m("lock"), std::string(1000, 'l'));
  Fd fd(open_or_throw(m("lock"), O_RDWR));
  struct flock fl{};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = 0;
  fl.l_len = 100;
  ASSERT_EQ(fcntl(fd, F_SETLK, &fl), 0) << "parent F_SETLK write lock [0,100): " << errname(errno);
  pid_t parent = getpid();
  std::string child = in_child([&]() -> std::string {
    int f = open(m("lock").c_str(), O_RDWR);
    if (f < 0) return "child open: " + errname(errno);
    struct flock c{};
    c.l_type = F_WRLCK;
    c.l_whence = SEEK_SET;
    c.l_start = 50;
    c.l_len = 10;
    if (fcntl(f, F_SETLK, &c) == 0) return "child's F_SETLK on [50,60) succeeded although the parent holds [0,100)";
    if (errno != EAGAIN && errno != EACCES) return "child's conflicting F_SETLK: expected EAGAIN/EACCES, got " + errname(errno);
    c.l_type = F_RDLCK;
    if (fcntl(f, F_SETLK, &c) == 0) return "child's read lock on [50,60) succeeded although the parent holds a write lock";
    struct flock g{};
    g.l_type = F_WRLCK;
    g.l_whence = SEEK_SET;
    g.l_start = 0;
    g.l_len = 10;
    if (fcntl(f, F_GETLK, &g) != 0) return "child F_GETLK: " + errname(errno);
    if (g.l_type != F_WRLCK) return "child F_GETLK: expected F_WRLCK held, got type " + std::to_string(g.l_type);
    if (g.l_pid != parent) return "child F_GETLK: expected pid " + std::to_string(parent) + ", got " + std::to_string(g.l_pid);
    c.l_type = F_WRLCK;
    c.l_start = 200;
    c.l_len = 100;
    if (fcntl(f, F_SETLK, &c) != 0) return "child's lock on the free range [200,300): " + errname(errno);
    return "";
  });
  EXPECT_EQ(child, "") << "POSIX locks between parent and child";
  fl.l_type = F_UNLCK;
  ASSERT_EQ(fcntl(fd, F_SETLK, &fl), 0) << errname(errno);
  child = in_child([&]() -> std::string {
    int f = open(m("lock").c_str(), O_RDWR);
    struct flock c{};
    c.l_type = F_WRLCK;
    c.l_whence = SEEK_SET;
    c.l_start = 50;
    c.l_len = 10;
    if (fcntl(f, F_SETLK, &c) != 0) return "child's F_SETLK after the parent unlocked: " + errname(errno);
    return "";
  });
  EXPECT_EQ(child, "") << "POSIX lock after the parent released it";
}

TEST_F(PosixFs, OfdLocksConflictBetweenOpenFileDescriptions) {
  write_file(m("lock"), std::string(1000, 'l'));
  Fd a(open_or_throw(m("lock"), O_RDWR));
  Fd c(open_or_throw(m("lock"), O_RDWR));
  struct flock fl{};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = 0;
  fl.l_len = 100;
  ASSERT_EQ(fcntl(a, F_OFD_SETLK, &fl), 0) << "F_OFD_SETLK on the first description: " << errname(errno);
  struct flock f2 = fl;
  f2.l_start = 10;
  f2.l_len = 5;
  EXPECT_EQ(fcntl(c, F_OFD_SETLK, &f2), -1) << "F_OFD_SETLK on a second description in the same process must conflict";
  EXPECT_TRUE(errno == EAGAIN || errno == EACCES) << "expected EAGAIN, got " << errname(errno);
  struct flock g{};
  g.l_type = F_RDLCK;
  g.l_whence = SEEK_SET;
  g.l_start = 0;
  g.l_len = 10;
  ASSERT_EQ(fcntl(c, F_OFD_GETLK, &g), 0) << errname(errno);
  EXPECT_EQ(g.l_type, F_WRLCK) << "F_OFD_GETLK must report the conflicting write lock";
  EXPECT_EQ(g.l_pid, -1) << "F_OFD_GETLK reports pid -1 for OFD locks";
  f2.l_start = 500;
  EXPECT_EQ(fcntl(c, F_OFD_SETLK, &f2), 0) << "F_OFD_SETLK on a free range: " << errname(errno);
  a.reset();  // closing the last descriptor of the description releases its locks
  f2.l_start = 10;
  EXPECT_EQ(fcntl(c, F_OFD_SETLK, &f2), 0) << "F_OFD_SETLK after the holder closed: " << errname(errno);
}

// --- mmap ------------------------------------------------------------------------------------

TEST_F(PosixFs, SharedWritableMmap) {
  constexpr size_t MiB = 1 << 20;
  Fd fd(open_or_throw(m("map"), O_CREAT | O_RDWR));
  ASSERT_EQ(ftruncate(fd, MiB), 0) << errname(errno);
  std::string pat = pattern(MiB, 21);
  {
    Mapping map(fd, MiB, PROT_READ | PROT_WRITE);
    memcpy(map.data(), pat.data(), MiB);
    ASSERT_EQ(msync(map.data(), MiB, MS_SYNC), 0) << "msync(MS_SYNC): " << errname(errno);
    Fd other(open_or_throw(m("map"), O_RDONLY));
    EXPECT_SAME_BYTES(pat, pread_n(other, MiB + 10, 0), "read through another descriptor after msync");
    EXPECT_SAME_BYTES(pat, read_file(b("map")), "backing file after msync(MS_SYNC)");

    // A small change, msync of only its page.
    memcpy(map.data() + 5000, "PATCH", 5);
    pat.replace(5000, 5, "PATCH");
    ASSERT_EQ(msync(map.data() + 4096, 4096, MS_SYNC), 0) << errname(errno);
    EXPECT_SAME_BYTES(pat, read_file(b("map")), "backing file after msync of one page");
  }
  EXPECT_EQ(fstat_of(fd).st_size, static_cast<off_t>(MiB)) << "mmap writes must not change the size";

  // Two mappings through two descriptions see each other's writes at once, and write() too.
  Fd fd2(open_or_throw(m("map"), O_RDWR));
  Mapping m1(fd, MiB, PROT_READ | PROT_WRITE);
  Mapping m2(fd2, MiB, PROT_READ | PROT_WRITE);
  memcpy(m1.data() + 100, "from map one", 12);
  EXPECT_EQ(std::string(m2.data() + 100, 12), "from map one") << "mapping 2 must see a store through mapping 1";
  memcpy(m2.data() + MiB - 12, "from map two", 12);
  EXPECT_EQ(std::string(m1.data() + MiB - 12, 12), "from map two") << "mapping 1 must see a store through mapping 2";
  pwrite_all(fd2, "via write()", 300000);
  EXPECT_EQ(std::string(m1.data() + 300000, 11), "via write()") << "a mapping must see write() through another descriptor";
  EXPECT_EQ(pread_n(fd, 12, 100), "from map one") << "read() must see a store through a mapping";
  pat.replace(100, 12, "from map one");
  pat.replace(MiB - 12, 12, "from map two");
  pat.replace(300000, 11, "via write()");
  ASSERT_EQ(msync(m1.data(), MiB, MS_SYNC), 0) << errname(errno);
  ASSERT_EQ(msync(m2.data(), MiB, MS_SYNC), 0) << errname(errno);
  ASSERT_EQ(fsync(fd2), 0) << errname(errno);
  EXPECT_SAME_BYTES(pat, read_file(b("map")), "backing file after stores through two mappings");
}

// --- unlinked while open ---------------------------------------------------------------------

TEST_F(PosixFs, UnlinkedWhileOpenStaysUsable) {
  Fd fd(open_or_throw(m("tmpfile"), O_CREAT | O_RDWR));
  pwrite_all(fd, "before unlink;", 0);
  ASSERT_EQ(unlink(m("tmpfile").c_str()), 0) << "unlink: " << errname(errno);
  EXPECT_EQ(fstat_of(fd).st_nlink, 0u) << "fstat nlink of an unlinked open file";
  EXPECT_EQ(stat_errno(m("tmpfile")), ENOENT) << "the name must be gone from the mount";
  EXPECT_EQ(list_dir(dir_).count("tmpfile"), 0u) << "the name must be gone from readdir";
  EXPECT_EQ(list_dir(bdir_), std::set<std::string>{}) << "the backing dir must show no name for the unlinked file";

  pwrite_all(fd, "after unlink", 14);
  pwrite_all(fd, std::string(3 << 20, 'U'), 1 << 20);  // big write after unlink
  EXPECT_EQ(pread_n(fd, 26, 0), "before unlink;after unlink") << "read back through the unlinked descriptor";
  EXPECT_EQ(fstat_of(fd).st_size, (1 << 20) + (3 << 20)) << "size of the unlinked file";
  EXPECT_EQ(fsync(fd), 0) << "fsync of an unlinked file: " << errname(errno);
  ASSERT_EQ(ftruncate(fd, 20), 0) << "ftruncate of an unlinked file: " << errname(errno);
  EXPECT_EQ(pread_n(fd, 100, 0), "before unlink;after ") << "read after ftruncate of the unlinked file";
  EXPECT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 6), 0) << errname(errno);
  EXPECT_EQ(pread_n(fd, 100, 0), std::string(6, '\0') + " unlink;after ") << "read after punching the unlinked file";

  // A new file under the same name is a different file.
  write_file(m("tmpfile"), "new file");
  EXPECT_EQ(read_file(m("tmpfile")), "new file") << "new file under the old name";
  EXPECT_EQ(pread_n(fd, 100, 0), std::string(6, '\0') + " unlink;after ") << "the unlinked file must be unaffected by the new name";
  {
    Mapping map(fd, 20, PROT_READ | PROT_WRITE);
    memcpy(map.data(), "mapped", 6);
    ASSERT_EQ(msync(map.data(), 20, MS_SYNC), 0) << "msync of an unlinked file: " << errname(errno);
  }
  EXPECT_EQ(pread_n(fd, 100, 0), "mapped unlink;after ") << "read after a mapped write to the unlinked file";
  EXPECT_EQ(read_file(m("tmpfile")), "new file") << "the new file must not see writes to the unlinked one";
  fd.reset();
  EXPECT_EQ(read_file(b("tmpfile")), "new file") << "backing file under the reused name";
}

// --- hidden metadata -------------------------------------------------------------------------

TEST_F(PosixFs, MetadataFolderIsHidden) {
  // This one works at the mount root, where the metadata folder lives.
  const std::string meta = mnt_ + "/.blockrepl", bmeta = data_ + "/.blockrepl";
  const std::string visible = mnt_ + "/visible-at-root";
  struct stat st;
  ASSERT_EQ(stat(bmeta.c_str(), &st), 0) << "precondition: the backing dir holds .blockrepl";
  write_file(visible, "v");
  std::set<std::string> names = list_dir(mnt_);
  EXPECT_EQ(names.count(".blockrepl"), 0u) << "readdir of the mount root must not list .blockrepl";
  EXPECT_EQ(names.count("visible-at-root"), 1u) << "readdir of the mount root must list the file made there";
  std::set<std::string> backing = list_dir(data_);
  backing.erase(".blockrepl");
  EXPECT_EQ(names, backing) << "mount root listing must be the backing dir's without .blockrepl";
  EXPECT_EQ(stat_errno(meta), ENOENT) << "stat of MNT/.blockrepl: expected ENOENT";
  EXPECT_EQ(stat_errno(meta + "/identity"), ENOENT) << "stat of a path inside .blockrepl: expected ENOENT";
  EXPECT_EQ(open(meta.c_str(), O_RDONLY), -1) << "open of MNT/.blockrepl must fail";
  EXPECT_NE(mkdir(meta.c_str(), 0755), 0) << "mkdir MNT/.blockrepl must fail";
  EXPECT_EQ(open(meta.c_str(), O_CREAT | O_WRONLY, 0644), -1) << "creating MNT/.blockrepl as a file must fail";
  EXPECT_NE(rename(visible.c_str(), meta.c_str()), 0) << "rename onto MNT/.blockrepl must fail";
  EXPECT_NE(symlink("x", meta.c_str()), 0) << "symlink named .blockrepl must fail";
  EXPECT_NE(link(visible.c_str(), meta.c_str()), 0) << "hard link named .blockrepl must fail";
  EXPECT_NE(mknod(meta.c_str(), S_IFIFO | 0600, 0), 0) << "mknod named .blockrepl must fail";
  EXPECT_NE(rmdir(meta.c_str()), 0) << "rmdir MNT/.blockrepl must fail";
  EXPECT_NE(rename(m("").c_str(), meta.c_str()), 0) << "renaming a directory onto MNT/.blockrepl must fail";
  EXPECT_EQ(read_file(visible), "v") << "the file must survive the refused rename";
  ASSERT_EQ(stat(bmeta.c_str(), &st), 0) << "the backing .blockrepl must still exist";
  EXPECT_TRUE(S_ISDIR(st.st_mode)) << "the backing .blockrepl must still be a directory";
  EXPECT_EQ(stat(b("").c_str(), &st), 0) << "the test directory must still exist";
  EXPECT_EQ(unlink(visible.c_str()), 0) << errname(errno);
  // A .blockrepl below the root is an ordinary name.
  EXPECT_EQ(mkdir(m(".blockrepl").c_str(), 0755), 0) << "a .blockrepl below the root is an ordinary name: " << errname(errno);
  EXPECT_EQ(list_dir(dir_), std::set<std::string>{".blockrepl"}) << "a .blockrepl below the root is listed";
}

// --- readdir ---------------------------------------------------------------------------------

TEST_F(PosixFs, ManyFilesListedCompletely) {
  constexpr int kFiles = 2000;
  ASSERT_EQ(mkdir(m("many").c_str(), 0755), 0) << errname(errno);
  std::set<std::string> expected;
  for (int i = 0; i < kFiles; i++) {
    char name[64];
    snprintf(name, sizeof name, "file-with-a-fairly-long-name-%05d", i);
    int fd = open((m("many/") + name).c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0) << "create #" << i << ": " << errname(errno);
    close(fd);
    expected.insert(name);
  }
  // One pass, counting duplicates.
  DIR* d = opendir(m("many").c_str());
  ASSERT_NE(d, nullptr) << errname(errno);
  std::vector<std::string> seen;
  long mark = -1;
  std::vector<std::string> after_mark;
  errno = 0;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    if (mark >= 0) after_mark.push_back(n);
    seen.push_back(n);
    if (seen.size() == 700) mark = telldir(d);
  }
  EXPECT_EQ(errno, 0) << "readdir ended with an error: " << errname(errno);
  EXPECT_EQ(seen.size(), static_cast<size_t>(kFiles)) << "readdir must return every entry exactly once";
  EXPECT_EQ(std::set<std::string>(seen.begin(), seen.end()), expected) << "readdir names";
  // seekdir back to a position and the rest comes again, identically.
  ASSERT_GE(mark, 0);
  seekdir(d, mark);
  std::vector<std::string> again;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") again.push_back(n);
  }
  EXPECT_EQ(again, after_mark) << "entries after seekdir(telldir()) must repeat the same sequence";
  closedir(d);
  // A second listing (possibly from the readdir cache) is complete as well.
  EXPECT_EQ(list_dir(m("many")), expected) << "second listing";
  std::set<std::string> backing = list_dir(b("many"));
  EXPECT_EQ(backing, expected) << "backing directory listing";
  // Removing half keeps the listing exact.
  int i = 0;
  for (auto it = expected.begin(); it != expected.end(); i++) {
    if (i % 2) {
      ASSERT_EQ(unlink((m("many/") + *it).c_str()), 0) << errname(errno);
      it = expected.erase(it);
    } else {
      ++it;
    }
  }
  EXPECT_EQ(list_dir(m("many")), expected) << "listing after removing every second file";
}

// --- other users -----------------------------------------------------------------------------

TEST_F(PosixFs, OtherUsersWithKernelPermissionChecks) {
  // mkdtemp made the temporary directory 0700: let other users reach the mount point.
  ASSERT_EQ(chmod(tmp_->path().c_str(), 0755), 0) << errname(errno);
  ASSERT_EQ(chmod(mnt_.c_str(), 0755), 0) << errname(errno);
  ASSERT_EQ(mkdir(m("home1234").c_str(), 0700), 0) << errname(errno);
  ASSERT_EQ(chown(m("home1234").c_str(), 1234, 1234), 0) << errname(errno);
  ASSERT_EQ(mkdir(m("public").c_str(), 0755), 0) << errname(errno);
  write_file(m("public/readonly"), "root's file");
  ASSERT_EQ(chmod(m("public/readonly").c_str(), 0644), 0) << errname(errno);

  std::string r = in_child([&]() -> std::string {
    std::string e = become(1234, 1234);
    if (!e.empty()) return e;
    int fd = open(m("home1234/mine").c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) return "uid 1234 creating a file in its own 0700 directory: expected success, got " + errname(errno);
    if (write(fd, "user data", 9) != 9) return "uid 1234 write: " + errname(errno);
    char buf[16] = {};
    if (pread(fd, buf, sizeof buf, 0) != 9 || std::string(buf, 9) != "user data") return "uid 1234 read back mismatch";
    if (fsync(fd) != 0) return "uid 1234 fsync: " + errname(errno);
    close(fd);
    if (mkdir(m("home1234/subdir").c_str(), 0700) != 0) return "uid 1234 mkdir: " + errname(errno);
    if (symlink("mine", m("home1234/link").c_str()) != 0) return "uid 1234 symlink: " + errname(errno);
    if (rename(m("home1234/link").c_str(), m("home1234/link2").c_str()) != 0) return "uid 1234 rename: " + errname(errno);
    // Another user's file in a public directory: readable, not writable.
    fd = open(m("public/readonly").c_str(), O_RDONLY);
    if (fd < 0) return "uid 1234 reading a 0644 file of root: " + errname(errno);
    close(fd);
    if (open(m("public/readonly").c_str(), O_WRONLY) >= 0) return "uid 1234 opened root's 0644 file for writing";
    if (errno != EACCES) return "uid 1234 writing root's 0644 file: expected EACCES, got " + errname(errno);
    if (open(m("public/new").c_str(), O_CREAT | O_WRONLY, 0644) >= 0) return "uid 1234 created a file in root's 0755 directory";
    if (errno != EACCES) return "uid 1234 creating in root's 0755 dir: expected EACCES, got " + errname(errno);
    if (chown(m("public/readonly").c_str(), 1234, 1234) == 0) return "uid 1234 chowned root's file";
    if (errno != EPERM) return "uid 1234 chown of root's file: expected EPERM, got " + errname(errno);
    return "";
  });
  EXPECT_EQ(r, "") << "as uid 1234";

  struct stat sb = lstat_of(b("home1234/mine")), sm = lstat_of(m("home1234/mine"));
  EXPECT_EQ(sb.st_uid, 1234u) << "backing file created by uid 1234 must be owned by 1234";
  EXPECT_EQ(sb.st_gid, 1234u) << "backing file created by gid 1234 must have group 1234";
  EXPECT_EQ(sb.st_mode & 07777, 0600u) << "backing mode of the file created with 0600 under umask";
  EXPECT_EQ(sm.st_uid, 1234u) << "owner on the mount";
  EXPECT_EQ(lstat_of(b("home1234/subdir")).st_uid, 1234u) << "backing directory made by uid 1234 must be owned by it";
  EXPECT_EQ(lstat_of(b("home1234/link2")).st_uid, 1234u) << "backing symlink made by uid 1234 must be owned by it";
  EXPECT_EQ(read_file(b("home1234/mine")), "user data") << "backing contents written by uid 1234";

  r = in_child([&]() -> std::string {
    std::string e = become(4321, 4321);
    if (!e.empty()) return e;
    if (open(m("home1234/mine").c_str(), O_RDONLY) >= 0) return "uid 4321 opened a file inside uid 1234's 0700 directory";
    if (errno != EACCES) return "uid 4321 open in uid 1234's 0700 dir: expected EACCES, got " + errname(errno);
    if (open(m("home1234/other").c_str(), O_CREAT | O_WRONLY, 0644) >= 0) return "uid 4321 created a file in uid 1234's 0700 dir";
    if (errno != EACCES) return "uid 4321 create in uid 1234's 0700 dir: expected EACCES, got " + errname(errno);
    struct stat st;
    if (stat(m("home1234/mine").c_str(), &st) == 0) return "uid 4321 could stat inside uid 1234's 0700 dir";
    if (errno != EACCES) return "uid 4321 stat in uid 1234's 0700 dir: expected EACCES, got " + errname(errno);
    if (opendir(m("home1234").c_str()) != nullptr) return "uid 4321 could list uid 1234's 0700 dir";
    if (errno != EACCES) return "uid 4321 opendir of uid 1234's 0700 dir: expected EACCES, got " + errname(errno);
    // But the mount itself is usable by this user (allow_other).
    if (stat(m("public/readonly").c_str(), &st) != 0) return "uid 4321 stat of a public file: " + errname(errno);
    return "";
  });
  EXPECT_EQ(r, "") << "as uid 4321";
  EXPECT_EQ(stat_errno(b("home1234/other")), ENOENT) << "the refused create must leave nothing behind";
}

}  // namespace
}  // namespace blockrepl::test

namespace blockrepl::test {
namespace {

// We negotiate FUSE_HANDLE_KILLPRIV_V2, so dropping set-id bits on a write is the daemon's job;
// the kernel's cached attributes must show it too.
TEST_F(PosixFs, WriteByAnotherUserDropsSetUidAndSetGid) {
  const std::string f = m("setid");
  // Other users must be able to reach the file (mkdtemp made the temporary directory 0700).
  ASSERT_EQ(chmod(tmp_->path().c_str(), 0755), 0);
  write_file(f, "x");
  ASSERT_EQ(chown(f.c_str(), 1234, 1234), 0);
  ASSERT_EQ(chmod(f.c_str(), 06777), 0);
  ASSERT_EQ(stat_of(f).st_mode & 07777, 06777u);
  std::string r = in_child([&]() -> std::string {
    if (auto e = become(4321, 4321); !e.empty()) return e;
    int fd = open(f.c_str(), O_WRONLY | O_APPEND);
    if (fd < 0) return "open: " + errname(errno);
    if (write(fd, "y", 1) != 1) return "write: " + errname(errno);
    if (fsync(fd) != 0) return "fsync: " + errname(errno);
    close(fd);
    return "";
  });
  ASSERT_EQ(r, "");
  EXPECT_EQ(stat_of(b("setid")).st_mode & 07777, 0777u) << "backing file kept its set-id bits after a write";
  // The invalidation is sent from another thread: allow it a moment.
  mode_t seen = 0;
  for (int i = 0; i < 100; i++) {
    seen = stat_of(f).st_mode & 07777;
    if (seen == 0777) break;
    usleep(10000);
  }
  EXPECT_EQ(seen, 0777u) << "the mount still shows the set-id bits after a write by another user";
  EXPECT_EQ(read_file(f), "xy");
}

}  // namespace
}  // namespace blockrepl::test

// =============================================================================================
// POSIX details where ext4 and a FUSE mount differ by default, on a replicated mount: each must
// behave as on the backing file system (a plain directory beside it is the reference) and reach
// the sync slave unchanged (backing trees identical, and what readers of its mount see).

namespace blockrepl::test {
namespace {

class PosixReplicated : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    cluster_ = new repl::Cluster("posix-repl");
    // Other users must reach the mounts (mkdtemp made the directory 0700).
    chmod(cluster_->path().c_str(), 0755);
    master_ = &cluster_->add_master({"--ack", "sync"});
    if (!master_->ok()) return;
    // But not the slave's backing directory: a replica's must lie below a root-only directory.
    slave_ = &cluster_->define_slave(*master_);
    slave_->data = cluster_->private_data_dir("slave-vault");
    cluster_->mount(*slave_);
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
    master_ = slave_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(master_ && master_->ok()) << "the master did not mount:\n" << cluster_->all_logs();
    ASSERT_TRUE(slave_ && slave_->ok()) << "the slave did not mount:\n" << cluster_->all_logs();
    name_ = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    ASSERT_EQ(mkdir(m("").c_str(), 0755), 0) << errname(errno);
    ASSERT_EQ(chmod(m("").c_str(), 0777), 0) << errname(errno);  // any user may create here
    ASSERT_EQ(mkdir(ref("").c_str(), 0777), 0) << errname(errno);
    ASSERT_EQ(chmod(ref("").c_str(), 0777), 0) << errname(errno);
  }
  std::string m(const std::string& rel) const { return master_->file(name_ + "/" + rel); }     // master mount
  std::string mb(const std::string& rel) const { return master_->backing(name_ + "/" + rel); } // its backing
  std::string s(const std::string& rel) const { return slave_->file(name_ + "/" + rel); }      // slave mount
  std::string sb(const std::string& rel) const { return slave_->backing(name_ + "/" + rel); }  // its backing
  // The same name in a plain directory on the backing file system: what ext4 does.
  std::string ref(const std::string& rel) const { return cluster_->path() + "/ref-" + name_ + "/" + rel; }

  // After a sync point the slave's backing tree equals the master's: types, modes, owners,
  // sizes, contents, mtimes, user xattrs and file ids.
  void expect_replicated() {
    ASSERT_EQ(repl::sync_and_wait(master_->mnt, {slave_->mnt}), "") << "the slave did not catch up";
    repl::CompareOptions o;
    o.file_mtimes = true;
    EXPECT_EQ(repl::diff_report(mb(""), sb(""), o, "master", "slave"), "");
  }

  static repl::Cluster* cluster_;
  static repl::Node* master_;
  static repl::Node* slave_;
  std::string name_;
};
repl::Cluster* PosixReplicated::cluster_ = nullptr;
repl::Node* PosixReplicated::master_ = nullptr;
repl::Node* PosixReplicated::slave_ = nullptr;

// The mode the kernel shows for p once it agrees with `want` (the daemon's own changes reach
// the kernel's attribute cache through an invalidation from another thread), else its last view.
mode_t mode_settling_on(const std::string& p, mode_t want) {
  mode_t seen = 0;
  for (int i = 0; i < 200; i++) {
    seen = stat_of(p).st_mode & 07777;
    if (seen == want) break;
    usleep(10000);
  }
  return seen;
}

bool has_caps(const std::string& p) { return getxattr(p.c_str(), "security.capability", nullptr, 0) >= 0; }

// A version 2 file capability: cap_net_bind_service permitted and effective.
std::string net_bind_caps() {
  struct {
    uint32_t magic_etc = 0x02000000 | 1;  // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
    uint32_t data[4] = {1u << 10, 0, 0, 0};  // permitted, inheritable (low and high words)
  } v;
  return std::string(reinterpret_cast<const char*>(&v), sizeof v);
}

// What a write or a truncate leaves of a file's privileges, on a path of either tree.
struct PrivilegeCase {
  std::string file;
  mode_t mode;       // set by root before the change
  bool caps;         // security.capability set by root before the change
  uid_t changer;     // who changes the file (0: root, with CAP_FSETID)
  bool truncate;     // truncate(2) to 1 byte instead of appending a byte
};

std::string privilege_case_name(const PrivilegeCase& c) {
  char buf[96];
  snprintf(buf, sizeof buf, "%s (mode %04o%s, %s by uid %u)", c.file.c_str(), c.mode, c.caps ? ", caps" : "",
           c.truncate ? "truncated" : "appended to", c.changer);
  return buf;
}

// Runs the case in dir; returns "" or what failed.
std::string run_privilege_case(const std::string& dir, const PrivilegeCase& c) {
  const std::string p = dir + "/" + c.file;
  write_file(p, "x");
  if (chown(p.c_str(), 4321, 4321) != 0) return "chown: " + errname(errno);
  if (chmod(p.c_str(), c.mode) != 0) return "chmod: " + errname(errno);
  const std::string caps = net_bind_caps();
  if (c.caps && setxattr(p.c_str(), "security.capability", caps.data(), caps.size(), 0) != 0)
    return "setxattr security.capability: " + errname(errno);
  return in_child([&]() -> std::string {
    if (c.changer != 0)
      if (auto e = become(c.changer, c.changer); !e.empty()) return e;
    if (c.truncate) return truncate(p.c_str(), 1) == 0 ? "" : "truncate: " + errname(errno);
    int fd = open(p.c_str(), O_WRONLY | O_APPEND);
    if (fd < 0) return "open: " + errname(errno);
    std::string r = write(fd, "y", 1) == 1 ? "" : "write: " + errname(errno);
    if (close(fd) != 0 && r.empty()) r = "close: " + errname(errno);
    return r;
  });
}

TEST_F(PosixReplicated, WriteAndTruncateDropSetIdBitsOnlyWithoutCapFsetidAsOnExt4) {
  std::vector<PrivilegeCase> cases;
  int n = 0;
  for (uid_t changer : {0u, 4321u})
    for (bool trunc : {false, true})
      for (mode_t mode : {04755u, 02755u, 06775u, 02745u, 0755u})
        cases.push_back({"f" + std::to_string(n++), mode, mode == 0755u, changer, trunc});

  for (const auto& c : cases) {
    SCOPED_TRACE(privilege_case_name(c));
    ASSERT_EQ(run_privilege_case(ref(""), c), "") << "on the plain directory";
    ASSERT_EQ(run_privilege_case(m(""), c), "") << "on the master mount";
  }
  for (const auto& c : cases) {
    SCOPED_TRACE(privilege_case_name(c));
    const mode_t want = stat_of(ref(c.file)).st_mode & 07777;
    EXPECT_EQ(stat_of(mb(c.file)).st_mode & 07777, want) << "master backing mode differs from ext4's";
    EXPECT_EQ(mode_settling_on(m(c.file), want), want) << "master mount mode differs from ext4's";
    EXPECT_EQ(has_caps(mb(c.file)), has_caps(ref(c.file))) << "file capabilities differ from ext4's";
    EXPECT_EQ(read_file(m(c.file)), read_file(ref(c.file))) << "contents";
  }
  // The headline cases, spelled out: root keeps the bits, another writer loses them.
  EXPECT_EQ(stat_of(m("f0")).st_mode & 07777, 04755u) << "a write by root must keep set-user-id";
  EXPECT_EQ(stat_of(m("f1")).st_mode & 07777, 02755u) << "a write by root must keep set-group-id";
  EXPECT_EQ(mode_settling_on(m("f10"), 0755), 0755u) << "a write by uid 4321 must drop set-user-id";
  EXPECT_EQ(mode_settling_on(m("f11"), 0755), 0755u) << "a write by uid 4321 must drop set-group-id";
  EXPECT_EQ(mode_settling_on(m("f13"), 02745), 02745u) << "set-group-id without group-execute stays";
  EXPECT_FALSE(has_caps(mb("f4"))) << "a write drops file capabilities, by root too (as on ext4)";

  expect_replicated();
  for (const auto& c : cases) {
    SCOPED_TRACE(privilege_case_name(c));
    const mode_t want = stat_of(ref(c.file)).st_mode & 07777;
    EXPECT_EQ(mode_settling_on(s(c.file), want), want) << "slave mount mode";
    EXPECT_EQ(has_caps(sb(c.file)), has_caps(ref(c.file))) << "slave's file capabilities";
  }
}

int renameat2_flags(const std::string& from, const std::string& to, unsigned flags) {
  return static_cast<int>(syscall(SYS_renameat2, AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), flags));
}

TEST_F(PosixReplicated, RenameWhiteoutLeavesAWhiteoutAsOnExt4AndReplicates) {
  // Reference: ext4 leaves a character device 0/0 with mode 0 at the old name.
  write_file(ref("a"), "data of a");
  ASSERT_EQ(renameat2_flags(ref("a"), ref("b"), RENAME_WHITEOUT), 0) << "ext4: " << errname(errno);
  const struct stat rw = lstat_of(ref("a"));

  write_file(m("a"), "data of a");
  write_file(m("c"), "data of c");
  write_file(m("d"), "old d");
  ASSERT_EQ(renameat2_flags(m("a"), m("b"), RENAME_WHITEOUT), 0) << "RENAME_WHITEOUT on the mount: " << errname(errno);
  // Over an existing target too, and together with RENAME_NOREPLACE onto a free name.
  ASSERT_EQ(renameat2_flags(m("c"), m("d"), RENAME_WHITEOUT), 0) << "RENAME_WHITEOUT over a file: " << errname(errno);
  ASSERT_EQ(renameat2_flags(m("b"), m("e"), RENAME_WHITEOUT | RENAME_NOREPLACE), 0) << errname(errno);
  EXPECT_EQ(renameat2_flags(m("e"), m("d"), RENAME_WHITEOUT | RENAME_NOREPLACE), -1);
  EXPECT_EQ(errno, EEXIST) << "RENAME_NOREPLACE onto an existing name";
  EXPECT_EQ(renameat2_flags(m("e"), m("d"), RENAME_WHITEOUT | RENAME_EXCHANGE), -1);
  EXPECT_EQ(errno, EINVAL) << "RENAME_WHITEOUT with RENAME_EXCHANGE";

  for (const char* w : {"a", "b", "c"}) {
    SCOPED_TRACE(std::string("whiteout ") + w);
    for (const std::string& p : {m(w), mb(w)}) {
      struct stat st = lstat_of(p);
      EXPECT_TRUE(S_ISCHR(st.st_mode)) << p << " is not a character device";
      EXPECT_EQ(st.st_rdev, makedev(0, 0)) << p;
      EXPECT_EQ(st.st_mode, rw.st_mode) << p << ": mode differs from ext4's whiteout";
      EXPECT_EQ(st.st_uid, rw.st_uid) << p;
      EXPECT_EQ(st.st_gid, rw.st_gid) << p;
    }
    EXPECT_FALSE(get_xattr(mb(w), kFidXattr).empty()) << "the whiteout has no file id";
  }
  EXPECT_EQ(read_file(m("e")), "data of a");
  EXPECT_EQ(read_file(m("d")), "data of c");
  EXPECT_EQ(list_dir(m("")), (std::set<std::string>{"a", "b", "c", "d", "e"}));

  expect_replicated();
  for (const char* w : {"a", "b", "c"}) {
    struct stat st = lstat_of(s(w));
    EXPECT_TRUE(S_ISCHR(st.st_mode) && st.st_rdev == makedev(0, 0)) << "slave mount: " << w << " is no whiteout";
  }
  EXPECT_EQ(read_file(s("e")), "data of a");
  EXPECT_EQ(read_file(s("d")), "data of c");

  // A whiteout is an entry like any other: unlink it.
  ASSERT_EQ(unlink(m("a").c_str()), 0) << "unlink of a whiteout: " << errname(errno);
  ASSERT_EQ(rename(m("b").c_str(), m("b2").c_str()), 0) << "rename of a whiteout: " << errname(errno);
  EXPECT_EQ(stat_errno(m("a")), ENOENT);
  expect_replicated();
  EXPECT_EQ(stat_errno(s("a")), ENOENT) << "the unlinked whiteout is still on the slave mount";
  EXPECT_TRUE(S_ISCHR(lstat_of(s("b2")).st_mode)) << "the renamed whiteout on the slave mount";
  EXPECT_EQ(list_dir(s("")), (std::set<std::string>{"b2", "c", "d", "e"}));
}

// FUSE's kernel module (fs/fuse/file.c, fuse_file_fallocate, up to 6.18 at least) refuses every
// mode but KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE with EOPNOTSUPP before it asks the daemon, so
// collapse and insert cannot reach blockrepl. The test holds the mount to one of two outcomes:
// the kernel's refusal with the file untouched everywhere, or (on a kernel that passes them on)
// ext4's bytes everywhere, through both mounts and in both backing files.
TEST_F(PosixReplicated, CollapseAndInsertRangeAsOnExt4OrRefusedByTheKernelWithNothingChanged) {
  constexpr off_t KiB = 1024, MiB = 1024 * KiB;
  const std::string data = pattern(MiB, 11);
  write_file(ref("f"), data);
  {
    Fd r(open_or_throw(ref("f"), O_RDWR));
    ASSERT_EQ(fallocate(r, FALLOC_FL_COLLAPSE_RANGE, 128 * KiB, 64 * KiB), 0) << "ext4: " << errname(errno);
    ASSERT_EQ(fallocate(r, FALLOC_FL_INSERT_RANGE, 256 * KiB, 64 * KiB), 0) << "ext4: " << errname(errno);
    EXPECT_EQ(fallocate(r, FALLOC_FL_COLLAPSE_RANGE, 1000, 4096), -1);
    EXPECT_EQ(errno, EINVAL) << "ext4, unaligned collapse";
  }
  const std::string want = read_file(ref("f"));

  // The first half written back, the second still dirty in the mount's page cache, all cached.
  Fd fd(open_or_throw(m("f"), O_CREAT | O_RDWR));
  pwrite_all(fd, data.substr(0, MiB / 2), 0);
  ASSERT_EQ(fsync(fd), 0) << errname(errno);
  pwrite_all(fd, data.substr(MiB / 2), MiB / 2);
  ASSERT_EQ(pread_n(fd, MiB, 0).size(), static_cast<size_t>(MiB));

  const int rc = fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 128 * KiB, 64 * KiB);
  const int err = rc == 0 ? 0 : errno;
  if (rc != 0) {
    EXPECT_EQ(err, EOPNOTSUPP) << "collapse on the mount";
    EXPECT_EQ(fallocate(fd, FALLOC_FL_INSERT_RANGE, 256 * KiB, 64 * KiB), -1);
    EXPECT_EQ(errno, EOPNOTSUPP) << "insert on the mount";
    ASSERT_EQ(fsync(fd), 0) << errname(errno);
    EXPECT_SAME_BYTES(data, read_file(m("f")), "master mount after the refused calls");
    EXPECT_SAME_BYTES(data, read_file(mb("f")), "master backing file after the refused calls");
    expect_replicated();
    EXPECT_SAME_BYTES(data, read_file(s("f")), "slave mount after the refused calls");
    return;
  }
  ASSERT_EQ(fallocate(fd, FALLOC_FL_INSERT_RANGE, 256 * KiB, 64 * KiB), 0) << "insert on the mount: " << errname(errno);
  EXPECT_EQ(fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 1000, 4096), -1);
  EXPECT_EQ(errno, EINVAL) << "unaligned collapse on the mount";
  EXPECT_EQ(fstat_of(fd).st_size, static_cast<off_t>(want.size())) << "size on the mount";
  EXPECT_SAME_BYTES(want, read_file(m("f")), "master mount after collapse and insert");
  ASSERT_EQ(fsync(fd), 0) << errname(errno);
  EXPECT_SAME_BYTES(want, read_file(mb("f")), "master backing file after collapse and insert");
  expect_replicated();
  EXPECT_SAME_BYTES(want, read_file(s("f")), "slave mount after collapse and insert");
}

}  // namespace
}  // namespace blockrepl::test
