// Where a Node publishes what it applied: the journal (and through it the senders to slaves)
// plugs in here. Its own header so that a sink need not know the Node.
#pragma once
#include "blockrepl/record.h"

namespace blockrepl {

class RecordSink {
 public:
  virtual ~RecordSink() = default;
  // Called with each applied record in LSN order, under the node's ordering lock: keep it short
  // (copy what must outlive the call; never block on the network).
  virtual void on_record(const Record& rec) = 0;
  // The same, for a record whose publisher sends it to the slaves itself right after the call
  // (a master's barrier: Node::barrier with a pusher). A sink may skip waking the threads that
  // would send it; the pusher wakes them if it could not (Upstream::push).
  virtual void on_record_pushed(const Record& rec) { on_record(rec); }
  // Called before the node takes its ordering lock for a change: a sink that is full makes the
  // writer wait here (back-pressure), never under the lock, so other writers and the barrier
  // path are not held up behind one that waits.
  virtual void wait_for_room() {}
  // The node's state jumped to `lsn` by other means than records (a re-attach by full copy or
  // Merkle diff): history before it can no longer be replayed from this node.
  virtual void on_reset(Lsn lsn) { (void)lsn; }
};

}  // namespace blockrepl
