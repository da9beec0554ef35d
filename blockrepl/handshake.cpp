#include "blockrepl/handshake.h"

#include <poll.h>

#include <cerrno>

#include "blockrepl/error.h"

namespace blockrepl {

namespace {

// What an upstream node tells a peer it refuses before authentication: fixed texts, so that a
// refused peer learns nothing about the volume.
const char kAuthRequired[] = "authentication required: this node has a --secret-file; give the connecting node the cluster's secret";
const char kDoesNotAuthenticate[] =
    "this node does not authenticate peers (it has no --secret-file); a node with a secret follows only one that proves it";
const char kAuthFailed[] = "authentication failed: the secrets differ (check --secret-file on both nodes)";

template <size_t N>
bool copy_exact(capnp::Data::Reader in, std::array<uint8_t, N>& out) {
  if (in.size() != N) return false;
  std::copy(in.begin(), in.end(), out.begin());
  return true;
}

ProofInput proof_input(ProofInput::Role role, const Nonce& down, const Nonce& up, std::string slave_cluster,
                       std::string master_cluster, TlsTransport* tls) {
  ProofInput in;
  in.role = role;
  in.downstream_nonce = down;
  in.upstream_nonce = up;
  in.slave_cluster = std::move(slave_cluster);
  in.master_cluster = std::move(master_cluster);
  if (tls) {
    in.has_binding = true;
    in.binding = tls->channel_binding();
  }
  return in;
}

// A downstream node's next frame during authentication: an error from the upstream node is its
// refusal, which the operator must act on.
std::unique_ptr<Frame> receive_auth_step(Connection& conn, const std::string& address, int timeout_ms,
                                         wire::Message::Which expected, const char* expected_name) {
  auto frame = conn.receive(timeout_ms);
  if (!frame)
    throw Error("master " + address + " closed the connection during authentication (does it use the same --tls-* options?)",
                ECONNRESET);
  auto msg = frame->root();
  if (msg.which() == wire::Message::ERROR) {
    auto reason = msg.getError().getReason();
    check_field_size(reason.size(), kMaxReasonBytes, "reason", address, "error");
    throw FatalAttachError("master " + address + " refused this node: " + std::string(reason.cStr()), EACCES);
  }
  if (msg.which() != expected)
    throw FatalAttachError("master " + address + " answered authentication with something other than " + expected_name +
                               " (is it a blockrepl node of protocol " + std::to_string(kProtocolVersion) + "?)",
                           EPROTO);
  return frame;
}

void authenticate_to_upstream(Connection& conn, const Secret& secret, const std::string& address, int timeout_ms,
                              const std::string& my_cluster) {
  TlsTransport* tls = dynamic_cast<TlsTransport*>(&conn.transport());
  const Nonce down = fresh_nonce();
  {
    capnp::MallocMessageBuilder mb;
    auto h = mb.initRoot<wire::Message>().initAuthHello();
    h.setProtocolVersion(kProtocolVersion);
    h.setNonce(kj::arrayPtr(down.data(), down.size()));
    conn.send(mb);
  }
  Nonce up;
  {
    auto frame = receive_auth_step(conn, address, timeout_ms, wire::Message::AUTH_CHALLENGE, "authChallenge");
    if (!copy_exact(frame->root().getAuthChallenge().getNonce(), up))
      throw Error("master " + address + " sent a malformed authChallenge (nonce of the wrong size)", EPROTO);
  }
  {
    const Mac mine = make_proof(secret, proof_input(ProofInput::Role::slave, down, up, my_cluster, "", tls));
    capnp::MallocMessageBuilder mb;
    auto p = mb.initRoot<wire::Message>().initAuthProof();
    p.setClusterId(my_cluster);
    p.setMac(kj::arrayPtr(mine.data(), mine.size()));
    conn.send(mb);
  }
  auto frame = receive_auth_step(conn, address, timeout_ms, wire::Message::AUTH_PROOF, "authProof");
  auto proof = frame->root().getAuthProof();
  check_field_size(proof.getClusterId().size(), kMaxIdBytes, "cluster id", address, "authProof");
  const std::string their_cluster = proof.getClusterId();
  auto mac = proof.getMac();
  if (!proof_matches(secret, proof_input(ProofInput::Role::master, down, up, my_cluster, their_cluster, tls), mac.begin(), mac.size()))
    throw FatalAttachError("master " + address +
                               " did not prove the cluster's secret (it has a different --secret-file, or is not the node it "
                               "claims to be): refused",
                           EACCES);
  conn.set_authenticated(their_cluster);
}

}  // namespace

std::unique_ptr<Connection> connect_upstream(const std::string& address, int timeout_ms, const PeerSecurity& sec,
                                             const std::string& my_cluster) {
  OwnedFd fd = connect_socket(address, timeout_ms);
  std::unique_ptr<Connection> conn;
  if (sec.tls) {
    std::string host, port;
    split_address(address, &host, &port);  // connect_socket accepted it
    auto tls = std::make_unique<TlsTransport>(std::move(fd), *sec.tls, TlsTransport::Side::client, host);
    tls->handshake(timeout_ms, "master " + address);
    conn = std::make_unique<Connection>(std::move(tls), address);
  } else {
    conn = std::make_unique<Connection>(std::make_unique<PlainTransport>(std::move(fd)), address);
  }
  if (sec.secret) {
    // An upstream node answers with small frames until we are through (a stranger's answer is
    // bounded as a stranger's hello is).
    conn->set_max_frame_bytes(kMaxHelloFrameBytes);
    authenticate_to_upstream(*conn, *sec.secret, address, timeout_ms, my_cluster);
    conn->set_max_frame_bytes(kMaxFrameBytes);
  }
  conn->start_session(std::chrono::milliseconds(0));
  return conn;
}

HandshakeResponder::HandshakeResponder(OwnedFd fd, std::string peer, const PeerSecurity& sec, std::string cluster)
    : secret_(sec.secret), cluster_(std::move(cluster)), events_(POLLIN) {
  std::unique_ptr<Transport> transport;
  if (sec.tls) {
    auto tls = std::make_unique<TlsTransport>(std::move(fd), *sec.tls, TlsTransport::Side::server);
    tls_ = tls.get();
    transport = std::move(tls);
  } else {
    transport = std::make_unique<PlainTransport>(std::move(fd));
  }
  conn_ = std::make_unique<Connection>(std::move(transport), std::move(peer));
  conn_->set_max_frame_bytes(kMaxHelloFrameBytes);
  stage_ = tls_ ? Stage::tls : secret_ ? Stage::auth_hello : Stage::hello;
}

std::unique_ptr<Frame> HandshakeResponder::advance() {
  for (;;) {
    if (stage_ == Stage::tls) {
      TlsTransport::Step step;
      try {
        step = tls_->handshake_step(conn_->peer());
      } catch (const Error& e) {
        // What OpenSSL says of a peer that sent a plain frame is obscure.
        if (std::string(e.what()).find("wrong version number") == std::string::npos) throw;
        throw Error(std::string(e.what()) + " (it does not speak TLS: does it have --tls-*?)", e.errno_value());
      }
      switch (step) {
        case TlsTransport::Step::want_read: events_ = POLLIN; return nullptr;
        case TlsTransport::Step::want_write: events_ = POLLOUT; return nullptr;
        case TlsTransport::Step::done:
          events_ = POLLIN;
          stage_ = secret_ ? Stage::auth_hello : Stage::hello;
          continue;  // the peer's first message may have come with its last handshake bytes
      }
    }
    auto frame = conn_->poll_receive();
    if (!frame) return nullptr;
    if (auto hello = on_frame(std::move(frame))) return hello;
  }
}

std::unique_ptr<Frame> HandshakeResponder::on_frame(std::unique_ptr<Frame> frame) {
  auto msg = frame->root();
  const auto kind = msg.which();
  switch (stage_) {
    case Stage::auth_hello:
      if (kind == wire::Message::HELLO) refuse(kAuthRequired, "it did not authenticate (this node has a --secret-file)");
      if (kind != wire::Message::AUTH_HELLO) throw Error("connection from " + conn_->peer() + " spoke first with something other than authHello", EPROTO);
      on_auth_hello(msg);
      return nullptr;
    case Stage::auth_proof:
      if (kind != wire::Message::AUTH_PROOF) throw Error("connection from " + conn_->peer() + " did not send its authProof", EPROTO);
      on_auth_proof(msg);
      return nullptr;
    case Stage::hello:
      if (kind == wire::Message::AUTH_HELLO) refuse(kDoesNotAuthenticate, "it asked to authenticate, and this node has no --secret-file");
      if (kind != wire::Message::HELLO) throw Error("connection from " + conn_->peer() + " spoke first with something other than hello", EPROTO);
      return frame;
    case Stage::tls: break;
  }
  throw Error("handshake with " + conn_->peer() + " in an impossible state", EPROTO);
}

void HandshakeResponder::on_auth_hello(wire::Message::Reader msg) {
  auto h = msg.getAuthHello();
  if (h.getProtocolVersion() != kProtocolVersion)
    refuse("this node speaks protocol version " + std::to_string(kProtocolVersion) + ", the connecting node " +
               std::to_string(h.getProtocolVersion()),
           "it speaks protocol version " + std::to_string(h.getProtocolVersion()));
  if (!copy_exact(h.getNonce(), downstream_nonce_))
    throw Error("authHello from " + conn_->peer() + ": nonce is " + std::to_string(h.getNonce().size()) + " bytes (must be " +
                    std::to_string(kAuthNonceBytes) + ")",
                EPROTO);
  upstream_nonce_ = fresh_nonce();
  capnp::MallocMessageBuilder mb;
  mb.initRoot<wire::Message>().initAuthChallenge().setNonce(kj::arrayPtr(upstream_nonce_.data(), upstream_nonce_.size()));
  conn_->send(mb);
  stage_ = Stage::auth_proof;
}

void HandshakeResponder::on_auth_proof(wire::Message::Reader msg) {
  auto p = msg.getAuthProof();
  check_field_size(p.getClusterId().size(), kMaxIdBytes, "cluster id", conn_->peer(), "authProof");
  const std::string their_cluster = p.getClusterId();
  auto mac = p.getMac();
  if (!proof_matches(*secret_, proof_input(ProofInput::Role::slave, downstream_nonce_, upstream_nonce_, their_cluster, "", tls_),
                     mac.begin(), mac.size()))
    refuse(kAuthFailed, "authentication failed (its proof does not match this node's secret)");
  const Mac mine =
      make_proof(*secret_, proof_input(ProofInput::Role::master, downstream_nonce_, upstream_nonce_, their_cluster, cluster_, tls_));
  capnp::MallocMessageBuilder mb;
  auto out = mb.initRoot<wire::Message>().initAuthProof();
  out.setClusterId(cluster_);
  out.setMac(kj::arrayPtr(mine.data(), mine.size()));
  conn_->send(mb);
  conn_->set_authenticated(their_cluster);
  stage_ = Stage::hello;
}

std::unique_ptr<Connection> HandshakeResponder::take_connection() {
  conn_->set_max_frame_bytes(kMaxFrameBytes);
  return std::move(conn_);
}

void HandshakeResponder::refuse(const std::string& reason_to_peer, const std::string& why) {
  conn_->send_error(reason_to_peer, true);
  throw Error("refused " + conn_->peer() + ": " + why, EACCES);
}

}  // namespace blockrepl
