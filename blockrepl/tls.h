// TLS 1.3 on the replication stream (--tls-cert/--tls-key/--tls-ca), through OpenSSL. Each node
// has one certificate and key, presented both when it serves slaves and when it follows a master,
// and one CA that its peers' certificates must chain to: both ends verify each other, and the
// downstream node also checks that the upstream's certificate names the host it connected to.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "blockrepl/transport.h"

using SSL_CTX = struct ssl_ctx_st;
using SSL = struct ssl_st;

namespace blockrepl {

struct TlsFiles {
  std::string cert, key, ca;
  bool any() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

class TlsContext {
 public:
  // Loads and checks the three files (the key must be private to its owner, and match the
  // certificate). Throws Error with one line naming the file and OpenSSL's reason.
  static std::shared_ptr<TlsContext> load(const TlsFiles& files);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;
  SSL_CTX* get() const { return ctx_; }

 private:
  explicit TlsContext(SSL_CTX* ctx) : ctx_(ctx) {}
  SSL_CTX* ctx_;
};

// TLS over a TCP socket, which it keeps non-blocking: reads and writes of two threads (a
// session's sender and its ack reader) take turns on the one OpenSSL object under a mutex that
// is never held while waiting for the socket.
class TlsTransport final : public Transport {
 public:
  enum class Side { client, server };
  // `host` (client side): the name or address connected to, checked against the certificate.
  TlsTransport(OwnedFd fd, const TlsContext& ctx, Side side, const std::string& host = "");
  ~TlsTransport() override;

  enum class Step { done, want_read, want_write };
  // One step of the handshake; throws Error "TLS handshake with PEER failed: why".
  Step handshake_step(const std::string& peer);
  // The whole handshake (client side), within timeout_ms.
  void handshake(int timeout_ms, const std::string& peer);
  // 32 bytes both ends derive from this session's keys and nobody else can (the TLS exporter,
  // RFC 8446 7.5): the authentication proofs include them, so a proof made for one TLS session
  // (through a relay that terminates TLS on each side) is worthless on another.
  std::array<uint8_t, 32> channel_binding();

  ssize_t read_some(void* buf, size_t n, const std::string& peer) override;
  size_t readable_bytes() override;
  bool buffered() override;
  bool nonblocking() const override { return true; }
  void write_all(iovec* iov, size_t n, const std::string& peer) override;
  void start_session(std::chrono::milliseconds send_timeout) override;
  bool encrypted() const override { return true; }

 private:
  // Waits for the socket (events: POLLIN/POLLOUT) up to the send timeout; false if it ran out.
  bool wait_socket(short events, int timeout_ms);
  // Writes buf fully; throws on a failure or a peer that stops reading.
  void write_buffer(const char* buf, size_t n, const std::string& peer);

  std::mutex mu_;  // guards ssl_: held for each OpenSSL call, never while waiting
  SSL* ssl_ = nullptr;
  int send_timeout_ms_ = 2000;  // during the handshake: its messages are small
};

// OpenSSL's queued errors as one line (and clears them); `fallback` when there are none.
std::string openssl_errors(const std::string& fallback = "unknown error");

}  // namespace blockrepl
