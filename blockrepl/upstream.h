// The upstream side of replication: accepts slaves on --listen, attaches each as decide_attach()
// says (attach.h: stream from its LSN, Merkle diff or full copy, or a refusal), then streams
// records from the journal with one sender per slave, tracks their acknowledgements and answers
// barriers according to the ack level. A master runs one; so does a slave that serves slaves of
// its own (chains).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "blockrepl/journal.h"
#include "blockrepl/node.h"
#include "blockrepl/wire.h"

namespace blockrepl {

inline constexpr auto kHeartbeatInterval = std::chrono::milliseconds(1000);

struct UpstreamConfig {
  std::string listen_address;
  AckLevel ack = AckLevel::sync;
  std::chrono::milliseconds ack_timeout{5000};
  unsigned min_sync_slaves = 0;
  bool assign_ids = true;  // a master tags files that have no id yet during a full copy
};

struct SlaveStatus {
  std::string address, node_id, state, ack;
  Lsn received_lsn = 0, durable_lsn = 0;
  uint64_t lag_bytes = 0;
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

  // Waits until the slaves the ack level names hold `lsn` (received or durable); drops slaves
  // that do not answer within the ack timeout. Returns 0, or EIO when fewer than
  // min_sync_slaves confirmed.
  int wait_barrier(Lsn lsn);

  std::vector<SlaveStatus> slaves();
  const UpstreamConfig& config() const { return cfg_; }

 private:
  struct Session;
  void accept_loop();
  void send_welcome(Connection& conn, const Identity& me, wire::AttachMethod method, Lsn start_lsn, AckLevel level,
                    const std::string& notice = {});
  void serve(std::shared_ptr<Session> s);
  void stream(Session& s, std::shared_ptr<Journal::Reader> reader);
  void read_acks(std::shared_ptr<Session> s);
  void drop(Session& s, const std::string& why);

  Node& node_;
  Journal& journal_;
  UpstreamConfig cfg_;
  int listen_fd_ = -1;
  std::thread accept_thread_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::condition_variable ack_cv_;
  std::list<std::shared_ptr<Session>> sessions_;
};

}  // namespace blockrepl
