#include "blockrepl/control.h"

#include <cerrno>
#include <cstring>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/log.h"

namespace blockrepl {

namespace {
socklen_t abstract_address(const std::string& name, sockaddr_un* addr) {
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  size_t n = std::min(name.size(), sizeof(addr->sun_path) - 1);
  memcpy(addr->sun_path + 1, name.data(), n);  // leading NUL: abstract namespace
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
}

std::string read_until_close(int fd, int timeout_ms) {
  std::string out;
  char buf[4096];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    int r = poll(&p, 1, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) throw Error("the daemon did not answer in time", ETIMEDOUT);
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("control socket", errno);
    }
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > (16u << 20)) throw Error("control response too large", EPROTO);
  }
}

void write_all(int fd, const std::string& s) {
  size_t done = 0;
  while (done < s.size()) {
    ssize_t w = write(fd, s.data() + done, s.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;
    }
    done += static_cast<size_t>(w);
  }
}
}  // namespace

std::string control_socket_name(const std::string& node_id) { return "blockrepl/" + node_id; }

ControlServer::ControlServer(const std::string& name, Handler handler) : handler_(std::move(handler)) {
  fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) throw_errno("cannot create the control socket", errno);
  sockaddr_un addr;
  socklen_t len = abstract_address(name, &addr);
  if (bind(fd_, reinterpret_cast<sockaddr*>(&addr), len) != 0 || listen(fd_, 8) != 0) {
    int e = errno;
    close(fd_);
    if (e == EADDRINUSE) throw Error("another daemon already serves this volume (control socket " + name + " in use)", e);
    throw_errno("cannot bind the control socket", e);
  }
  thread_ = std::thread([this] { loop(); });
}

ControlServer::~ControlServer() {
  stopping_ = true;
  shutdown(fd_, SHUT_RDWR);
  if (thread_.joinable()) thread_.join();
  close(fd_);
}

void ControlServer::loop() {
  while (!stopping_) {
    int c = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EINTR) continue;
      return;
    }
    // Only root (or the daemon's own user) may talk to the daemon.
    ucred cred{};
    socklen_t cl = sizeof cred;
    if (getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0 || (cred.uid != 0 && cred.uid != getuid())) {
      close(c);
      continue;
    }
    std::string req;
    char buf[1024];
    for (;;) {
      pollfd p{c, POLLIN, 0};
      if (poll(&p, 1, 5000) <= 0) break;
      ssize_t n = read(c, buf, sizeof buf);
      if (n <= 0) break;
      req.append(buf, static_cast<size_t>(n));
      if (req.find('\n') != std::string::npos || req.size() > 65536) break;
    }
    if (auto nl = req.find('\n'); nl != std::string::npos) req.resize(nl);
    std::string resp;
    try {
      resp = handler_(req);
    } catch (const std::exception& e) {
      resp = std::string("{\"error\":\"") + e.what() + "\"}";
    }
    write_all(c, resp);
    close(c);
  }
}

std::string control_request(const std::string& name, const std::string& request, int timeout_ms) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw_errno("cannot create a socket", errno);
  sockaddr_un addr;
  socklen_t len = abstract_address(name, &addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
    int e = errno;
    close(fd);
    throw Error("cannot reach the daemon (" + std::string(strerror(e)) + ")", e);
  }
  write_all(fd, request + "\n");
  try {
    std::string out = read_until_close(fd, timeout_ms);
    close(fd);
    return out;
  } catch (...) {
    close(fd);
    throw;
  }
}

}  // namespace blockrepl
