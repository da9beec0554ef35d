// A Node is one member of a replicated volume: it owns the Store, assigns LSNs to the changes it
// makes (as a master) and publishes every applied record, in LSN order, to its sinks (the
// journal and the senders to slaves plug in here).
#pragma once
#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "blockrepl/apply_gate.h"
#include "blockrepl/metadata.h"
#include "blockrepl/record.h"
#include "blockrepl/record_sink.h"
#include "blockrepl/store.h"

namespace blockrepl {

class Node {
 public:
  // data_path: the backing directory. Opens it and its metadata folder; throws Error.
  explicit Node(const std::string& data_path);
  ~Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // Applies a change made here and, if it succeeded, gives it the next LSN and publishes it.
  // Changes to different files are applied in parallel, others one at a time (ApplyGate), so
  // that replaying them in LSN order gives the state they left here.
  // Returns 0 or the errno of the backing file system.
  int submit(Record& rec, const Targets& t = {});

  // A durability point (fsync, fdatasync, syncfs): published in order, then made durable
  // outside the ordering lock so that other writers are not held up by the disk.
  int barrier(Record& rec, const Targets& t = {});
  // The same, answering through `done` (0 or an errno): the local flush happens on this thread
  // before it returns; `done` runs here too, or later on the thread that receives the slaves'
  // acknowledgement the ack level needs (the FUSE layer replies from there: one thread wake-up
  // less per barrier than waking this one to reply).
  using BarrierDone = std::function<void(int)>;
  void barrier_async(Record& rec, const Targets& t, BarrierDone done);

  // A slave: applies a record received from upstream with the same store (keeping its LSN) and
  // publishes it to this node's sinks (its own slaves). `replay` applies it tolerantly (see
  // Store::apply_replayed). Barrier records are published but not applied: the caller makes
  // everything before them durable itself.
  int apply_received(const Record& rec, bool replay);
  void set_last_lsn(Lsn lsn) { last_lsn_.store(lsn, std::memory_order_release); }
  // The state jumped to `lsn` (see RecordSink::on_reset): tells the sinks.
  void reset_history(Lsn lsn);

  // Called by barrier() once the barrier is durable here, to wait for the slaves the ack level
  // names: calls its `done` with 0 or an errno (EIO when too few slaves confirmed in time), on
  // its own thread or later on another (Upstream::when_confirmed). `pusher`, if
  // given, is called right after the barrier record is published and before the local flush,
  // to send it to the slaves from the barrier's own thread (Upstream::push): the remote flush
  // then starts without waiting for a sender thread to wake up.
  using BarrierWaiter = std::function<void(Lsn, BarrierDone)>;
  void set_barrier_waiter(BarrierWaiter waiter, std::function<void(Lsn)> pusher = nullptr);

  // A clean shutdown: the next start continues right after the last LSN used (so slaves that
  // hold everything can keep streaming) instead of skipping past the reservation.
  void close_clean();

  void add_sink(RecordSink* sink);
  void remove_sink(RecordSink* sink);

  Lsn last_lsn() const { return last_lsn_.load(std::memory_order_acquire); }
  Store& store() { return store_; }
  int root_fd() const { return root_fd_; }
  const std::string& data_path() const { return data_path_; }
  int meta_fd() const { return meta_fd_; }
  Identity identity() const;
  // Changes the identity and writes it durably (cluster id, lineage, role); throws Error.
  void update_identity(const std::function<void(Identity&)>& change);

 private:
  Lsn next_lsn_locked();
  // Gives an applied change the next LSN and hands it to the sinks, under the ordering lock.
  void publish(Record& rec);
  static void stamp(Record& rec, const Stamps& s);

  std::string data_path_;
  int root_fd_ = -1;
  int meta_fd_ = -1;
  mutable std::mutex identity_mu_;
  Identity identity_;
  Store store_;
  ApplyGate gate_;  // which of the master's changes may be applied at the same time
  std::mutex order_mu_;
  std::atomic<Lsn> last_lsn_{0};
  std::vector<RecordSink*> sinks_;  // add sinks before serving: see submit()
  std::atomic<bool> has_sinks_{false};
  BarrierWaiter barrier_waiter_;
  std::function<void(Lsn)> barrier_pusher_;
  // LSNs are reserved on disk in chunks so that a restarted node never reuses one, without a
  // disk write per record.
  static constexpr Lsn kLsnChunk = Lsn{1} << 24;
};

}  // namespace blockrepl
