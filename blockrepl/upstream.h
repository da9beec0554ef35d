// The upstream side of replication: accepts slaves on --listen, attaches each as decide_attach()
// says (attach.h: stream from its LSN, Merkle diff or full copy, or a refusal), then streams
// records from the journal with one sender per slave, tracks their acknowledgements and answers
// barriers according to the ack level. A master runs one; so does a slave that serves slaves of
// its own (chains).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "blockrepl/attach.h"
#include "blockrepl/batch_codec.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/handshake.h"
#include "blockrepl/journal.h"
#include "blockrepl/node.h"
#include "blockrepl/wire.h"

namespace blockrepl {

inline constexpr auto kHeartbeatInterval = std::chrono::milliseconds(1000);

// A connection is "pending" from accept until its hello is accepted (after TLS and the
// authentication, when they are on: handshake.h): its frames are at most kMaxHelloFrameBytes,
// all of it is through within the handshake deadline, and it costs no thread meanwhile. At most
// kMaxPendingHandshakes wait; a newcomer beyond them closes the one that waited longest.
inline constexpr auto kHandshakeDeadline = std::chrono::seconds(10);
inline constexpr size_t kMaxPendingHandshakes = 64;

// A hello's variable-length fields within their limits (wire.h); throws Error(EPROTO) naming the
// peer and the field. Public for the fuzz targets (tests/fuzz/fuzz_frame.cpp).
void check_hello_sizes(wire::Hello::Reader h, const std::string& peer);
// What a hello says, as the plain values the attach decision (attach.h) takes.
AttachHello hello_of(wire::Hello::Reader h);

struct UpstreamConfig {
  std::string listen_address;
  AckLevel ack = AckLevel::sync;
  std::chrono::milliseconds ack_timeout{5000};
  unsigned min_sync_slaves = 0;
  bool assign_ids = true;  // a master tags files that have no id yet during a full copy
  std::chrono::milliseconds handshake_deadline = kHandshakeDeadline;
  size_t max_pending_handshakes = kMaxPendingHandshakes;
  PeerSecurity security;  // the secret slaves must prove, the TLS they must speak (either may be off)
  Compression compress;   // --compress: compress batches for every slave that decodes it (batch_codec.h)
};

struct SlaveStatus {
  std::string address, node_id, state, ack;
  Lsn received_lsn = 0, durable_lsn = 0;
  uint64_t lag_bytes = 0;
  bool probation = false;      // dropped for silence before: barriers do not wait for it yet
  bool authenticated = false;  // it proved the cluster's secret
  bool encrypted = false;      // TLS
  std::string compression = "off";  // the stream's codec: "zstd:3" or "off"
  uint64_t batch_bytes = 0, batch_wire_bytes = 0;  // batches sent, before and after compression
};

class Upstream {
 public:
  Upstream(Node& node, Journal& journal, UpstreamConfig cfg);
  ~Upstream();
  Upstream(const Upstream&) = delete;
  Upstream& operator=(const Upstream&) = delete;

  // Starts accepting on a socket from listen_on() (which refuses a port in use).
  void start(int listen_fd);
  void stop();

  // Calls `done` once the slaves the ack level names hold `lsn` (received or durable): at once
  // on this thread if they do, else on the thread that receives the acknowledgement that
  // completes it (so that no thread is woken just to pass the news on). Slaves that let it wait
  // for the ack timeout without acknowledging anything more in that time are dropped; `done` gets 0, or EIO when fewer than
  // min_sync_slaves confirmed.
  void when_confirmed(Lsn lsn, std::function<void(int)> done);
  // Sends the records up to `lsn` (a barrier just published) to the slaves that barriers wait
  // for, from the calling thread, where their stream is idle; wakes the senders of the others.
  // Saves the barrier a thread wake-up on its critical path (measured in the README).
  void push(Lsn lsn);

  std::vector<SlaveStatus> slaves();
  const UpstreamConfig& config() const { return cfg_; }

 private:
  struct Session;
  struct PendingPeer;
  using PendingPeers = std::vector<std::unique_ptr<PendingPeer>>;
  // The accept thread: accepts into `pending`, reads each pending peer's first frame without
  // blocking, closes those past their deadline, and starts a session for each accepted hello.
  void accept_loop();
  // Accepts until none is waiting; false when accept failed otherwise (out of descriptors).
  bool accept_pending(PendingPeers& pending);
  // Reads what the peer sent; true when it is done with (a session started, or it was refused).
  bool advance_handshake(std::unique_ptr<PendingPeer>& p);
  void make_room(PendingPeers& pending);
  void close_expired(PendingPeers& pending);
  void start_session(std::unique_ptr<PendingPeer> p, std::unique_ptr<Frame> hello);
  // Runs on the session's thread when it ends: the session leaves sessions_ (its socket closes as
  // its last reference goes, now, not at the next accept) and its thread waits to be joined.
  void retire(const std::shared_ptr<Session>& s);
  void join_finished_sessions();
  void run_session(std::shared_ptr<Session> s, std::unique_ptr<Frame> hello);
  void send_welcome(Connection& conn, const Identity& me, wire::AttachMethod method, Lsn start_lsn, AckLevel level,
                    const std::string& notice = {}, const Compression& codec = {});
  void serve(std::shared_ptr<Session> s, std::unique_ptr<Frame> hello);
  void stream(Session& s);
  // Takes up to max_bytes of the session's next records from the journal and sends them, under
  // the session's send lock (held by the caller). False if its reader was cut off.
  bool send_next(Session& s, size_t max_bytes);
  void read_acks(std::shared_ptr<Session> s);
  // Remembers that a slave let a barrier or its ack reader time out (by node id).
  void note_silent(const Session& s);
  void note_silent_locked(const Session& s);
  void drop(Session& s, const std::string& why);
  // Counts the slaves barriers wait for that hold `lsn` (under mu_); calls short_of(session)
  // for each one that does not yet.
  template <class ShortOf>
  unsigned holding_locked(Lsn lsn, ShortOf&& short_of) const;
  // Whether the slaves hold what a barrier at `lsn` needs (under mu_).
  bool confirmed_locked(Lsn lsn) const;
  // Completes the barriers that are confirmed now, oldest first (after an ack or a drop).
  void settle();
  // The barrier timer's thread: fails or completes barriers past their ack timeout.
  void expire_loop();
  // A barrier past its deadline: drops the slaves it still waits for that made no progress
  // within the ack timeout and answers 0 or EIO; or, while some still make progress, moves the
  // deadline and answers nothing.
  std::optional<int> expire_locked(Lsn lsn, std::chrono::steady_clock::time_point& deadline,
                                   std::unique_lock<std::mutex>& lk);

  Node& node_;
  Journal& journal_;
  UpstreamConfig cfg_;
  int listen_fd_ = -1;
  OwnedFd wake_fd_;  // eventfd: stop() wakes the accept thread's poll
  std::thread accept_thread_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  // Barriers waiting for slaves, by LSN (under mu_); the timer thread expires them.
  struct PendingBarrier {
    std::chrono::steady_clock::time_point deadline;
    std::function<void(int)> done;
  };
  std::multimap<Lsn, PendingBarrier> barriers_;
  std::condition_variable timer_cv_;
  std::thread timer_thread_;
  std::condition_variable retired_cv_;  // a session left sessions_ (stop() waits for all)
  std::list<std::shared_ptr<Session>> sessions_;
  // Node ids of slaves dropped for not acknowledging, until they acknowledge again (under mu_).
  static constexpr size_t kMaxSilentNodes = 1024;
  std::set<std::string> silent_nodes_;
  std::vector<std::thread> finished_;  // threads of retired sessions, not yet joined
};

}  // namespace blockrepl
