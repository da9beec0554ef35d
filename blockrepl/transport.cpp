#include "blockrepl/transport.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>

#include "blockrepl/error.h"

namespace blockrepl {

void Transport::shutdown() { ::shutdown(fd_.get(), SHUT_RDWR); }

size_t consume_iov(iovec* iov, size_t n, size_t first, size_t done) {
  while (done > 0 && first < n) {
    const size_t take = std::min(done, iov[first].iov_len);
    iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + take;
    iov[first].iov_len -= take;
    done -= take;
    if (iov[first].iov_len == 0) first++;
  }
  while (first < n && iov[first].iov_len == 0) first++;
  return first;
}

ssize_t PlainTransport::read_some(void* buf, size_t n, const std::string& peer) {
  for (;;) {
    const ssize_t r = ::read(fd_.get(), buf, n);
    if (r >= 0) return r;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return -1;
    throw_errno("receive from " + peer, errno);
  }
}

size_t PlainTransport::readable_bytes() {
  int waiting = 0;
  if (ioctl(fd_.get(), FIONREAD, &waiting) != 0 || waiting < 0) return 0;
  return static_cast<size_t>(waiting);
}

bool PlainTransport::nonblocking() const { return (fcntl(fd_.get(), F_GETFL) & O_NONBLOCK) != 0; }

void PlainTransport::write_all(iovec* iov, size_t n, const std::string& peer) {
  size_t first = 0;
  while (first < n) {
    const ssize_t w = writev(fd_.get(), iov + first, static_cast<int>(std::min<size_t>(n - first, IOV_MAX)));
    if (w < 0) {
      if (errno == EINTR) continue;
      // A blocking socket's SO_SNDTIMEO ran out, or a handshake's socket is full.
      if (errno == EAGAIN || errno == EWOULDBLOCK) throw Error("send to " + peer + " timed out (peer not reading)", ETIMEDOUT);
      throw_errno("send to " + peer, errno);
    }
    first = consume_iov(iov, n, first, static_cast<size_t>(w));
  }
}

void PlainTransport::start_session(std::chrono::milliseconds send_timeout) {
  const int fd = fd_.get();
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  if (send_timeout.count() > 0) {
    timeval tv{static_cast<time_t>(send_timeout.count() / 1000), static_cast<suseconds_t>((send_timeout.count() % 1000) * 1000)};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  }
}

}  // namespace blockrepl
