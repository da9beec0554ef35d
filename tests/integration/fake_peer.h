// Fake peers for hostile-peer tests: a fake master that a real slave (`blockrepl mount --master`)
// attaches to, and a fake slave that attaches to a real master. Both speak through the real wire
// code (blockrepl/wire.h Connection, to_wire) and the real handshake (blockrepl/handshake.h):
// what they send is whatever a test scripts, so that each attack a compromised or impersonating
// peer could make is replayed exactly. Plus a loopback tap that records every byte a peer was
// sent, to show what a refused peer learnt. Loopback only; every wait has a deadline.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "blockrepl/auth.h"
#include "blockrepl/handshake.h"
#include "blockrepl/record.h"
#include "blockrepl/wire.h"

namespace blockrepl::test {

// A secret of n random printable bytes, as a --secret-file holds it (written by write_secret).
std::string random_secret(size_t n = 32);
// Writes `bytes` to path with mode 0600 (as blockrepl requires); returns path.
std::string write_secret(const std::string& path, const std::string& bytes);
// The secret as the handshake code holds it.
std::shared_ptr<const Secret> secret_of(const std::string& bytes);

// ---------------------------------------------------------------------------------------------
// Fake master

// One accepted connection after its hello, with helpers for what a master sends.
class FakeMasterSession {
 public:
  FakeMasterSession(std::unique_ptr<Connection> conn, std::unique_ptr<Frame> hello, int index);
  Connection& conn() { return *conn_; }
  // What the peer sent first after the handshake (a hello, unless it is not a blockrepl slave or
  // the fake master skipped authentication), and that hello.
  wire::Message::Which first_kind() { return hello_->root().which(); }
  wire::Hello::Reader hello() { return hello_->root().getHello(); }
  void set_cluster(std::string c) { cluster_ = std::move(c); }
  // 0 for the first session the fake master accepted, then 1, 2, ...
  int index() const { return index_; }

  struct WelcomeArgs {
    wire::AttachMethod method = wire::AttachMethod::FULL;
    Lsn start_lsn = 0, last_lsn = 0;
    AckLevel ack = AckLevel::sync;
    wire::Codec codec = wire::Codec::NONE;  // the session's compression (batch_codec.h)
    int codec_level = 0;
  };
  void send_welcome(const WelcomeArgs& w);
  // A copy entry filled in by `fill` (path, fid, mode, ... as a real master's TreeSender would).
  void send_copy_entry(const std::function<void(wire::CopyEntry::Builder)>& fill);
  void send_copy_done(Lsn lsn);
  // One batch of records, converted with the real to_wire().
  void send_batch(const std::vector<Record>& records);
  // A batch whose wire records `fill` writes directly (for what to_wire cannot express: an
  // unknown op, a name longer than a Record would ever carry, ...).
  void send_raw_batch(unsigned n, const std::function<void(unsigned, wire::Record::Builder)>& fill);
  void send_heartbeat(Lsn lsn);

  // Receives until an ack with durableLsn >= lsn (true), or the peer closes / errs / times out
  // (false; *why says which).
  bool wait_durable_ack(Lsn lsn, int timeout_ms, std::string* why = nullptr);
  // Waits until the peer closes the connection or sends an error (true), or the time is up.
  bool wait_closed(int timeout_ms, std::string* why = nullptr);

 private:
  std::unique_ptr<Connection> conn_;
  std::unique_ptr<Frame> hello_;
  int index_;
  std::string cluster_;
};

// How the fake master meets a connecting slave.
enum class FakeAuth {
  // The real upstream handshake (HandshakeResponder) with FakeMasterOptions::secret, or none.
  responder,
  // Runs authentication as an impersonator would: accepts whatever proof the slave sends and
  // answers with a proof made with FakeMasterOptions::secret (a wrong one, in the tests).
  forge_proof,
  // Ignores authentication: whatever the slave sends first counts as its hello, and the script
  // runs at once (a master of an older protocol, or one that hopes the slave does not check).
  skip,
};

struct FakeMasterOptions {
  std::shared_ptr<const Secret> secret;  // nullptr: none
  FakeAuth auth = FakeAuth::responder;
  std::string cluster_id = "fake-cluster";
  std::string node_id = "fake-master";
  uint32_t block_size = 4096;
};

// Listens on 127.0.0.1:free_port() and serves one connection at a time: the handshake, then the
// script. Stops (and closes everything) in its destructor.
class FakeMaster {
 public:
  using Script = std::function<void(FakeMasterSession&)>;
  FakeMaster(FakeMasterOptions opts, Script script);
  ~FakeMaster();
  FakeMaster(const FakeMaster&) = delete;
  FakeMaster& operator=(const FakeMaster&) = delete;

  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  // Sessions whose script ran (the hello was accepted).
  int sessions() const { return sessions_; }
  // Connections the handshake refused or that broke before their hello, one line each.
  std::vector<std::string> handshake_failures();
  // Exceptions the script ended with (a slave that hung up is the usual one), one line each.
  std::vector<std::string> script_endings();
  // Bytes sent to slaves in all sessions that ended.
  uint64_t bytes_sent() const { return bytes_sent_; }
  // Waits up to `timeout_ms` until every session whose script started has ended (a refused
  // slave hangs up; the script notices a moment later), so that bytes_sent() counts it. Returns
  // false if one is still running.
  bool wait_sessions_ended(int timeout_ms);

 private:
  void run();
  std::unique_ptr<Frame> handshake(int fd, std::unique_ptr<Connection>* conn);

  FakeMasterOptions opts_;
  Script script_;
  int port_ = 0;
  OwnedFd listener_;
  std::atomic<bool> stopping_{false};
  std::atomic<int> sessions_{0};
  std::atomic<int> sessions_ended_{0};
  std::atomic<uint64_t> bytes_sent_{0};
  std::mutex mu_;
  Connection* current_ = nullptr;  // under mu_: shut down by the destructor
  std::vector<std::string> handshake_failures_, script_endings_;
  std::thread thread_;
};

// ---------------------------------------------------------------------------------------------
// Fake slave

struct FakeSlaveOptions {
  std::shared_ptr<const Secret> secret;  // nullptr: does not authenticate
  std::string cluster_id = "";           // "" as an empty slave
  std::string node_id = "fake-slave";
  AckLevel ack = AckLevel::sync;
  bool empty = true;
  Lsn durable_lsn = 0;
};

// A downstream peer: connect_upstream() (the real handshake) and a hello, then what the test
// sends. Without a secret it connects as a node without --secret-file does.
class FakeSlave {
 public:
  explicit FakeSlave(FakeSlaveOptions opts) : opts_(std::move(opts)) {}
  // Connects and authenticates to `address`; "" on success, else the error's text (the
  // connection is then closed). *fatal tells whether it was a FatalAttachError.
  std::string connect(const std::string& address, bool* fatal = nullptr);
  void send_hello();
  void send_ack(Lsn received, Lsn durable);
  // The next frame, nullptr on an orderly close; throws Error as Connection::receive does.
  std::unique_ptr<Frame> receive(int timeout_ms);
  Connection* conn() { return conn_.get(); }
  void close() { conn_.reset(); }

 private:
  FakeSlaveOptions opts_;
  std::unique_ptr<Connection> conn_;
};

// ---------------------------------------------------------------------------------------------
// Tap

// A loopback relay: a peer connects to tap.address() and is connected through to `target`;
// every byte target sends back is recorded (received()) before it is passed on.
class Tap {
 public:
  explicit Tap(const std::string& target);
  ~Tap();
  Tap(const Tap&) = delete;
  Tap& operator=(const Tap&) = delete;
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  std::string received();  // everything the target sent, over all relayed connections
  int connections() const { return connections_; }

 private:
  void run();
  std::string target_;
  int port_ = 0;
  OwnedFd listener_;
  std::atomic<bool> stopping_{false};
  std::atomic<int> connections_{0};
  std::mutex mu_;
  std::string received_;
  std::thread thread_;
};

}  // namespace blockrepl::test
