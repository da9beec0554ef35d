// What a process holds open, read from /proc: shared by the unit and the integration tests.
#pragma once
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/types.h>
#include <unistd.h>

#include <string>
#include <vector>

namespace blockrepl::testing {

// Descriptors process `pid` holds of deleted files below dir ("(deleted)" links in
// /proc/PID/fd); a file so held keeps its space. One entry says so if the list cannot be read.
inline std::vector<std::string> deleted_files_held(pid_t pid, const std::string& dir) {
  std::vector<std::string> out;
  const std::string fds = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = opendir(fds.c_str());
  if (!d) return {"cannot list " + fds};
  while (dirent* de = readdir(d)) {
    char target[PATH_MAX];
    ssize_t n = readlinkat(dirfd(d), de->d_name, target, sizeof target - 1);
    if (n <= 0) continue;
    std::string t(target, static_cast<size_t>(n));
    if (t.rfind(dir + "/", 0) == 0 && t.find(" (deleted)") != std::string::npos) out.push_back(t);
  }
  closedir(d);
  return out;
}

// How many descriptors process `pid` holds (-1 if /proc/PID/fd cannot be listed).
inline int open_descriptors(pid_t pid) {
  const std::string fds = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = opendir(fds.c_str());
  if (!d) return -1;
  int n = 0;
  while (dirent* de = readdir(d))
    if (de->d_name[0] != '.') n++;
  closedir(d);
  return n - 1;  // the listing's own descriptor
}

}  // namespace blockrepl::testing
