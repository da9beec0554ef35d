#include "tools/cli/mount_checks.h"

#include "blockrepl/copy.h"
#include "blockrepl/error.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/metadata.h"

#include <cerrno>
#include <cstdio>
#include <utility>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

namespace blockrepl::cli {

namespace {

constexpr const char kBlockreplFsType[] = "fuse.blockrepl";
constexpr const char kBlockreplSourcePrefix[] = "blockrepl:";

// The data directory of a blockrepl mount from its source ("blockrepl:/srv/db").
std::optional<std::string> data_dir_of(const MountEntry& m) {
  if (m.fstype != kBlockreplFsType || m.source.rfind(kBlockreplSourcePrefix, 0) != 0) return std::nullopt;
  return m.source.substr(strlen(kBlockreplSourcePrefix));
}

bool is_under(const std::string& inner, const std::string& outer) {
  if (outer == "/") return inner != "/";
  return inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 && inner[outer.size()] == '/';
}

// Whether a daemon holds the lock of the data directory `data_abs` (lock_data_dir). Looks
// without creating anything, and without asking a FUSE mount, which a stopped daemon would
// never answer.
bool data_dir_locked(const std::string& data_abs) {
  const std::string lock_path = data_abs + "/" + kMetadataDirName + "/lock";
  int fd = open(lock_path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return false;
  const bool locked = flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  close(fd);  // drops our shared lock, if we got it
  return locked;
}

// What stat() of a FUSE mount whose daemon died fails with: ENOTCONN, or ECONNABORTED while the
// kernel is still tearing the connection down.
bool is_dead_fuse_errno(int e) { return e == ENOTCONN || e == ECONNABORTED; }

// The canonical path of a mount point whose FUSE daemon died: realpath() of it fails with
// ENOTCONN, so resolve its parent and append the last component.
std::optional<std::string> resolve_dead_mount_point(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const size_t slash = path.rfind('/');
  const std::string parent = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  if (name.empty() || name == "." || name == "..") return std::nullopt;
  char buf[PATH_MAX];
  if (!realpath(parent.c_str(), buf)) return std::nullopt;
  const std::string dir = buf;
  return (dir == "/" ? "" : dir) + "/" + name;
}

std::optional<std::string> check_dir(const std::string& path, const char* what, std::string* abs) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    int e = errno;
    if (e == ENOENT) return std::string(what) + " " + path + " does not exist";
    if (is_dead_fuse_errno(e))
      return std::string(what) + " " + path + " is a dead FUSE mount (its daemon died): run fusermount3 -u " + path;
    return std::string(what) + " " + path + ": " + strerror(e);
  }
  if (!S_ISDIR(st.st_mode)) return std::string(what) + " " + path + " is not a directory";
  char buf[PATH_MAX];
  if (!realpath(path.c_str(), buf)) return std::string(what) + " " + path + ": " + strerror(errno);
  *abs = buf;
  return std::nullopt;
}

// The mount point, which may hold the dead mount of a daemon that crashed: that is no error
// when it was a mount of this same data directory (the next mount replaces it, so that
// remounting after a crash is the same command), and one otherwise.
std::optional<std::string> check_mount_point(const std::string& path, const std::string& data_abs, MountPaths* out) {
  struct stat st;
  if (stat(path.c_str(), &st) == 0 || !is_dead_fuse_errno(errno)) return check_dir(path, "mount point", &out->mountpoint_abs);
  auto abs = resolve_dead_mount_point(path);
  auto m = abs ? find_mount(*abs) : std::nullopt;
  if (!m) return "mount point " + path + " is a dead FUSE mount (its daemon died): run fusermount3 -u " + path;
  if (data_dir_of(*m) != data_abs)
    return "mount point " + *abs + " holds a dead mount of " + m->source + " (" + m->fstype +
           ", its daemon died), not of " + data_abs + ": run fusermount3 -u " + *abs;
  out->mountpoint_abs = *abs;
  out->replace_dead_mount = true;
  return std::nullopt;
}

// How `path` lies relative to `other`: "is", "contains", "lies inside", or nullopt if apart.
std::optional<std::string> relation(const std::string& path, const std::string& other) {
  if (path == other) return "is";
  if (is_under(other, path)) return "contains";
  if (is_under(path, other)) return "lies inside";
  return std::nullopt;
}

// A data directory or mount point that is, contains, or lies inside a directory another
// daemon serves or backs with: both daemons would write to the same files, or one would walk
// (and replicate) the other's mount, or hide it.
std::optional<std::string> check_overlaps(const MountPaths& paths) {
  for (const MountEntry& m : read_mountinfo()) {
    auto other_data = data_dir_of(m);
    if (!other_data) continue;
    if (paths.replace_dead_mount && m.mountpoint == paths.mountpoint_abs) continue;  // the one we replace
    // A dead mount of this very data directory elsewhere uses nothing: its daemon is gone.
    if (*other_data == paths.data_abs && !data_dir_locked(*other_data)) continue;
    const std::string daemon = "the blockrepl daemon mounted at " + m.mountpoint;
    for (const auto& [what, path] : {std::pair{"data directory", paths.data_abs}, {"mount point", paths.mountpoint_abs}}) {
      if (path.empty()) continue;
      for (const auto& [other_what, other_path] : {std::pair{"data directory", *other_data}, {"mount point", m.mountpoint}}) {
        auto rel = relation(path, other_path);
        if (!rel) continue;
        return std::string(what) + " " + path + " is already in use: it " + *rel + " the " + other_what +
               (*rel == "is" ? "" : " " + other_path) + " of " + daemon;
      }
    }
  }
  return std::nullopt;
}

}  // namespace

std::optional<std::string> blockrepl_data_dir_of(const std::string& mountpoint_abs) {
  auto m = find_mount(mountpoint_abs);
  return m ? data_dir_of(*m) : std::nullopt;
}

std::optional<std::string> check_mount_paths(const std::string& data, const std::string& mountpoint, MountPaths* out) {
  *out = MountPaths{};
  if (auto err = check_dir(data, "data directory", &out->data_abs)) return err;
  if (auto err = check_mount_point(mountpoint, out->data_abs, out)) return err;
  const std::string& data_abs = out->data_abs;
  const std::string& mnt_abs = out->mountpoint_abs;
  if (data_abs == mnt_abs)
    return "data directory and mount point are the same directory (" + data_abs + "): they must differ";
  if (is_under(data_abs, mnt_abs))
    return "data directory " + data_abs + " is inside mount point " + mnt_abs + ": it would be hidden by the mount";
  if (is_under(mnt_abs, data_abs))
    return "mount point " + mnt_abs + " is inside data directory " + data_abs + ": the mount would contain itself";
  if (!out->replace_dead_mount)
    if (auto m = find_mount(mnt_abs))
      return "mount point " + mnt_abs + " is busy: " + m->fstype + " (" + m->source + ") is already mounted there";
  if (auto err = check_overlaps(*out)) return err;
  if (access(data_abs.c_str(), R_OK | W_OK | X_OK) != 0)
    return "data directory " + data_abs + " is not writable: " + strerror(errno);
  return std::nullopt;
}

std::optional<std::string> check_data_dir_overlaps(const std::string& data_abs) {
  MountPaths paths;
  paths.data_abs = data_abs;
  return check_overlaps(paths);
}

std::optional<std::string> check_replica_data_dir(const std::string& data_abs, const std::string& who) {
  try {
    auto id = read_identity(data_abs);
    if (id && !id->cluster_id.empty()) return std::nullopt;  // a volume: its master checks the cluster
    int fd = open(data_abs.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) throw_errno("cannot open " + data_abs, errno);
    std::vector<std::string> names;
    try {
      names = data_dir_entries(fd, 4);
    } catch (...) {
      close(fd);
      throw;
    }
    close(fd);
    if (names.empty()) return std::nullopt;
    std::string list;
    for (size_t i = 0; i < names.size() && i < 3; i++) list += (i ? ", " : "") + names[i];
    if (names.size() > 3) list += ", ...";
    return "data directory " + data_abs + " holds files that are not a blockrepl volume (" + list +
           "): empty it, or pass --discard-my-data to let the " + who + " replace them";
  } catch (const std::exception& e) {
    return "data directory " + data_abs + ": " + e.what();
  }
}

namespace {

// Why directory `path` lets users other than root traverse it, or "" if it does not.
std::string why_not_root_only(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return std::string("cannot be examined: ") + strerror(errno);
  char mode[8];
  snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
  if (st.st_uid != 0) return "is owned by uid " + std::to_string(st.st_uid);
  if (st.st_mode & S_IXOTH) return std::string("is ") + mode;
  if ((st.st_mode & S_IXGRP) && st.st_gid != 0) return std::string("is ") + mode + " with group " + std::to_string(st.st_gid);
  // Any access ACL may name a user or group with execute permission: it is not root-only.
  if (lgetxattr(path.c_str(), "system.posix_acl_access", nullptr, 0) >= 0) return "has a POSIX ACL";
  return "";
}

std::string parent_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
}

}  // namespace

std::optional<std::string> check_backing_dir_private(const std::string& data_abs) {
  if (data_abs.empty() || data_abs == "/" || data_abs.front() != '/')
    return "data directory '" + data_abs + "' cannot be a replica's: it has no parent directory to keep it private";
  const std::string parent = parent_of(data_abs);
  std::string first_reason;
  for (std::string dir = parent;; dir = parent_of(dir)) {
    const std::string why = why_not_root_only(dir);
    if (why.empty()) return std::nullopt;
    if (first_reason.empty()) first_reason = dir + " " + why;
    if (dir == "/") break;
  }
  return "data directory " + data_abs + " is reachable by unprivileged users (no parent is root-only: " + first_reason +
         "): a replica holds set-id files and device nodes as its master made them; keep it under a root-only "
         "directory (mkdir -m 0700 " + (parent == "/" ? "" : parent) + "/replicas)";
}

void detach_dead_mount(const std::string& mountpoint_abs) {
  if (umount2(mountpoint_abs.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW) == 0) return;
  const int e = errno;
  if (e != EPERM) throw_errno("cannot remove the dead mount on " + mountpoint_abs, e);
  // Not root: fusermount3 may still remove a FUSE mount its user made.
  pid_t pid = fork();
  if (pid == 0) {
    int null = open("/dev/null", O_WRONLY);
    if (null >= 0) dup2(null, STDERR_FILENO);
    execlp("fusermount3", "fusermount3", "-u", "-z", mountpoint_abs.c_str(), nullptr);
    _exit(127);
  }
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw Error("cannot remove the dead mount on " + mountpoint_abs + ": " + strerror(e) + " (and fusermount3 -u -z failed)");
}

// One daemon per data directory: an exclusive lock held for the daemon's life.
int lock_data_dir(const std::string& data_abs) {
  std::string meta = data_abs + "/" + kMetadataDirName;
  if (mkdir(meta.c_str(), 0700) != 0 && errno != EEXIST) throw_errno("cannot create " + meta, errno);
  std::string lock_path = meta + "/lock";
  int fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) throw_errno("cannot open " + lock_path, errno);
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    close(fd);
    if (e == EWOULDBLOCK) {
      std::string pid;
      if (FILE* f = fopen((meta + "/" + kPidFile).c_str(), "r")) {
        char buf[32] = {0};
        if (fgets(buf, sizeof buf, f)) pid = buf;
        fclose(f);
        while (!pid.empty() && (pid.back() == '\n')) pid.pop_back();
      }
      throw Error("data directory " + data_abs + " is already in use by another blockrepl daemon" +
                  (pid.empty() ? "" : " (pid " + pid + ")"));
    }
    throw_errno("cannot lock " + lock_path, e);
  }
  return fd;
}

}  // namespace blockrepl::cli
