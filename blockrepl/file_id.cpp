#include "blockrepl/file_id.h"

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

FileId new_file_id() {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  for (;;) {
    FileId fid = gen();
    if (fid != kInvalidFileId && fid != kRootFileId) return fid;
  }
}

}  // namespace blockrepl
