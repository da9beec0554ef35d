// The byte stream under a Connection (wire.h): a TCP socket as it is, or TLS 1.3 over it
// (tls.h). Frames, the handshake and the authentication read and write through this interface,
// so that none of them knows whether the bytes are encrypted.
#pragma once
#include <sys/types.h>
#include <sys/uio.h>

#include <chrono>
#include <string>

#include "blockrepl/fsutil.h"

namespace blockrepl {

class Transport {
 public:
  explicit Transport(OwnedFd fd) : fd_(std::move(fd)) {}
  virtual ~Transport() = default;
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  int fd() const { return fd_.get(); }

  // One read of at most n bytes: the count (> 0), 0 at an orderly close, or -1 with errno
  // EAGAIN when nothing can be read without waiting. Throws Error naming `peer` for a broken
  // connection or a TLS failure.
  virtual ssize_t read_some(void* buf, size_t n, const std::string& peer) = 0;
  // Bytes a read returns now without waiting for the network (a hint to size buffers).
  virtual size_t readable_bytes() = 0;
  // Whether a read has bytes although the socket may not be readable (TLS keeps decrypted
  // bytes): the caller must not wait for the socket first.
  virtual bool buffered() { return false; }
  // Whether reads never block (the caller polls the socket before reading).
  virtual bool nonblocking() const = 0;
  // Writes all of iov[0..n) (the array is consumed). A peer that reads nothing for the send
  // timeout fails with ETIMEDOUT. Throws Error naming `peer`.
  virtual void write_all(iovec* iov, size_t n, const std::string& peer) = 0;
  // From the handshake (non-blocking, a short send timeout) to a session (reads block; a peer
  // that stops reading is given send_timeout).
  virtual void start_session(std::chrono::milliseconds send_timeout) = 0;
  virtual bool encrypted() const { return false; }
  // Wakes a blocked read or write in another thread; the transport is unusable afterwards.
  void shutdown();

 protected:
  OwnedFd fd_;
};

// A TCP socket as it is.
class PlainTransport final : public Transport {
 public:
  using Transport::Transport;
  ssize_t read_some(void* buf, size_t n, const std::string& peer) override;
  size_t readable_bytes() override;
  bool nonblocking() const override;
  void write_all(iovec* iov, size_t n, const std::string& peer) override;
  void start_session(std::chrono::milliseconds send_timeout) override;
};

// Moves iov forward past `done` bytes written; returns the index of the first unfinished entry.
size_t consume_iov(iovec* iov, size_t n, size_t first, size_t done);

}  // namespace blockrepl
