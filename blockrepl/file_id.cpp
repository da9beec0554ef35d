#include "blockrepl/file_id.h"

#include <algorithm>
#include <sys/xattr.h>

#include <cerrno>
#include <cstring>
#include <endian.h>
#include <random>
#include <sys/xattr.h>

namespace blockrepl {

std::string fd_path(int fd, const char* name) {
  std::string p = "/proc/self/fd/" + std::to_string(fd);
  if (name && *name) {
    p += '/';
    p += name;
  }
  return p;
}

std::optional<FileId> read_file_id(int dirfd, const char* name) {
  uint64_t le = 0;
  std::string p = fd_path(dirfd, name);
  // For name == "" the path is the /proc magic link itself, which getxattr must follow;
  // with a name, lgetxattr keeps a symlink from being followed.
  ssize_t n = (name && *name) ? lgetxattr(p.c_str(), kFileIdXattr, &le, sizeof le)
                              : getxattr(p.c_str(), kFileIdXattr, &le, sizeof le);
  if (n != sizeof le) return std::nullopt;
  FileId fid = le64toh(le);
  if (fid == kInvalidFileId) return std::nullopt;
  return fid;
}

int write_file_id(int dirfd, const char* name, FileId fid) {
  uint64_t le = htole64(fid);
  std::string p = fd_path(dirfd, name);
  int rc = (name && *name) ? lsetxattr(p.c_str(), kFileIdXattr, &le, sizeof le, 0)
                           : setxattr(p.c_str(), kFileIdXattr, &le, sizeof le, 0);
  return rc == 0 ? 0 : errno;
}

FileId assign_file_id(int dirfd, const char* name, int* err) {
  if (auto have = read_file_id(dirfd, name)) return *have;
  const FileId fid = new_file_id();
  const uint64_t le = htole64(fid);
  const std::string p = fd_path(dirfd, name);
  const int rc = (name && *name) ? lsetxattr(p.c_str(), kFileIdXattr, &le, sizeof le, XATTR_CREATE)
                                 : setxattr(p.c_str(), kFileIdXattr, &le, sizeof le, XATTR_CREATE);
  if (rc == 0) return fid;
  if (errno == EEXIST) {  // someone else gave it one first: theirs it is
    if (auto theirs = read_file_id(dirfd, name)) return *theirs;
  }
  *err = errno;
  return kInvalidFileId;
}

FileId new_file_id() {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  for (;;) {
    FileId fid = gen();
    if (fid != kInvalidFileId && fid != kRootFileId) return fid;
  }
}

std::vector<std::pair<std::string, std::string>> list_xattrs(const std::string& p) {
  std::vector<std::pair<std::string, std::string>> out;
  ssize_t n = llistxattr(p.c_str(), nullptr, 0);
  if (n <= 0) return out;
  std::vector<char> names(static_cast<size_t>(n));
  n = llistxattr(p.c_str(), names.data(), names.size());
  for (ssize_t i = 0; i < n;) {
    std::string name(names.data() + i);
    i += static_cast<ssize_t>(name.size()) + 1;
    if (name.rfind(kReservedXattrPrefix, 0) == 0) continue;
    ssize_t vn = lgetxattr(p.c_str(), name.c_str(), nullptr, 0);
    if (vn < 0) continue;
    std::string v(static_cast<size_t>(vn), '\0');
    vn = lgetxattr(p.c_str(), name.c_str(), v.data(), v.size());
    if (vn < 0) continue;
    v.resize(static_cast<size_t>(vn));
    out.emplace_back(name, v);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace blockrepl
