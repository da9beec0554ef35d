#include "tools/cli/mount_checks.h"

#include "blockrepl/error.h"
#include "blockrepl/metadata.h"

#include <cerrno>
#include <cstdio>
#include <utility>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace blockrepl::cli {

namespace {

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string unescape(const std::string& s) {
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

struct MountEntry {
  std::string mountpoint, fstype, source, devno;
};

std::optional<MountEntry> find_mount(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  std::optional<MountEntry> found;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string id, parent, devno, root, mnt;
    ls >> id >> parent >> devno >> root >> mnt;
    if (unescape(mnt) != path) continue;
    std::string tok;
    while (ls >> tok && tok != "-") {}
    MountEntry e;
    e.mountpoint = path;
    e.devno = devno;
    ls >> e.fstype >> e.source;
    e.source = unescape(e.source);
    found = e;  // the last entry is the one on top
  }
  return found;
}

bool is_under(const std::string& inner, const std::string& outer) {
  if (outer == "/") return true;
  return inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 && inner[outer.size()] == '/';
}

std::optional<std::string> check_dir(const std::string& path, const char* what, std::string* abs) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    int e = errno;
    if (e == ENOENT) return std::string(what) + " " + path + " does not exist";
    if (e == ENOTCONN)
      return std::string(what) + " " + path + " is a dead FUSE mount (its daemon died): run fusermount3 -u " + path;
    return std::string(what) + " " + path + ": " + strerror(e);
  }
  if (!S_ISDIR(st.st_mode)) return std::string(what) + " " + path + " is not a directory";
  char buf[PATH_MAX];
  if (!realpath(path.c_str(), buf)) return std::string(what) + " " + path + ": " + strerror(errno);
  *abs = buf;
  return std::nullopt;
}

}  // namespace

bool is_mount_point(const std::string& path) { return find_mount(path).has_value(); }

void lift_fuse_writeback_limit(const std::string& mountpoint_abs) {
  auto m = find_mount(mountpoint_abs);
  if (!m || m->devno.empty()) return;
  // The kernel gives every FUSE mount a strict 1% share of the dirty-page budget, which throttles
  // sequential writers long before the disk is busy. This daemon is trusted (root) and flushes
  // promptly, so let the mount's writeback behave like the backing file system's.
  const std::string bdi = "/sys/class/bdi/" + m->devno + "/";
  for (auto [file, value] : {std::pair{"strict_limit", "0"}, std::pair{"max_ratio", "100"}}) {
    if (FILE* f = fopen((bdi + file).c_str(), "w")) {
      fputs(value, f);
      fclose(f);
    }
  }
}

std::optional<std::string> blockrepl_data_dir_of(const std::string& mountpoint_abs) {
  auto m = find_mount(mountpoint_abs);
  if (!m || m->fstype != "fuse.blockrepl") return std::nullopt;
  const std::string prefix = "blockrepl:";
  if (m->source.rfind(prefix, 0) != 0) return std::nullopt;
  return m->source.substr(prefix.size());
}

std::optional<std::string> check_mount_paths(const std::string& data, const std::string& mountpoint,
                                             std::string* data_abs, std::string* mountpoint_abs) {
  if (auto err = check_dir(data, "data directory", data_abs)) return err;
  if (auto err = check_dir(mountpoint, "mount point", mountpoint_abs)) return err;
  if (*data_abs == *mountpoint_abs)
    return "data directory and mount point are the same directory (" + *data_abs + "): they must differ";
  if (is_under(*data_abs, *mountpoint_abs))
    return "data directory " + *data_abs + " is inside mount point " + *mountpoint_abs + ": it would be hidden by the mount";
  if (is_under(*mountpoint_abs, *data_abs))
    return "mount point " + *mountpoint_abs + " is inside data directory " + *data_abs + ": the mount would contain itself";
  if (auto m = find_mount(*mountpoint_abs)) {
    return "mount point " + *mountpoint_abs + " is busy: " + m->fstype + " (" + m->source +
           ") is already mounted there";
  }
  if (access(data_abs->c_str(), R_OK | W_OK | X_OK) != 0)
    return "data directory " + *data_abs + " is not writable: " + strerror(errno);
  return std::nullopt;
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
