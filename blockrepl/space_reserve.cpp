#include "blockrepl/space_reserve.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>

#include "blockrepl/log.h"

namespace blockrepl {

namespace {
constexpr char kReserveName[] = "reserve";
}

SpaceReserve::SpaceReserve(int meta_fd, std::string where) : meta_fd_(meta_fd), where_(std::move(where)) {}

uint64_t SpaceReserve::size_for(uint64_t fs_bytes) {
  return std::clamp<uint64_t>(fs_bytes / 100, uint64_t{1} << 20, uint64_t{64} << 20);
}

void SpaceReserve::hold() {
  struct statvfs vfs;
  if (fstatvfs(meta_fd_, &vfs) != 0) return;
  const uint64_t want = size_for(static_cast<uint64_t>(vfs.f_blocks) * vfs.f_frsize);
  struct stat st;
  if (fstatat(meta_fd_, kReserveName, &st, 0) == 0 && static_cast<uint64_t>(st.st_blocks) * 512 >= want) return;
  int fd = openat(meta_fd_, kReserveName, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return;
  // Allocated blocks, not a hole: the point is that nobody else can take them.
  if (fallocate(fd, 0, 0, static_cast<off_t>(want)) != 0) {
    LOG_DEBUG("%s: cannot hold %llu bytes in reserve: %s", where_.c_str(), static_cast<unsigned long long>(want),
              strerror(errno));
    close(fd);
    unlinkat(meta_fd_, kReserveName, 0);
    return;
  }
  close(fd);
}

bool SpaceReserve::release() {
  if (unlinkat(meta_fd_, kReserveName, 0) != 0) return false;
  LOG_INFO("%s: gave up the space held in reserve for the re-attach", where_.c_str());
  return true;
}

}  // namespace blockrepl
