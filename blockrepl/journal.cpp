#include "blockrepl/journal.h"

#include <algorithm>

#include "blockrepl/log.h"

namespace blockrepl {

Journal::Journal(size_t keep_bytes, size_t inflight_bytes, std::chrono::milliseconds stall_timeout)
    : keep_bytes_(keep_bytes), inflight_bytes_(inflight_bytes), stall_timeout_(stall_timeout) {}

Journal::~Journal() { close(); }

void Journal::set_start(Lsn lsn) {
  std::lock_guard lk(mu_);
  if (records_.empty()) base_lsn_ = last_lsn_ = lsn;
}

void Journal::on_reset(Lsn lsn) {
  std::lock_guard lk(mu_);
  records_.clear();
  bytes_ = 0;
  base_lsn_ = last_lsn_ = lsn;
  for (auto& r : readers_) {
    if (!r->cut_off) LOG_INFO("slave %s must attach again: this node's state was replaced at lsn %llu", r->name.c_str(),
                              static_cast<unsigned long long>(lsn));
    r->cut_off = true;
  }
  new_record_cv_.notify_all();
  space_cv_.notify_all();
}

void Journal::on_record(const Record& rec) { store(rec, true); }

void Journal::on_record_pushed(const Record& rec) { store(rec, false); }

void Journal::wake_readers() {
  { std::lock_guard lk(mu_); }  // a reader between its check and its wait cannot miss this
  new_record_cv_.notify_all();
}

void Journal::store(const Record& rec, bool wake) {
  auto copy = std::make_shared<Record>(rec);
  copy->own_data();
  size_t cost = record_cost(*copy);
  std::unique_lock lk(mu_);
  if (records_.empty() && rec.lsn > 0) base_lsn_ = std::max(base_lsn_, rec.lsn - 1);
  records_.push_back(std::move(copy));
  bytes_ += cost;
  last_lsn_ = rec.lsn;
  if (rec.is_barrier()) last_barrier_lsn_.store(rec.lsn, std::memory_order_release);
  if (wake) new_record_cv_.notify_all();
  evict_locked();
  // Back-pressure: a reader that lags by more than the in-flight bound holds up writers, for at
  // most the stall timeout; then it is cut off so the writers carry on.
  if (bytes_ > keep_bytes_ + inflight_bytes_ + kAttachAllowance) {
    // An attach that falls this far behind is cut off (the slave will start it again).
    for (auto& r : readers_)
      if (r->attaching && !r->cut_off) {
        r->cut_off = true;
        LOG_WARN("slave %s: too many changes during its full copy; it will retry", r->name.c_str());
      }
    evict_locked();
  }
}

void Journal::wait_for_room() {
  std::unique_lock lk(mu_);
  if (bytes_ > bound_locked() && !readers_.empty()) {
    auto deadline = std::chrono::steady_clock::now() + stall_timeout_;
    while (bytes_ > bound_locked() && !closed_) {
      if (space_cv_.wait_until(lk, deadline) == std::cv_status::timeout) {
        // Cut off the slowest readers, one at a time, until the writers fit again.
        while (bytes_ > bound_locked()) {
          std::shared_ptr<Reader> slowest;
          for (auto& r : readers_)
            if (!r->cut_off && !r->attaching && (!slowest || r->taken < slowest->taken)) slowest = r;
          if (!slowest) break;
          slowest->cut_off = true;
          LOG_WARN("slave %s lags too far behind (at lsn %llu, journal at %llu): dropping it", slowest->name.c_str(),
                   static_cast<unsigned long long>(slowest->taken), static_cast<unsigned long long>(last_lsn_));
          evict_locked();
        }
        new_record_cv_.notify_all();
        break;
      }
      evict_locked();
    }
  }
}

size_t Journal::bound_locked() const {
  for (auto& r : readers_)
    if (r->attaching && !r->cut_off) return keep_bytes_ + inflight_bytes_ + kAttachAllowance;
  return keep_bytes_ + inflight_bytes_;
}

void Journal::evict_locked() {
  Lsn min_taken = last_lsn_;
  for (auto& r : readers_)
    if (!r->cut_off) min_taken = std::min(min_taken, r->taken);
  while (!records_.empty() && bytes_ > keep_bytes_ && records_.front()->lsn <= min_taken) {
    bytes_ -= record_cost(*records_.front());
    base_lsn_ = records_.front()->lsn;
    records_.pop_front();
  }
  if (records_.empty()) base_lsn_ = last_lsn_;
  space_cv_.notify_all();
}

std::shared_ptr<Journal::Reader> Journal::attach(Lsn after, const std::string& name, bool attaching) {
  std::lock_guard lk(mu_);
  if (after < base_lsn_ || after > last_lsn_) return nullptr;
  auto r = std::make_shared<Reader>();
  r->taken = after;
  r->name = name;
  r->attaching = attaching;
  readers_.insert(r);
  return r;
}

void Journal::set_attaching(const std::shared_ptr<Reader>& reader, bool attaching) {
  std::lock_guard lk(mu_);
  reader->attaching = attaching;
}

void Journal::detach(const std::shared_ptr<Reader>& reader) {
  std::lock_guard lk(mu_);
  readers_.erase(reader);
  evict_locked();
}

bool Journal::read(const std::shared_ptr<Reader>& reader, std::vector<RecordPtr>& out, size_t max_bytes,
                   std::chrono::milliseconds timeout) {
  std::unique_lock lk(mu_);
  new_record_cv_.wait_for(lk, timeout, [&] { return closed_ || reader->cut_off || last_lsn_ > reader->taken; });
  if (closed_ || reader->cut_off) return false;
  if (last_lsn_ <= reader->taken) return true;
  if (reader->taken < base_lsn_) {
    reader->cut_off = true;
    return false;
  }
  // Records are in LSN order; LSNs may have gaps, so find the first one after `taken`.
  auto it = std::upper_bound(records_.begin(), records_.end(), reader->taken,
                             [](Lsn lsn, const RecordPtr& r) { return lsn < r->lsn; });
  size_t bytes = 0;
  for (; it != records_.end(); ++it) {
    if (bytes > 0 && bytes + (*it)->data.size() > max_bytes) break;
    out.push_back(*it);
    bytes += (*it)->data.size() + 64;
    reader->taken = (*it)->lsn;
  }
  evict_locked();
  return true;
}

bool Journal::wait(const std::shared_ptr<Reader>& reader, std::chrono::milliseconds timeout) {
  std::unique_lock lk(mu_);
  new_record_cv_.wait_for(lk, timeout, [&] { return closed_ || reader->cut_off || last_lsn_ > reader->taken; });
  return !closed_ && !reader->cut_off;
}

bool Journal::covers(Lsn lsn) {
  std::lock_guard lk(mu_);
  return lsn >= base_lsn_ && lsn <= last_lsn_;
}

Lsn Journal::last_lsn() {
  std::lock_guard lk(mu_);
  return last_lsn_;
}

uint64_t Journal::bytes_after(Lsn lsn) {
  std::lock_guard lk(mu_);
  uint64_t total = 0;
  for (auto it = records_.rbegin(); it != records_.rend() && (*it)->lsn > lsn; ++it) total += (*it)->data.size();
  return total;
}

size_t Journal::bytes() {
  std::lock_guard lk(mu_);
  return bytes_;
}

void Journal::close() {
  std::lock_guard lk(mu_);
  closed_ = true;
  new_record_cv_.notify_all();
  space_cv_.notify_all();
}

}  // namespace blockrepl
