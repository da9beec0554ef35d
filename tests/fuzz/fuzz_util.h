// What the fuzz targets share: a per-process scratch directory (tmpfs when it takes trusted.*
// xattrs, else /var/tmp), a volume set up as a node has it (metadata folder, Store, HashIndex),
// files written from fuzz input, frames as the wire carries them, and a fixed volume with known
// file ids and times that the seed corpus (make_corpus.cpp) and the targets both build, so that
// recorded conversations still refer to files that exist.
#pragma once
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>

#include "blockrepl/file_id.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/log.h"
#include "blockrepl/metadata.h"
#include "blockrepl/store.h"
#include "blockrepl/wire.h"

namespace blockrepl::fuzz {

// Aborts with a message: a property the harness checks does not hold (libFuzzer keeps the input).
[[noreturn]] inline void fail(const std::string& what) {
  fprintf(stderr, "fuzz property violated: %s\n", what.c_str());
  abort();
}
#define FUZZ_CHECK(cond) \
  do {                   \
    if (!(cond)) ::blockrepl::fuzz::fail(std::string(#cond " (" __FILE__ ":") + std::to_string(__LINE__) + ")"); \
  } while (0)

// Quiet library logs (a damaged file is logged once per input) unless BLOCKREPL_FUZZ_VERBOSE.
inline void quiet_logs() {
  static const bool once = [] {
    set_log_level(getenv("BLOCKREPL_FUZZ_VERBOSE") ? LogLevel::debug : LogLevel::error);
    return true;
  }();
  (void)once;
}

// This process's scratch directory: a tmpfs of kScratchBytes mounted in a mount namespace of
// the process's own (so it goes when the process does, even after a crash, and a record that
// preallocates or truncates to terabytes hits ENOSPC there rather than filling a shared disk or
// the machine's memory). File sizes are also capped (RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG).
// Without the privilege to mount (not root), a plain directory under /var/tmp.
inline constexpr size_t kScratchBytes = 256u << 20;
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    signal(SIGXFSZ, SIG_IGN);
    const rlimit fsize{kScratchBytes, kScratchBytes};
    setrlimit(RLIMIT_FSIZE, &fsize);
    // Under $BLOCKREPL_FUZZ_SCRATCH (tools/fuzz.sh: the run's folder, so that the empty mount
    // point a crashed process leaves goes with it), else /var/tmp.
    const char* base = getenv("BLOCKREPL_FUZZ_SCRATCH");
    std::string t = std::string(base && *base ? base : "/var/tmp") + "/blockrepl-fuzz-XXXXXX";
    char* tmpl = t.data();
    if (!mkdtemp(tmpl)) {
      perror("fuzz: mkdtemp");
      abort();
    }
    static std::string path;
    path = tmpl;
    const std::string opts = "size=" + std::to_string(kScratchBytes) + ",mode=0700";
    if (unshare(CLONE_NEWNS) == 0 && mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0 &&
        mount("tmpfs", tmpl, "tmpfs", MS_NOSUID | MS_NODEV, opts.c_str()) == 0) {
      // The mount vanishes with the process; only the empty directory is left to remove.
      atexit([] {
        umount2(path.c_str(), MNT_DETACH);
        rmdir(path.c_str());
      });
    } else {
      atexit([] {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
      });
    }
    const char v[8] = {};
    if (setxattr(tmpl, kFileIdXattr, v, sizeof v, 0) != 0) {
      fprintf(stderr, "fuzz: %s takes no trusted.* xattrs (run as root)\n", tmpl);
      abort();
    }
    removexattr(tmpl, kFileIdXattr);
    return path;
  }();
  return dir;
}

// A fresh directory under the scratch directory, removed with its contents when it goes.
struct ScratchDir {
  std::string path;
  explicit ScratchDir(const char* what = "d") {
    static uint64_t n = 0;
    path = scratch_dir() + "/" + what + std::to_string(n++);
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (mkdir(path.c_str(), 0700) != 0) throw std::runtime_error("mkdir " + path);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
};

inline void write_file(int dirfd, const char* name, std::string_view data) {
  int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throw std::runtime_error(std::string("open ") + name);
  size_t done = 0;
  while (done < data.size()) {
    ssize_t w = write(fd, data.data() + done, data.size() - done);
    if (w <= 0) break;
    done += static_cast<size_t>(w);
  }
  close(fd);
}

inline std::string read_file(int dirfd, const char* name) {
  std::string out;
  int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[65536];
  for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

// A backing directory with its metadata folder, a Store and a HashIndex (not durable: no fsync),
// as a node has them.
struct Volume {
  ScratchDir dir;
  int root_fd = -1, meta_fd = -1;
  uint32_t block_size;
  std::unique_ptr<Store> store;
  std::unique_ptr<HashIndex> hashes;

  explicit Volume(uint32_t bs = 4096, bool with_hashes = true) : dir("vol"), block_size(bs) {
    mkdir((dir.path + "/" + kMetadataDirName).c_str(), 0700);
    root_fd = open(dir.path.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    meta_fd = open((dir.path + "/" + kMetadataDirName).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0 || meta_fd < 0 || write_file_id(root_fd, "", kRootFileId) != 0)
      throw std::runtime_error("cannot set up a volume in " + dir.path);
    store = std::make_unique<Store>(root_fd, true);
    if (with_hashes) open_hashes();
  }
  ~Volume() {
    if (store) store->set_hashes(nullptr);
    hashes.reset();
    store.reset();
    close(meta_fd);
    close(root_fd);
  }
  Volume(const Volume&) = delete;
  Volume& operator=(const Volume&) = delete;

  void open_hashes() {
    hashes = std::make_unique<HashIndex>(store->files(), root_fd, meta_fd, dir.path, block_size, /*durable=*/false);
    store->set_hashes(hashes.get());
  }
  int apply(const Record& r) { return store->apply(r); }
};

// The fixed volume of the corpus: known file ids, contents and times (the namespace hashes of a
// recorded conversation then match what a target builds). `variant` 1 is the "master" side of
// a recorded Merkle diff: one file changed in a block, one file added, one removed.
inline constexpr FileId kFixedDir = 0x1000, kFixedA = 0x1001, kFixedB = 0x1002, kFixedLink = 0x1003, kFixedC = 0x1004,
                        kFixedD = 0x1005;
inline void fill_fixed_volume(Volume& v, int variant) {
  auto make = [&](Op op, FileId parent, FileId fid, const char* name, uint32_t mode, std::string_view data = {}) {
    Record r;
    r.op = op;
    r.parent = parent;
    r.fid = fid;
    r.name = name;
    r.mode = mode;
    r.data = data;
    if (int err = v.apply(r)) throw std::runtime_error(std::string("fixed volume: ") + name + ": " + strerror(err));
  };
  auto write = [&](FileId fid, uint64_t off, const std::string& data) {
    Record r;
    r.op = Op::write;
    r.fid = fid;
    r.offset = off;
    r.data = data;
    if (int err = v.apply(r)) throw std::runtime_error(std::string("fixed volume: write: ") + strerror(err));
  };
  make(Op::mkdir, kRootFileId, kFixedDir, "dir", S_IFDIR | 0755);
  make(Op::create, kFixedDir, kFixedA, "a", S_IFREG | 0644);
  std::string a(3 * v.block_size + 100, 'a');
  if (variant == 1) {
    a[v.block_size + 7] = 'X';
    a.replace(2 * v.block_size, v.block_size, v.block_size, '\0');  // sent as zeros
  }
  write(kFixedA, 0, a);
  make(Op::create, kRootFileId, kFixedB, "b", S_IFREG | 0600);
  write(kFixedB, 0, "hello");
  make(Op::symlink, kRootFileId, kFixedLink, "link", S_IFLNK | 0777, "dir/a");
  if (variant == 1) {
    make(Op::create, kFixedDir, kFixedC, "c", S_IFREG | 0644);
    write(kFixedC, 2 * v.block_size, std::string(v.block_size, 'c'));  // a hole, then a block
  } else {
    make(Op::create, kRootFileId, kFixedD, "d", S_IFREG | 0644);
  }
  Record x;
  x.op = Op::setxattr;
  x.fid = kFixedB;
  x.name = "user.note";
  x.data = "v";
  v.apply(x);
  // Times last, deepest first: every entry's mtime is fixed.
  const timespec t[2] = {{1700000000, 0}, {1700000000, 123}};
  for (const char* p : {"dir/a", "dir/c", "b", "d", "dir"}) utimensat(v.root_fd, p, t, AT_SYMLINK_NOFOLLOW);
  utimensat(v.root_fd, "link", t, AT_SYMLINK_NOFOLLOW);
  int root = open(v.dir.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  futimens(root, t);
  close(root);
}

// A message as the wire carries it: a 4-byte little-endian length, then the flat array.
inline std::string frame_bytes(capnp::MessageBuilder& mb) {
  auto words = capnp::messageToFlatArray(mb);
  auto bytes = words.asBytes();
  uint32_t len = static_cast<uint32_t>(bytes.size());
  std::string out(reinterpret_cast<const char*>(&len), sizeof len);
  out.append(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
  return out;
}

// A connected pair of stream sockets: `ours` is given to the code under test (non-blocking, so
// that what it sends into a full buffer fails instead of hanging, and a read at the end of the
// input sees the close), `theirs` is where the input was written, then shut for writing.
// Returns false if the input does not fit the socket buffer (the caller skips it).
inline bool feed_socket(const uint8_t* data, size_t size, int* ours, int* theirs) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) abort();
  int big = 8 << 20;
  setsockopt(sv[1], SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
  setsockopt(sv[0], SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
  fcntl(sv[1], F_SETFL, O_NONBLOCK);
  size_t done = 0;
  while (done < size) {
    ssize_t w = write(sv[1], data + done, size - done);
    if (w <= 0) break;
    done += static_cast<size_t>(w);
  }
  shutdown(sv[1], SHUT_WR);
  fcntl(sv[0], F_SETFL, O_NONBLOCK);
  *ours = sv[0];
  *theirs = sv[1];
  if (done < size) {
    close(sv[0]);
    close(sv[1]);
    return false;
  }
  return true;
}

}  // namespace blockrepl::fuzz
