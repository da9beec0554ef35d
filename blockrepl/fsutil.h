// File-system helpers shared by the library, each the one place its rule lives: an owned
// descriptor, the check of a name from a record or a peer, listing a directory (without the
// metadata folder at the volume root), writing a small file atomically, and opening a peer's
// path without leaving the directory it is relative to.
#pragma once
#include <sys/types.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace blockrepl {

// A descriptor that closes itself: every descriptor the library holds has one owner, so no
// exception or early return can leak it.
class OwnedFd {
 public:
  OwnedFd() = default;
  explicit OwnedFd(int fd) : fd_(fd) {}
  ~OwnedFd() { reset(); }
  OwnedFd(OwnedFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  OwnedFd& operator=(OwnedFd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;

  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// ---------------------------------------------------------------------------------------------
// Names

// Longest name one directory entry may have (NAME_MAX on Linux file systems).
inline constexpr size_t kMaxNameBytes = 255;

// Whether `name` (from a record or a peer) is exactly one path component: not empty, at most
// kMaxNameBytes, not "." or "..", no '/' and no NUL. A hostile or broken peer must not name
// anything outside the directory it addresses, so every name that reaches *at() is checked here.
bool valid_path_component(std::string_view name);

// ---------------------------------------------------------------------------------------------
// Directory listing

struct DirEntry {
  std::string name;
  unsigned char d_type = 0;  // as readdir gives it: DT_UNKNOWN where the file system does not say
  bool is_dir() const;       // d_type says directory (DT_UNKNOWN does not count)
};

struct DirListing {
  std::vector<DirEntry> entries;  // in readdir order
  int error = 0;  // errno of opening or reading the directory; `entries` hold what came before
};

// Lists directory `dirfd` (any descriptor of it, O_PATH included), without "." and "..", and,
// if `at_volume_root`, without what is_hidden_root_entry (metadata.h) says is not part of the
// volume. The directory stream is closed before this returns, so a caller may descend into the
// entries while holding only its own descriptor: a walk of any depth holds at most one
// descriptor per level. Stops after `max_entries` entries.
DirListing list_dir(int dirfd, bool at_volume_root, size_t max_entries = SIZE_MAX);

// ---------------------------------------------------------------------------------------------
// Atomic small-file writes

// Replaces `name` in `dirfd` with `data` so that a reader (or a crash) sees the old content or
// the new, never a mix: writes `<name>.tmp` (mode 0600), fsyncs it if `durable`, renames it over
// `name`, then fsyncs the directory if `durable` (without that the rename itself may be lost).
// Returns 0 or the errno of the step that failed; `<name>.tmp` is removed on failure, and `name`
// is left as it was unless the rename happened (then only the directory's fsync failed).
int write_file_atomically(int dirfd, const char* name, std::string_view data, bool durable);
// The same with the content given in pieces, written one after the other (no copy into one
// buffer: a saved hash tree is a header, a large array and a trailer).
int write_file_atomically(int dirfd, const char* name, std::span<const std::string_view> pieces, bool durable);

// ---------------------------------------------------------------------------------------------
// Opening paths from peers

// openat(2) of a relative `path` that cannot leave `dirfd`: resolved with openat2(2) as
// RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS in one call. A symlink
// anywhere in the path fails (ELOOP), as does an absolute path or ".." leaving `dirfd` (EXDEV).
// Where the kernel lacks openat2 (ENOSYS) it falls back to open_beneath_by_components.
// Returns the descriptor, or -1 with errno set.
int open_beneath(int dirfd, const char* path, int flags, mode_t mode = 0);

// The fallback of open_beneath: one openat per component with O_NOFOLLOW, refusing absolute
// paths and every ".." component (EXDEV; stricter than openat2, which allows a ".." that stays
// beneath); empty and "." components are skipped as the kernel does. A symlink component fails
// with ELOOP, or ENOTDIR where a directory was needed. Holds one descriptor at a time.
int open_beneath_by_components(int dirfd, const char* path, int flags, mode_t mode = 0);

// ---------------------------------------------------------------------------------------------
// The mount table

// One line of /proc/self/mountinfo (paths unescaped).
struct MountEntry {
  std::string mountpoint, fstype, source;
  std::string devno;  // "major:minor" of the mounted file system (its bdi's name for FUSE)
};
// This process's mount table, in the kernel's order (a later entry on the same path is on top).
std::vector<MountEntry> read_mountinfo();
// The entry mounted on top at `mountpoint` (canonical), if any.
std::optional<MountEntry> find_mount(const std::string& mountpoint);

// ---------------------------------------------------------------------------------------------
// Private files (a secret, a TLS key)

// ssh's rule for keys: a regular file that no one but its owner (root or the daemon's user) may
// read or write. Throws Error with one line naming the file and what to do ("chmod 600 FILE").
void check_private_file(const std::string& path, const char* what);
// The file's contents after check_private_file, at most max_bytes. Throws Error.
std::string read_private_file(const std::string& path, const char* what, size_t max_bytes);

}  // namespace blockrepl
