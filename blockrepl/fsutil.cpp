#include "blockrepl/fsutil.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>

#include "blockrepl/error.h"
#include "blockrepl/metadata.h"

namespace blockrepl {

bool valid_path_component(std::string_view name) {
  return !name.empty() && name.size() <= kMaxNameBytes && name != "." && name != ".." &&
         name.find('/') == std::string_view::npos && name.find('\0') == std::string_view::npos;
}

// ---------------------------------------------------------------------------------------------

bool DirEntry::is_dir() const { return d_type == DT_DIR; }

namespace {
struct CloseDir {
  void operator()(DIR* d) const { closedir(d); }
};
using DirStream = std::unique_ptr<DIR, CloseDir>;

bool is_dot_or_dotdot(const char* name) { return !strcmp(name, ".") || !strcmp(name, ".."); }
}  // namespace

DirListing list_dir(int dirfd, bool at_volume_root, size_t max_entries) {
  DirListing out;
  // A fresh open of the directory: its own read position, and `dirfd` may be O_PATH.
  int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    out.error = errno;
    return out;
  }
  DirStream d(fdopendir(fd));
  if (!d) {
    out.error = errno;
    close(fd);
    return out;
  }
  while (out.entries.size() < max_entries) {
    errno = 0;  // readdir's end and its failure both return null; only errno tells them apart
    const dirent* de = readdir(d.get());
    if (!de) {
      out.error = errno;
      break;
    }
    if (is_dot_or_dotdot(de->d_name)) continue;
    if (at_volume_root && is_hidden_root_entry(de->d_name, de->d_type)) continue;
    out.entries.push_back(DirEntry{de->d_name, de->d_type});
  }
  return out;  // the stream (and its descriptor) closes here, before the caller descends
}

// ---------------------------------------------------------------------------------------------

namespace {

int write_all(int fd, std::span<const std::string_view> pieces) {
  for (std::string_view piece : pieces) {
    while (!piece.empty()) {
      ssize_t n = write(fd, piece.data(), piece.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      if (n == 0) return EIO;  // a regular file never takes nothing without an error; do not spin
      piece.remove_prefix(static_cast<size_t>(n));
    }
  }
  return 0;
}

// Writes the whole temporary file; 0 or errno (the caller removes it on failure).
int write_temporary(int dirfd, const char* tmp, std::span<const std::string_view> pieces, bool durable) {
  OwnedFd fd(openat(dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) return errno;
  if (int err = write_all(fd.get(), pieces)) return err;
  if (durable && fsync(fd.get()) != 0) return errno;
  // close's error counts: on some file systems it is the first report of a failed write.
  return close(fd.release()) == 0 ? 0 : errno;
}

}  // namespace

int write_file_atomically(int dirfd, const char* name, std::span<const std::string_view> pieces, bool durable) {
  const std::string tmp = std::string(name) + ".tmp";
  int err = write_temporary(dirfd, tmp.c_str(), pieces, durable);
  if (err == 0 && renameat(dirfd, tmp.c_str(), dirfd, name) != 0) err = errno;
  if (err) {
    unlinkat(dirfd, tmp.c_str(), 0);  // a half-written temporary must not outlive the attempt
    return err;
  }
  // The rename is a change of the directory: without this, a crash may bring the old file back.
  if (durable && fsync(dirfd) != 0) return errno;
  return 0;
}

int write_file_atomically(int dirfd, const char* name, std::string_view data, bool durable) {
  return write_file_atomically(dirfd, name, std::span<const std::string_view>(&data, 1), durable);
}

// ---------------------------------------------------------------------------------------------

namespace {

// Kernels before 5.6 (or a seccomp filter) answer ENOSYS; remembered so the fallback does not
// pay for a failing system call each time.
std::atomic<bool> g_openat2_missing{false};

int openat2_beneath(int dirfd, const char* path, int flags, mode_t mode) {
  open_how how{};
  how.flags = static_cast<uint64_t>(static_cast<unsigned>(flags));
  // openat2 refuses a mode without O_CREAT or O_TMPFILE (EINVAL), unlike openat.
  const bool creates = (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
  how.mode = creates ? mode : 0;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
  for (int attempt = 0;; attempt++) {
    long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    if (fd >= 0) return static_cast<int>(fd);
    // EAGAIN: a concurrent rename raced a ".." lookup; the kernel asks to retry.
    if (errno != EAGAIN || attempt >= 8) return -1;
  }
}

}  // namespace

int open_beneath(int dirfd, const char* path, int flags, mode_t mode) {
  if (!g_openat2_missing.load(std::memory_order_relaxed)) {
    int fd = openat2_beneath(dirfd, path, flags, mode);
    if (fd >= 0 || errno != ENOSYS) return fd;
    g_openat2_missing.store(true, std::memory_order_relaxed);
  }
  return open_beneath_by_components(dirfd, path, flags, mode);
}

int open_beneath_by_components(int dirfd, const char* path, int flags, mode_t mode) {
  const std::string_view p(path);
  if (p.empty()) {
    errno = ENOENT;  // as openat("") without AT_EMPTY_PATH
    return -1;
  }
  if (p.front() == '/') {
    errno = EXDEV;  // as openat2 with RESOLVE_BENEATH
    return -1;
  }
  std::vector<std::string> parts;
  for (size_t start = 0; start <= p.size();) {
    size_t slash = p.find('/', start);
    if (slash == std::string_view::npos) slash = p.size();
    const std::string_view c = p.substr(start, slash - start);
    if (c == "..") {
      errno = EXDEV;
      return -1;
    }
    if (!c.empty() && c != ".") parts.emplace_back(c);
    start = slash + 1;
  }
  if (parts.empty()) return openat(dirfd, ".", flags, mode);
  OwnedFd cur;
  int at = dirfd;
  for (size_t i = 0; i + 1 < parts.size(); i++) {
    int next = openat(at, parts[i].c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (next < 0) return -1;  // errno from openat (closing `cur` succeeds and leaves it)
    cur.reset(next);
    at = next;
  }
  const int fd = openat(at, parts.back().c_str(), flags | O_NOFOLLOW, mode);
  const int err = errno;
  cur.reset();
  errno = err;
  return fd;
}

void check_private_file(const std::string& path, const char* what) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw_errno(std::string(what) + " file " + path, errno);
  if (!S_ISREG(st.st_mode)) throw Error(std::string(what) + " file " + path + " is not a regular file", EINVAL);
  if (st.st_uid != 0 && st.st_uid != geteuid())
    throw Error(std::string(what) + " file " + path + " belongs to uid " + std::to_string(st.st_uid) +
                    ": it must belong to root or to the daemon's user",
                EPERM);
  if (st.st_mode & 077) {
    char mode[8];
    snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    throw Error(std::string(what) + " file " + path + " is accessible to others (mode " + mode + "): chmod 600 " + path, EPERM);
  }
}

std::string read_private_file(const std::string& path, const char* what, size_t max_bytes) {
  check_private_file(path, what);
  OwnedFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) throw_errno(std::string(what) + " file " + path, errno);
  std::string out(max_bytes + 1, '\0');
  size_t got = 0;
  for (;;) {
    const ssize_t r = read(fd.get(), out.data() + got, out.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw_errno(std::string(what) + " file " + path, errno);
    if (r == 0) break;
    got += static_cast<size_t>(r);
    if (got > max_bytes)
      throw Error(std::string(what) + " file " + path + " is larger than " + std::to_string(max_bytes) + " bytes", EINVAL);
  }
  out.resize(got);
  return out;
}

namespace {

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string unescape_mountinfo(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); i++) {
    if (s[i] == '\\' && i + 3 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '3' && s[i + 2] >= '0' &&
        s[i + 2] <= '7' && s[i + 3] >= '0' && s[i + 3] <= '7') {
      out += static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

}  // namespace

std::vector<MountEntry> read_mountinfo() {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  std::vector<MountEntry> mounts;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string id, parent, devno, root, mnt;
    ls >> id >> parent >> devno >> root >> mnt;
    std::string tok;
    while (ls >> tok && tok != "-") {}
    MountEntry e;
    e.mountpoint = unescape_mountinfo(mnt);
    e.devno = devno;
    ls >> e.fstype >> e.source;
    e.source = unescape_mountinfo(e.source);
    mounts.push_back(std::move(e));
  }
  return mounts;
}

std::optional<MountEntry> find_mount(const std::string& mountpoint) {
  std::optional<MountEntry> found;
  for (auto& m : read_mountinfo())
    if (m.mountpoint == mountpoint) found = m;  // the last entry is the one on top
  return found;
}

}  // namespace blockrepl
