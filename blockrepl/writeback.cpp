#include "blockrepl/writeback.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>

#include "blockrepl/log.h"

namespace blockrepl {

SequentialRun::Range SequentialRun::wrote(uint64_t offset, uint64_t length) {
  if (length == 0) return {};
  const uint64_t end = offset + length;
  if (offset < start_) {
    // A write just behind what was handed out: a late one of this run. Anything else behind
    // it rewrites the file: a new run starts there.
    if (end <= start_ && start_ - offset <= kSlack) return {};
    start_ = offset;
    end_ = end;
    return {};
  }
  if (offset > end_ + kSlack) {  // a jump ahead: a new run
    start_ = offset;
    end_ = end;
    return {};
  }
  if (end > end_) end_ = end;
  if (end_ - start_ < kWindow + kSlack) return {};
  Range r{start_, end_ - kSlack - start_};
  start_ += r.length;
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
