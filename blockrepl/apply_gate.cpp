#include "blockrepl/apply_gate.h"

namespace blockrepl {

bool ApplyGate::runs_alone(const Record& rec) {
  switch (rec.op) {
    case Op::write:
    case Op::truncate:
    case Op::fallocate:
    case Op::setattr:
    case Op::setxattr:
    case Op::removexattr:
    case Op::release:
      return rec.fid == kInvalidFileId;  // a change that names no file cannot be placed
    default:
      return true;
  }
}

ApplyGate::Pass ApplyGate::enter(const Record& rec) {
  std::unique_lock lk(mu_);
  if (runs_alone(rec)) {
    alone_waiting_++;
    cv_.wait(lk, [&] { return !alone_running_ && running_ == 0; });
    alone_waiting_--;
    alone_running_ = true;
    return Pass(this, kInvalidFileId, true);
  }
  cv_.wait(lk, [&] { return !alone_running_ && alone_waiting_ == 0 && busy_.find(rec.fid) == busy_.end(); });
  busy_.insert(rec.fid);
  running_++;
  return Pass(this, rec.fid, false);
}

void ApplyGate::leave(const Pass& pass) {
  {
    std::lock_guard lk(mu_);
    if (pass.alone_) {
      alone_running_ = false;
    } else {
      busy_.erase(pass.fid_);
      running_--;
    }
  }
  cv_.notify_all();
}

}  // namespace blockrepl
