// A connection between two nodes from its first byte to the hello: the TLS handshake (tls.h) and
// the authentication (auth.h) when the nodes are configured for them. The downstream side
// (a slave, `pull`) runs it at once with timeouts; the upstream side runs it a step at a time
// from its accept thread, without blocking, so that a connection that has not proven anything
// costs no thread.
#pragma once
#include <chrono>
#include <memory>
#include <string>

#include "blockrepl/auth.h"
#include "blockrepl/tls.h"
#include "blockrepl/wire.h"

namespace blockrepl {

// How a node meets its peers: the cluster's secret and its TLS context, either or both absent.
struct PeerSecurity {
  std::shared_ptr<const Secret> secret;
  std::shared_ptr<const TlsContext> tls;
};

// Downstream: connects to the upstream node at `address`, runs TLS and the authentication as
// `sec` says, and returns the connection ready for the hello (authenticated() and
// authenticated_cluster() set when a secret was used). `my_cluster` is the cluster this node
// belongs to ("" if none yet). A refusal the operator must fix (wrong secret, a peer that does
// not authenticate, a certificate that does not verify) throws FatalAttachError; a network
// failure throws Error.
std::unique_ptr<Connection> connect_upstream(const std::string& address, int timeout_ms, const PeerSecurity& sec,
                                             const std::string& my_cluster);

// Upstream: one accepted connection until its hello has arrived.
class HandshakeResponder {
 public:
  // `cluster`: this node's cluster id, proven to the peer once it has proven itself.
  HandshakeResponder(OwnedFd fd, std::string peer, const PeerSecurity& sec, std::string cluster);
  // Advances as far as the bytes that arrived allow, without blocking. Returns the hello once it
  // has arrived (its kind checked, nothing else), else nullptr. Throws Error for a refused peer
  // (it was sent an error message when it is owed one: a missing or wrong secret).
  std::unique_ptr<Frame> advance();
  // What to poll the socket for: POLLIN, or POLLOUT while TLS waits to write.
  short poll_events() const { return events_; }
  int fd() const { return conn_->fd(); }
  const std::string& peer() const { return conn_->peer(); }
  // After advance() returned the hello: the connection, for the session (with the full frame
  // limit again).
  std::unique_ptr<Connection> take_connection();

 private:
  enum class Stage { tls, auth_hello, auth_proof, hello };
  std::unique_ptr<Frame> on_frame(std::unique_ptr<Frame> frame);
  void on_auth_hello(wire::Message::Reader msg);
  void on_auth_proof(wire::Message::Reader msg);
  // Sends `reason` as a fatal error and throws Error "refused PEER: why".
  [[noreturn]] void refuse(const std::string& reason_to_peer, const std::string& why);

  std::unique_ptr<Connection> conn_;
  TlsTransport* tls_ = nullptr;  // the connection's transport, when TLS is on
  std::shared_ptr<const Secret> secret_;
  std::string cluster_;
  Stage stage_;
  short events_;
  Nonce downstream_nonce_{}, upstream_nonce_{};
};

}  // namespace blockrepl
