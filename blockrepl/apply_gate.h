// Which changes a master may apply at the same time. A replicated master publishes its changes
// in one LSN order and every replica replays them in that order, so two changes may be applied
// concurrently only if the order between them cannot matter: they touch different files and
// neither changes the namespace. Such changes commute (each one's result, its data and the
// mtime stamped into its record, depends only on its own file), so publishing them in either
// order replays to the state the master has. Everything else keeps a strict order:
//  - changes to the same file (same FileId) run one at a time, in the order they enter;
//  - namespace changes (create, mkdir, symlink, link, unlink, rmdir, rename) run alone: they
//    stamp directory times and move names other changes may resolve.
// A change holds its Pass until it has been published (Node::submit), so that a conflicting
// change that runs after it also gets a later LSN.
#pragma once
#include <condition_variable>
#include <mutex>
#include <unordered_set>

#include "blockrepl/record.h"

namespace blockrepl {

class ApplyGate {
 public:
  class Pass {
   public:
    Pass(Pass&& o) noexcept : gate_(o.gate_), fid_(o.fid_), alone_(o.alone_) { o.gate_ = nullptr; }
    Pass(const Pass&) = delete;
    Pass& operator=(const Pass&) = delete;
    Pass& operator=(Pass&&) = delete;
    ~Pass() { if (gate_) gate_->leave(*this); }

   private:
    friend class ApplyGate;
    Pass(ApplyGate* gate, FileId fid, bool alone) : gate_(gate), fid_(fid), alone_(alone) {}
    ApplyGate* gate_;
    FileId fid_;
    bool alone_;
  };

  // Waits until `rec` may be applied beside what is being applied now.
  Pass enter(const Record& rec);
  // Whether a record must run alone (changes the namespace) rather than beside other files'.
  static bool runs_alone(const Record& rec);

 private:
  void leave(const Pass& pass);

  std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_set<FileId> busy_;  // files with a change being applied
  unsigned running_ = 0;         // changes being applied beside each other
  bool alone_running_ = false;   // a namespace change is being applied
  unsigned alone_waiting_ = 0;   // namespace changes waiting: new file changes let them go first
};

}  // namespace blockrepl
