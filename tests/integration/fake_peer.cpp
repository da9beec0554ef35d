#include "fake_peer.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <capnp/message.h>

#include <chrono>
#include <cstring>
#include <random>
#include <stdexcept>

#include "blockrepl/error.h"
#include "harness.h"

namespace blockrepl::test {

namespace {

using Clock = std::chrono::steady_clock;

// A listening loopback socket on a free port (retries when another process took the port).
OwnedFd listen_loopback(int* port) {
  for (int attempt = 0; attempt < 20; attempt++) {
    const int p = free_port();
    try {
      OwnedFd fd(listen_on("127.0.0.1:" + std::to_string(p)));
      *port = p;
      return fd;
    } catch (const Error&) {
    }
  }
  throw std::runtime_error("no free loopback port to listen on");
}

// Accepts one connection, waiting at most timeout_ms; an invalid fd on timeout or shutdown.
OwnedFd accept_within(int listen_fd, int timeout_ms, int flags) {
  pollfd p{listen_fd, POLLIN, 0};
  if (poll(&p, 1, timeout_ms) <= 0 || !(p.revents & POLLIN)) return OwnedFd();
  return OwnedFd(accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | flags));
}

// The fake peers write to sockets their victims close: that must be an error (EPIPE), not a
// SIGPIPE that kills the test process (and leaves its mounts behind). The daemons ignore it too.
void ignore_sigpipe() { signal(SIGPIPE, SIG_IGN); }

}  // namespace

std::string random_secret(size_t n) {
  std::random_device rd;
  static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  std::string s(n, 'x');
  for (char& c : s) c = alphabet[rd() % (sizeof alphabet - 1)];
  return s;
}

std::string write_secret(const std::string& path, const std::string& bytes) {
  write_file(path, bytes);
  if (chmod(path.c_str(), 0600) != 0) fail_sys("chmod(" + path + ")");
  return path;
}

std::shared_ptr<const Secret> secret_of(const std::string& bytes) { return std::make_shared<const Secret>(bytes); }

// ---------------------------------------------------------------------------------------------
// Fake master

FakeMasterSession::FakeMasterSession(std::unique_ptr<Connection> conn, std::unique_ptr<Frame> hello, int index)
    : conn_(std::move(conn)), hello_(std::move(hello)), index_(index) {}

void FakeMasterSession::send_welcome(const WelcomeArgs& a) {
  capnp::MallocMessageBuilder mb;
  auto w = mb.initRoot<wire::Message>().initWelcome();
  w.setProtocolVersion(kProtocolVersion);
  w.setNodeId("fake-master");
  w.setBlockSize(4096);
  auto lin = w.initLineage(1);
  lin[0].setId("fake-lineage");
  lin[0].setFirstLsn(1);
  w.setMethod(a.method);
  w.setStartLsn(a.start_lsn);
  w.setLastLsn(a.last_lsn);
  w.setAckLevel(static_cast<wire::AckLevel>(static_cast<uint16_t>(a.ack)));
  w.setClusterId(cluster_);
  w.setCodec(a.codec);
  w.setCodecLevel(a.codec_level);
  conn_->send(mb);
}

void FakeMasterSession::send_copy_entry(const std::function<void(wire::CopyEntry::Builder)>& fill) {
  capnp::MallocMessageBuilder mb;
  fill(mb.initRoot<wire::Message>().initCopyEntry());
  conn_->send(mb);
}

void FakeMasterSession::send_copy_done(Lsn lsn) {
  capnp::MallocMessageBuilder mb;
  auto d = mb.initRoot<wire::Message>().initCopyDone();
  d.setLsn(lsn);
  d.setRootMtimeSec(1700000000);
  conn_->send(mb);
}

void FakeMasterSession::send_batch(const std::vector<Record>& records) {
  capnp::MallocMessageBuilder mb;
  auto list = mb.initRoot<wire::Message>().initBatch().initRecords(static_cast<unsigned>(records.size()));
  for (unsigned i = 0; i < records.size(); i++) to_wire(records[i], list[i]);
  conn_->send(mb);
}

void FakeMasterSession::send_raw_batch(unsigned n, const std::function<void(unsigned, wire::Record::Builder)>& fill) {
  capnp::MallocMessageBuilder mb;
  auto list = mb.initRoot<wire::Message>().initBatch().initRecords(n);
  for (unsigned i = 0; i < n; i++) fill(i, list[i]);
  conn_->send(mb);
}

void FakeMasterSession::send_heartbeat(Lsn lsn) {
  capnp::MallocMessageBuilder mb;
  mb.initRoot<wire::Message>().initHeartbeat().setLsn(lsn);
  conn_->send(mb);
}

bool FakeMasterSession::wait_durable_ack(Lsn lsn, int timeout_ms, std::string* why) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  try {
    while (Clock::now() < deadline) {
      const int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
      auto f = conn_->receive(std::max(left, 1));
      if (!f) {
        if (why) *why = "closed";
        return false;
      }
      auto m = f->root();
      if (m.which() == wire::Message::ERROR) {
        if (why) *why = std::string("error: ") + m.getError().getReason().cStr();
        return false;
      }
      if (m.which() == wire::Message::ACK && m.getAck().getDurableLsn() >= lsn) return true;
    }
    if (why) *why = "timeout";
  } catch (const std::exception& e) {
    if (why) *why = e.what();
  }
  return false;
}

bool FakeMasterSession::wait_closed(int timeout_ms, std::string* why) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  try {
    while (Clock::now() < deadline) {
      const int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
      auto f = conn_->receive(std::max(left, 1));
      if (!f) {
        if (why) *why = "closed";
        return true;
      }
      if (f->root().which() == wire::Message::ERROR) {
        if (why) *why = std::string("error: ") + f->root().getError().getReason().cStr();
        return true;
      }
    }
  } catch (const Error& e) {
    // A timeout is "still open"; a reset or a broken frame is a close.
    if (std::string(e.what()).find("timed out") == std::string::npos && e.errno_value() != ETIMEDOUT) {
      if (why) *why = e.what();
      return true;
    }
  } catch (const std::exception& e) {
    if (why) *why = e.what();
    return true;
  }
  if (why) *why = "still open";
  return false;
}

FakeMaster::FakeMaster(FakeMasterOptions opts, Script script) : opts_(std::move(opts)), script_(std::move(script)) {
  ignore_sigpipe();
  listener_ = listen_loopback(&port_);
  thread_ = std::thread([this] { run(); });
}

FakeMaster::~FakeMaster() {
  stopping_ = true;
  {
    std::lock_guard lk(mu_);
    if (current_) current_->shutdown();
  }
  shutdown(listener_.get(), SHUT_RDWR);
  if (thread_.joinable()) thread_.join();
}

std::vector<std::string> FakeMaster::handshake_failures() {
  std::lock_guard lk(mu_);
  return handshake_failures_;
}

std::vector<std::string> FakeMaster::script_endings() {
  std::lock_guard lk(mu_);
  return script_endings_;
}

std::unique_ptr<Frame> FakeMaster::handshake(int fd, std::unique_ptr<Connection>* out) {
  const std::string peer = peer_name_of(fd);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  if (opts_.auth == FakeAuth::responder) {
    // The real upstream code, driven as the master's accept thread drives it.
    PeerSecurity sec;
    sec.secret = opts_.secret;
    HandshakeResponder r(OwnedFd(fd), peer, sec, opts_.cluster_id);
    {
      std::lock_guard lk(mu_);
      if (stopping_) return nullptr;
    }
    while (Clock::now() < deadline && !stopping_) {
      pollfd p{r.fd(), r.poll_events(), 0};
      if (poll(&p, 1, 100) <= 0) continue;
      if (auto hello = r.advance()) {
        *out = r.take_connection();
        return hello;
      }
    }
    throw Error("handshake with " + peer + " not through in time");
  }
  auto conn = std::make_unique<Connection>(std::make_unique<PlainTransport>(OwnedFd(fd)), peer);
  conn->start_session(std::chrono::milliseconds(5000));
  auto first = conn->receive(10000);
  if (!first) throw Error("connection from " + peer + " closed before its first message");
  if (opts_.auth == FakeAuth::forge_proof && first->root().which() == wire::Message::AUTH_HELLO) {
    Nonce down{}, up = fresh_nonce();
    auto n = first->root().getAuthHello().getNonce();
    if (n.size() == down.size()) std::copy(n.begin(), n.end(), down.begin());
    {
      capnp::MallocMessageBuilder mb;
      mb.initRoot<wire::Message>().initAuthChallenge().setNonce(kj::arrayPtr(up.data(), up.size()));
      conn->send(mb);
    }
    auto proof = conn->receive(10000);
    if (!proof || proof->root().which() != wire::Message::AUTH_PROOF) throw Error("no authProof from " + peer);
    // Whatever it proved is taken; our own proof is made with the secret we have (not the
    // cluster's): an impersonator's best try.
    ProofInput in;
    in.role = ProofInput::Role::master;
    in.downstream_nonce = down;
    in.upstream_nonce = up;
    in.slave_cluster = proof->root().getAuthProof().getClusterId();
    in.master_cluster = opts_.cluster_id;
    const auto some_secret = opts_.secret ? opts_.secret : secret_of(std::string(32, 'w'));
    const Mac mac = make_proof(*some_secret, in);
    {
      capnp::MallocMessageBuilder mb;
      auto p = mb.initRoot<wire::Message>().initAuthProof();
      p.setClusterId(opts_.cluster_id);
      p.setMac(kj::arrayPtr(mac.data(), mac.size()));
      conn->send(mb);
    }
    first = conn->receive(10000);
    if (!first) throw Error("connection from " + peer + " closed after the forged proof");
  }
  *out = std::move(conn);
  return first;
}

void FakeMaster::run() {
  int index = 0;
  while (!stopping_) {
    OwnedFd fd = accept_within(listener_.get(), 100, opts_.auth == FakeAuth::responder ? SOCK_NONBLOCK : 0);
    if (!fd) continue;
    std::unique_ptr<Connection> conn;
    std::unique_ptr<Frame> hello;
    try {
      hello = handshake(fd.release(), &conn);
    } catch (const std::exception& e) {
      std::lock_guard lk(mu_);
      handshake_failures_.push_back(e.what());
      continue;
    }
    if (!hello || !conn) continue;
    if (opts_.auth == FakeAuth::responder) conn->start_session(std::chrono::milliseconds(5000));
    {
      std::lock_guard lk(mu_);
      if (stopping_) break;
      current_ = conn.get();
    }
    Connection* raw = conn.get();
    FakeMasterSession session(std::move(conn), std::move(hello), index++);
    session.set_cluster(opts_.cluster_id);
    sessions_++;
    try {
      script_(session);
    } catch (const std::exception& e) {
      std::lock_guard lk(mu_);
      script_endings_.push_back(e.what());
    }
    bytes_sent_ += raw->bytes_sent();
    sessions_ended_++;
    std::lock_guard lk(mu_);
    current_ = nullptr;
  }
}

bool FakeMaster::wait_sessions_ended(int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (sessions_ended_ < sessions_) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Fake slave

std::string FakeSlave::connect(const std::string& address, bool* fatal) {
  if (fatal) *fatal = false;
  ignore_sigpipe();
  conn_.reset();
  PeerSecurity sec;
  sec.secret = opts_.secret;
  try {
    conn_ = connect_upstream(address, 5000, sec, opts_.cluster_id);
    return "";
  } catch (const FatalAttachError& e) {
    if (fatal) *fatal = true;
    return e.what();
  } catch (const std::exception& e) {
    return e.what();
  }
}

void FakeSlave::send_hello() {
  capnp::MallocMessageBuilder mb;
  auto h = mb.initRoot<wire::Message>().initHello();
  h.setProtocolVersion(kProtocolVersion);
  h.setClusterId(opts_.cluster_id);
  h.setNodeId(opts_.node_id);
  h.setBlockSize(4096);
  h.setHashAlgorithm(kHashAlgorithm);
  h.setDurableLsn(opts_.durable_lsn);
  h.setAckLevel(static_cast<wire::AckLevel>(static_cast<uint16_t>(opts_.ack)));
  h.setEmpty(opts_.empty);
  h.setPurpose(wire::Purpose::ATTACH);
  conn_->send(mb);
}

void FakeSlave::send_ack(Lsn received, Lsn durable) {
  capnp::MallocMessageBuilder mb;
  auto a = mb.initRoot<wire::Message>().initAck();
  a.setReceivedLsn(received);
  a.setDurableLsn(durable);
  conn_->send(mb);
}

std::unique_ptr<Frame> FakeSlave::receive(int timeout_ms) { return conn_->receive(timeout_ms); }

// ---------------------------------------------------------------------------------------------
// Tap

Tap::Tap(const std::string& target) : target_(target) {
  ignore_sigpipe();
  listener_ = listen_loopback(&port_);
  thread_ = std::thread([this] { run(); });
}

Tap::~Tap() {
  stopping_ = true;
  shutdown(listener_.get(), SHUT_RDWR);
  if (thread_.joinable()) thread_.join();
}

std::string Tap::received() {
  std::lock_guard lk(mu_);
  return received_;
}

void Tap::run() {
  // One relayed connection at a time: the tests connect their fake peers one after another.
  while (!stopping_) {
    OwnedFd down = accept_within(listener_.get(), 100, 0);
    if (!down) continue;
    connections_++;
    OwnedFd up;
    try {
      up = connect_socket(target_, 5000);
    } catch (const std::exception&) {
      continue;
    }
    fcntl(up.get(), F_SETFL, fcntl(up.get(), F_GETFL) & ~O_NONBLOCK);
    bool open = true;
    while (open && !stopping_) {
      pollfd p[2] = {{down.get(), POLLIN, 0}, {up.get(), POLLIN, 0}};
      if (poll(p, 2, 100) <= 0) continue;
      char buf[65536];
      for (int i = 0; i < 2 && open; i++) {
        if (!p[i].revents) continue;
        const int from = i == 0 ? down.get() : up.get(), to = i == 0 ? up.get() : down.get();
        const ssize_t n = recv(from, buf, sizeof buf, 0);
        if (n <= 0) {
          open = false;
          break;
        }
        if (i == 1) {
          std::lock_guard lk(mu_);
          received_.append(buf, static_cast<size_t>(n));
        }
        for (ssize_t done = 0; done < n;) {
          const ssize_t w = send(to, buf + done, static_cast<size_t>(n - done), MSG_NOSIGNAL);
          if (w <= 0) {
            open = false;
            break;
          }
          done += w;
        }
      }
    }
  }
}

}  // namespace blockrepl::test
