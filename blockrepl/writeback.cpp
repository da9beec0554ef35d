#include "blockrepl/writeback.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>

#include "blockrepl/log.h"

namespace blockrepl {

void SequentialRun::restart(uint64_t offset, uint64_t end) {
  handed_ = offset;
  prefix_ = end;
  ahead_.clear();
}

SequentialRun::Range SequentialRun::wrote(uint64_t offset, uint64_t length) {
  if (length == 0) return {};
  const uint64_t end = offset + length;
  if (offset < handed_ || offset > prefix_ + kReorder) {
    restart(offset, end);  // a rewrite of what went out, or a jump: a new run
    return {};
  }
  if (offset > prefix_) {
    // Written ahead of the prefix: kept until the gap before it is filled (merged with the
    // pieces it touches, so that a run costs a few entries).
    auto it = ahead_.upper_bound(offset);
    uint64_t lo = offset, hi = end;
    if (it != ahead_.begin() && std::prev(it)->second >= offset) {
      --it;
      lo = it->first;
      hi = std::max(hi, it->second);
      it = ahead_.erase(it);
    }
    while (it != ahead_.end() && it->first <= hi) {
      hi = std::max(hi, it->second);
      it = ahead_.erase(it);
    }
    ahead_.emplace(lo, hi);
    if (ahead_.size() > kMaxPieces) restart(offset, end);  // scattered writes, not a run
    return {};
  }
  if (end > prefix_) prefix_ = end;
  while (!ahead_.empty() && ahead_.begin()->first <= prefix_) {
    prefix_ = std::max(prefix_, ahead_.begin()->second);
    ahead_.erase(ahead_.begin());
  }
  if (prefix_ - handed_ < kWindow) return {};
  Range r{handed_, prefix_ - handed_};
  handed_ = prefix_;
  return r;
}

EarlyWriteback::~EarlyWriteback() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  for (Job& j : queue_) close(j.fd);
}

void EarlyWriteback::wrote(FileId fid, int fd, uint64_t offset, uint64_t length) {
  if (fd < 0) return;
  std::unique_lock lk(mu_);
  if (runs_.size() >= kMaxRuns && !runs_.count(fid)) runs_.clear();
  SequentialRun::Range r = runs_[fid].wrote(offset, length);
  if (r.length == 0 || stop_ || queue_.size() >= kMaxQueued) return;
  // A duplicate outlives the caller's descriptor (the file may be closed before the thread runs).
  int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup_fd < 0) return;
  queue_.push_back({dup_fd, r});
  if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
  lk.unlock();
  cv_.notify_one();
}

uint64_t EarlyWriteback::bytes_started() const {
  std::lock_guard lk(mu_);
  return bytes_started_;
}

void EarlyWriteback::drain() {
  std::unique_lock lk(mu_);
  idle_cv_.wait(lk, [&] { return queue_.empty() && !busy_; });
}

void EarlyWriteback::run() {
  std::unique_lock lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    Job j = queue_.front();
    queue_.pop_front();
    busy_ = true;
    lk.unlock();
    // Starts the writes without waiting for them; errors surface at the file's next fsync.
    int rc = sync_file_range(j.fd, static_cast<off64_t>(j.range.offset), static_cast<off64_t>(j.range.length),
                             SYNC_FILE_RANGE_WRITE);
    if (rc != 0) LOG_DEBUG("early writeback of %llu bytes at %llu: %s", static_cast<unsigned long long>(j.range.length),
                           static_cast<unsigned long long>(j.range.offset), strerror(errno));
    close(j.fd);
    lk.lock();
    busy_ = false;
    if (rc == 0) bytes_started_ += j.range.length;
    if (queue_.empty()) idle_cv_.notify_all();
  }
}

}  // namespace blockrepl
