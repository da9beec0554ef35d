#include "blockrepl/uring_sync.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "blockrepl/log.h"

namespace blockrepl {

namespace {

// Said once per process, at -v: the fallback is correct, only slower with several files.
void note_fallback(const char* what, int err) {
  static std::atomic<bool> said{false};
  if (!said.exchange(true))
    LOG_INFO("io_uring unavailable (%s: %s): a barrier syncs its files one after the other", what, strerror(err));
}

}  // namespace

ConcurrentSync::ConcurrentSync(bool use_uring) {
  if (!use_uring) return;
  if (int rc = io_uring_queue_init(kDepth, &ring_, 0); rc < 0) {
    note_fallback("io_uring_queue_init", -rc);
    return;
  }
  ring_ok_ = true;
}

ConcurrentSync::~ConcurrentSync() {
  if (ring_ok_) io_uring_queue_exit(&ring_);
}

void ConcurrentSync::give_up(const char* what, int err) {
  note_fallback(what, err);
  io_uring_queue_exit(&ring_);
  ring_ok_ = false;
}

int ConcurrentSync::plain(const std::vector<int>& fds, size_t from, size_t to, size_t* failed) {
  int first = 0;
  for (size_t i = from; i < to; i++) {
    if (fdatasync(fds[i]) == 0 || first) continue;
    first = errno;
    if (failed) *failed = i;
  }
  return first;
}

int ConcurrentSync::round(const std::vector<int>& fds, size_t from, size_t to, int* err, size_t* failed) {
  const unsigned n = static_cast<unsigned>(to - from);
  for (size_t i = from; i < to; i++) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) {  // cannot happen with n <= kDepth and every completion reaped below
      return EBUSY;  // the ring is given up: nothing queued is left behind
    }
    io_uring_prep_fsync(sqe, fds[i], IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(sqe, i);
  }
  int rc;
  do rc = io_uring_submit_and_wait(&ring_, n);
  while (rc == -EINTR);
  if (rc < 0) return -rc;
  // Each completion is reaped, whatever it says, so that none is left for the next round.
  std::vector<int> res(n, 0);
  for (unsigned got = 0; got < static_cast<unsigned>(rc) && got < n;) {
    io_uring_cqe* cqe;
    int w = io_uring_wait_cqe(&ring_, &cqe);
    if (w == -EINTR) continue;
    if (w < 0) return -w;
    const size_t i = io_uring_cqe_get_data64(cqe);
    if (i >= from && i < to) res[i - from] = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    got++;
  }
  // Fewer submitted than asked (rc < n): the rest were not sent; sync them here.
  for (size_t i = from + static_cast<size_t>(rc); i < to; i++) res[i - from] = fdatasync(fds[i]) == 0 ? 0 : -errno;
  for (size_t i = from; i < to; i++) {
    int r = res[i - from];
    // A worker interrupted before it synced: do it here rather than report a spurious error.
    if (r == -EINTR || r == -EAGAIN) r = fdatasync(fds[i]) == 0 ? 0 : -errno;
    if (r < 0 && !*err) {
      *err = -r;
      if (failed) *failed = i;
    }
  }
  return 0;
}

int ConcurrentSync::fdatasync_all(const std::vector<int>& fds, size_t* failed) {
  // One file gains nothing from the ring (io_uring_enter plus a worker's wake-up instead of
  // one system call).
  if (!ring_ok_ || fds.size() < 2) return plain(fds, 0, fds.size(), failed);
  int err = 0;
  for (size_t from = 0; from < fds.size(); from += kDepth) {
    const size_t to = std::min(fds.size(), from + kDepth);
    if (ring_ok_) {
      const int ring_err = round(fds, from, to, &err, failed);
      if (!ring_err) continue;
      give_up("io_uring_submit_and_wait", ring_err);  // this round again, plainly
    }
    size_t f = 0;
    if (int e = plain(fds, from, to, &f); e && !err) {
      err = e;
      if (failed) *failed = f;
    }
  }
  return err;
}

}  // namespace blockrepl
