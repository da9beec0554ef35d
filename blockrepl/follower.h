// The downstream side of replication (a slave): connects to its master, attaches (full copy or
// stream), applies records in LSN order with the same Store the master uses, makes them durable
// at barriers, acknowledges, and reconnects with back-off when the master goes away.
#pragma once
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>

#include "blockrepl/batch_codec.h"
#include "blockrepl/cache_invalidator.h"
#include "blockrepl/error.h"
#include "blockrepl/merkle.h"
#include "blockrepl/node.h"
#include "blockrepl/replica_state.h"
#include "blockrepl/space_reserve.h"
#include "blockrepl/handshake.h"
#include "blockrepl/wire.h"

namespace blockrepl {

struct FollowerConfig {
  std::string master_address;
  std::string listen_address;  // announced to the master (for its status)
  AckLevel ack = AckLevel::sync;
  bool no_fsync = false;
  bool exit_on_disconnect = false;
  bool discard_my_data = false;  // a diverged node agrees to be rewritten to the master's state
  // Stage even a stream catch-up and switch to it at once at a barrier (pull: an interrupted
  // update leaves the previous state, never a prefix of the missed records).
  bool stage_stream = false;
  std::chrono::milliseconds master_timeout{5000};  // silence after which the master is presumed gone
  PeerSecurity security;  // the secret and TLS this node uses with its master (either may be off)
  Compression compress;   // --compress: ask the master to compress the stream (batch_codec.h)
};

struct AttachReport {
  std::string method;  // "full", "stream", "merkle"
  uint64_t bytes_received = 0, blocks_received = 0, files_received = 0;
  double seconds = 0;
};

struct FollowerStatus {
  std::string address, state;  // "attaching", "streaming", "disconnected"
  Lsn received_lsn = 0, durable_lsn = 0;
  bool has_last_attach = false;
  AttachReport last_attach;
  AttachReport current_attach;  // while state == "attaching"
  std::string last_error;
  std::string waiting_for;  // while disconnected: what the next attempt needs ("" if only time)
  bool authenticated = false, encrypted = false;  // of the current (or last) connection
  std::string compression = "off";                 // the stream's codec, as the welcome said
};


class Follower {
 public:
  Follower(Node& node, FollowerConfig cfg);
  ~Follower();
  Follower(const Follower&) = delete;
  Follower& operator=(const Follower&) = delete;

  // Whether this replica holds a completed copy it can serve before reaching its master.
  bool has_data() const;
  // Whether the replica is consistent and nothing is staged (a pull is complete).
  bool complete() const { return state_.attach_complete() && !staging_; }
  // One attach attempt, synchronously, until the replica is consistent (for an empty replica,
  // before its mount is offered). Throws Error / FatalAttachError.
  void attach_now();
  // Streams (and re-attaches with back-off) in a background thread until stop().
  void start();
  void stop();
  // Called when the connection is lost and exit_on_disconnect is set, or on a fatal refusal.
  void set_on_exit(std::function<void(int code, const std::string& why)> fn) { on_exit_ = std::move(fn); }
  void set_invalidator(CacheInvalidator* inv) { invalidator_ = inv; }

  FollowerStatus status();

  // The welcome's variable-length fields within their limits (wire.h), before any is used;
  // throws Error(EPROTO) naming `peer` (the master) and the field. Static and public for the
  // fuzz targets (tests/fuzz/fuzz_frame.cpp).
  static void check_welcome_sizes(wire::Welcome::Reader w, const std::string& peer);

  // Compares this replica's hash trees with its master's (deep: rehash both first) over a
  // connection of its own. Throws Error if the master cannot be reached.
  DiffReport verify(bool deep);

 private:
  void run();
  void session();  // connect (unless attach_now() left a connection), then stream until it breaks
  void handshake(Connection& conn);
  std::unique_ptr<Frame> receive_welcome(Connection& conn);
  void receive_copy(Connection& conn);
  void stream(Connection& conn);
  void apply_batch(Connection& conn, wire::Batch::Reader batch, Lsn applied_upto = 0);
  void stage_batch(Connection& conn, Frame& frame);
  void adopt_lineage(capnp::List<wire::LineageEntry>::Reader lineage);
  void commit_stage(Connection& conn, Lsn lsn);
  void finish_stage();  // applies a committed stage and makes it the replica's state
  void send_hello(Connection& conn, wire::Purpose purpose, bool deep);
  void make_durable(Lsn lsn);
  void send_ack(Connection& conn);

  Node& node_;
  FollowerConfig cfg_;
  ReplicaState state_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> reached_streaming_{false};  // the current session got past its attach
  std::mutex conn_mu_;
  Connection* conn_ = nullptr;  // the live connection, for stop()
  std::unique_ptr<Connection> first_conn_;  // attached by attach_now(), streamed on by start()
  CacheInvalidator* invalidator_ = nullptr;
  std::unique_ptr<Stage> stage_;
  bool staging_ = false;    // a Merkle attach: what arrives goes to the stage
  Lsn stage_target_ = 0;    // ... until a barrier at or past this LSN
  Lsn hello_lsn_ = 0;       // the LSN our last hello claimed
  // The disk filled while applying a record: the records that would free the space come after
  // the one that cannot be applied, so streaming cannot go on. Ask for the Merkle diff, which
  // drops what the master no longer has before it needs room for anything new.
  bool resync_ = false;
  bool apply_failed_ = false;  // the session ended on a record that could not be applied
  std::string resync_why_;     // what a resync waits for (status)
  SpaceReserve reserve_;  // given up when the disk fills, taken back once streaming again
  void after_failed_session(const std::exception& e);
  void drop_uncommitted_stage();
  std::function<void(int, const std::string&)> on_exit_;

  // Session state.
  std::string method_;
  AckLevel master_ack_ = AckLevel::sync;  // what the master waits for from us
  Compression codec_;                     // how the master compresses batches (the welcome's)
  Lsn catchup_target_ = 0;                // the master's LSN when we attached
  uint64_t catchup_bytes_start_ = 0;
  bool catching_up_ = false;
  Lsn replay_until_ = 0;  // records up to here may already be reflected: apply tolerantly
  Lsn complete_at_ = 0;   // the replica is consistent once a barrier at or past this is durable
  Lsn last_lsn_ = 0;
  std::unordered_set<FileId> dirty_files_;
  bool dirty_namespace_ = false;
  std::chrono::steady_clock::time_point state_synced_at_{};
  std::chrono::steady_clock::time_point last_ack_at_{};
  // Barriers of a master that does not wait for our disk are flushed at most this often
  // (apply_batch); the last one not flushed yet, and when we last flushed.
  static constexpr std::chrono::milliseconds kUnwaitedFlushInterval{100};
  Lsn deferred_barrier_ = 0;
  std::chrono::steady_clock::time_point flushed_at_{};

  std::mutex status_mu_;
  FollowerStatus status_;
  std::chrono::steady_clock::time_point attach_started_;
};

}  // namespace blockrepl
