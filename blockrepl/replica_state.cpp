#include "blockrepl/replica_state.h"

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <fcntl.h>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/log.h"

namespace blockrepl {

namespace {
constexpr size_t kRecordSize = 96;  // fixed size, rewritten in place (within one sector)
}

ReplicaState::ReplicaState(int meta_fd, const std::string& where) : where_(where + "/replica") {
  fd_ = openat(meta_fd, "replica", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd_ < 0) throw_errno("cannot open " + where_, errno);
  char buf[kRecordSize + 1] = {0};
  ssize_t n = pread(fd_, buf, kRecordSize, 0);
  if (n > 0) {
    unsigned long long d = 0, a = 0;
    int c = 0;
    if (sscanf(buf, "durable=%llu applied=%llu complete=%d", &d, &a, &c) == 3) {
      durable_ = d;
      applied_ = a < d ? d : a;
      complete_ = c != 0;
      existed_ = true;
    } else {
      LOG_WARN("%s is damaged; treating this replica as never attached", where_.c_str());
    }
  }
}

ReplicaState::~ReplicaState() {
  if (fd_ >= 0) close(fd_);
}

void ReplicaState::write(bool sync) {
  char buf[kRecordSize];
  int n = snprintf(buf, sizeof buf, "durable=%020" PRIu64 " applied=%020" PRIu64 " complete=%d\n", durable_, applied_,
                   complete_ ? 1 : 0);
  for (int i = n; i < static_cast<int>(kRecordSize); i++) buf[i] = ' ';
  buf[kRecordSize - 1] = '\n';
  if (pwrite(fd_, buf, kRecordSize, 0) != static_cast<ssize_t>(kRecordSize)) throw_errno("cannot write " + where_, errno);
  if (sync && fdatasync(fd_) != 0) throw_errno("cannot sync " + where_, errno);
}

void ReplicaState::set_applied(Lsn lsn) {
  applied_ = lsn;
  write(false);
}

void ReplicaState::set_durable(Lsn lsn, bool sync) {
  durable_ = lsn;
  if (applied_ < lsn) applied_ = lsn;
  write(sync);
}

void ReplicaState::set_attach_complete(bool complete, Lsn lsn) {
  complete_ = complete;
  durable_ = applied_ = lsn;
  write(true);
}

}  // namespace blockrepl
