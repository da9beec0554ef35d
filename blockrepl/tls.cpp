#include "blockrepl/tls.h"

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <fcntl.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "blockrepl/error.h"
#include "blockrepl/fsutil.h"

namespace blockrepl {

std::string openssl_errors(const std::string& fallback) {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    const char* reason = ERR_reason_error_string(e);
    std::string r = reason ? reason : "error " + std::to_string(e);
    if (out.find(r) != std::string::npos) continue;
    out += (out.empty() ? "" : "; ") + r;
  }
  return out.empty() ? fallback : out;
}

namespace {

[[noreturn]] void throw_load_error(const std::string& what, const std::string& path) {
  throw Error("TLS: cannot use " + what + " " + path + ": " + openssl_errors(), EINVAL);
}

bool is_ip_address(const std::string& host) {
  unsigned char buf[sizeof(in6_addr)];
  return inet_pton(AF_INET, host.c_str(), buf) == 1 || inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

}  // namespace

std::shared_ptr<TlsContext> TlsContext::load(const TlsFiles& f) {
  if (f.cert.empty() || f.key.empty() || f.ca.empty())
    throw Error("TLS needs all three of --tls-cert, --tls-key and --tls-ca", EINVAL);
  check_private_file(f.key, "TLS key");
  ERR_clear_error();
  SSL_CTX* ctx = SSL_CTX_new(TLS_method());
  if (!ctx) throw Error("TLS: cannot create a context: " + openssl_errors(), ENOMEM);
  std::shared_ptr<TlsContext> out(new TlsContext(ctx));
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  // No session tickets: a server would send them after the handshake, from whichever thread
  // writes next; and sessions are long-lived, so resumption saves nothing.
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  if (SSL_CTX_use_certificate_chain_file(ctx, f.cert.c_str()) != 1) throw_load_error("certificate", f.cert);
  if (SSL_CTX_use_PrivateKey_file(ctx, f.key.c_str(), SSL_FILETYPE_PEM) != 1) throw_load_error("key", f.key);
  if (SSL_CTX_check_private_key(ctx) != 1)
    throw Error("TLS: key " + f.key + " does not belong to certificate " + f.cert, EINVAL);
  if (SSL_CTX_load_verify_locations(ctx, f.ca.c_str(), nullptr) != 1) throw_load_error("CA", f.ca);
  return out;
}

TlsContext::~TlsContext() { SSL_CTX_free(ctx_); }

TlsTransport::TlsTransport(OwnedFd fd, const TlsContext& ctx, Side side, const std::string& host) : Transport(std::move(fd)) {
  const int s = fd_.get();
  fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
  ssl_ = SSL_new(ctx.get());
  if (!ssl_ || SSL_set_fd(ssl_, s) != 1) throw Error("TLS: cannot set up a session: " + openssl_errors(), ENOMEM);
  if (side == Side::server) {
    SSL_set_accept_state(ssl_);
    // Mutual: a peer without a certificate of our CA is refused.
    SSL_set_verify(ssl_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  } else {
    SSL_set_connect_state(ssl_);
    SSL_set_verify(ssl_, SSL_VERIFY_PEER, nullptr);
    if (is_ip_address(host)) {
      X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl_), host.c_str());
    } else {
      SSL_set_tlsext_host_name(ssl_, host.c_str());
      SSL_set1_host(ssl_, host.c_str());
    }
  }
}

TlsTransport::~TlsTransport() { SSL_free(ssl_); }

TlsTransport::Step TlsTransport::handshake_step(const std::string& peer) {
  std::lock_guard lk(mu_);
  ERR_clear_error();
  const int r = SSL_do_handshake(ssl_);
  if (r == 1) return Step::done;
  const int e = SSL_get_error(ssl_, r);
  if (e == SSL_ERROR_WANT_READ) return Step::want_read;
  if (e == SSL_ERROR_WANT_WRITE) return Step::want_write;
  std::string why;
  const long verify = SSL_get_verify_result(ssl_);
  if (verify != X509_V_OK) why = std::string("certificate verify failed (") + X509_verify_cert_error_string(verify) + ")";
  const std::string queued = openssl_errors("");
  if (why.empty()) why = queued;
  if (e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN) {
    // Closed or reset: perhaps the network, perhaps a peer that refused us without a word.
    throw Error("TLS handshake with " + peer + " failed: " + (why.empty() ? "the peer closed the connection (does it use TLS?)" : why),
                ECONNRESET);
  }
  // A certificate that does not verify, a peer that does not speak TLS, a refusal by alert: the
  // configuration is wrong, and trying again changes nothing.
  throw FatalAttachError("TLS handshake with " + peer + " failed: " + (why.empty() ? "unknown error" : why), EPROTO);
}

void TlsTransport::handshake(int timeout_ms, const std::string& peer) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const Step s = handshake_step(peer);
    if (s == Step::done) return;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    if (left <= 0 || !wait_socket(s == Step::want_read ? POLLIN : POLLOUT, static_cast<int>(left)))
      throw Error("TLS handshake with " + peer + " timed out", ETIMEDOUT);
  }
}

std::array<uint8_t, 32> TlsTransport::channel_binding() {
  static const char kLabel[] = "EXPORTER-blockrepl-auth";
  std::array<uint8_t, 32> out{};
  std::lock_guard lk(mu_);
  if (SSL_export_keying_material(ssl_, out.data(), out.size(), kLabel, sizeof kLabel - 1, nullptr, 0, 0) != 1)
    throw Error("TLS: cannot derive the channel binding: " + openssl_errors(), EPROTO);
  return out;
}

bool TlsTransport::wait_socket(short events, int timeout_ms) {
  for (;;) {
    pollfd pfd{fd_.get(), events, 0};
    const int r = poll(&pfd, 1, timeout_ms);
    if (r < 0 && errno == EINTR) continue;
    return r != 0;  // an error or a hang-up shows in the next OpenSSL call
  }
}

ssize_t TlsTransport::read_some(void* buf, size_t n, const std::string& peer) {
  for (;;) {
    int e;
    {
      std::lock_guard lk(mu_);
      ERR_clear_error();
      size_t got = 0;
      const int r = SSL_read_ex(ssl_, buf, n, &got);
      if (r == 1) return static_cast<ssize_t>(got);
      e = SSL_get_error(ssl_, r);
    }
    switch (e) {
      case SSL_ERROR_WANT_READ: errno = EAGAIN; return -1;
      case SSL_ERROR_ZERO_RETURN: return 0;
      case SSL_ERROR_WANT_WRITE:
        // TLS 1.3 may answer a key update while reading: let the socket drain, then read on.
        if (!wait_socket(POLLOUT, send_timeout_ms_)) throw Error("send to " + peer + " timed out (peer not reading)", ETIMEDOUT);
        continue;
      case SSL_ERROR_SYSCALL:
        if (errno == 0) return 0;  // the peer closed without close_notify (SSL_OP_IGNORE_UNEXPECTED_EOF)
        throw_errno("receive from " + peer, errno);
      default: {
        // In TLS 1.3 a server checks the client's certificate after the client has finished its
        // handshake: its refusal arrives as an alert on the first read.
        const unsigned long first = ERR_peek_error();
        const bool alert = ERR_GET_LIB(first) == ERR_LIB_SSL && ERR_GET_REASON(first) >= SSL_AD_REASON_OFFSET;
        const std::string why = openssl_errors();
        if (alert) throw FatalAttachError("TLS: " + peer + " refused this node: " + why, EACCES);
        throw Error("TLS from " + peer + ": " + why, EPROTO);
      }
    }
  }
}

size_t TlsTransport::readable_bytes() {
  int waiting = 0;
  if (ioctl(fd_.get(), FIONREAD, &waiting) != 0 || waiting < 0) waiting = 0;
  std::lock_guard lk(mu_);
  return static_cast<size_t>(SSL_pending(ssl_)) + static_cast<size_t>(waiting);
}

bool TlsTransport::buffered() {
  std::lock_guard lk(mu_);
  return SSL_has_pending(ssl_) == 1;
}

void TlsTransport::start_session(std::chrono::milliseconds send_timeout) {
  send_timeout_ms_ = send_timeout.count() > 0 ? static_cast<int>(send_timeout.count()) : -1;
}

void TlsTransport::write_buffer(const char* buf, size_t n, const std::string& peer) {
  while (n > 0) {
    int e;
    {
      std::lock_guard lk(mu_);
      ERR_clear_error();
      size_t wrote = 0;
      const int r = SSL_write_ex(ssl_, buf, n, &wrote);
      if (r == 1) {
        buf += wrote;
        n -= wrote;
        continue;
      }
      e = SSL_get_error(ssl_, r);
    }
    switch (e) {
      case SSL_ERROR_WANT_WRITE:
      case SSL_ERROR_WANT_READ:
        if (!wait_socket(e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN, send_timeout_ms_))
          throw Error("send to " + peer + " timed out (peer not reading)", ETIMEDOUT);
        break;
      case SSL_ERROR_SYSCALL: throw_errno("send to " + peer, errno ? errno : EPIPE);
      default: throw Error("TLS to " + peer + ": " + openssl_errors(), EPROTO);
    }
  }
}

void TlsTransport::write_all(iovec* iov, size_t n, const std::string& peer) {
  // Small pieces (a frame's length, its segment table, small records) are gathered so that they
  // share TLS records; a large piece is encrypted from where it lies.
  constexpr size_t kGather = 64 << 10;
  std::vector<char> gather;
  auto flush = [&] {
    if (!gather.empty()) write_buffer(gather.data(), gather.size(), peer);
    gather.clear();
  };
  for (size_t i = 0; i < n; i++) {
    const char* p = static_cast<const char*>(iov[i].iov_base);
    const size_t len = iov[i].iov_len;
    if (len >= kGather / 4) {
      flush();
      write_buffer(p, len, peer);
      continue;
    }
    if (gather.size() + len > kGather) flush();
    if (gather.capacity() < kGather) gather.reserve(kGather);
    gather.insert(gather.end(), p, p + len);
  }
  flush();
}

}  // namespace blockrepl
