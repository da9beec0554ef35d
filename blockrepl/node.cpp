#include "blockrepl/node.h"


#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <fcntl.h>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/log.h"
#include "blockrepl/trace.h"

namespace blockrepl {

namespace {
int open_root(const std::string& path) {
  int fd = open(path.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_errno("cannot open data directory " + path, errno);
  return fd;
}
}  // namespace

Node::Node(const std::string& data_path)
    : data_path_(data_path), root_fd_(open_root(data_path)), store_(root_fd_, false) {
  try {
    meta_fd_ = open_metadata_dir(root_fd_, data_path_);
    identity_ = load_or_create_identity(meta_fd_, data_path_);
    if (!read_file_id(root_fd_, "")) {
      if (int err = write_file_id(root_fd_, "", kRootFileId))
        throw_errno("cannot tag data directory " + data_path_ + " with its file id (xattrs unsupported?)", err);
    }
    // Continue past every LSN a previous run may have handed out.
    last_lsn_ = identity_.lsn_reserved;
    identity_.lsn_reserved += kLsnChunk;
    store_identity(meta_fd_, identity_, data_path_);
  } catch (...) {
    if (meta_fd_ >= 0) close(meta_fd_);
    close(root_fd_);
    throw;
  }
}

Node::~Node() {
  if (meta_fd_ >= 0) close(meta_fd_);
  if (root_fd_ >= 0) close(root_fd_);
}

Identity Node::identity() const {
  std::lock_guard lk(identity_mu_);
  return identity_;
}

void Node::update_identity(const std::function<void(Identity&)>& change) {
  std::lock_guard lk(identity_mu_);
  Identity next = identity_;
  change(next);
  store_identity(meta_fd_, next, data_path_);
  identity_ = next;
}

Lsn Node::next_lsn_locked() {
  Lsn lsn = last_lsn_.load(std::memory_order_relaxed) + 1;
  if (lsn >= identity_.lsn_reserved) {
    try {
      update_identity([&](Identity& id) { id.lsn_reserved = lsn + kLsnChunk; });
    } catch (const Error& e) {
      // Keep going: the reservation only matters after a crash, and refusing writes is worse.
      LOG_ERROR("lsn %llu: %s", static_cast<unsigned long long>(lsn), e.what());
    }
  }
  return lsn;
}

// Replicas give files and directories the master's resulting times, not their own clock's.
void Node::stamp(Record& rec, const Stamps& s) {
  if (s.mtime.tv_nsec >= 0) {
    rec.mtime = s.mtime;
    rec.attr_valid |= kAttrStampMtime;
  }
  if (s.atime.tv_nsec >= 0) {
    rec.atime = s.atime;
    rec.attr_valid = (rec.attr_valid & ~kAttrAtimeNow) | kAttrAtime;
  }
  if (s.set_mtime.tv_nsec >= 0) {
    rec.mtime = s.set_mtime;
    rec.attr_valid = (rec.attr_valid & ~kAttrMtimeNow) | kAttrMtime;
  }
  if (s.dir_mtime.tv_nsec >= 0) {
    rec.dir_mtime = s.dir_mtime;
    rec.dir2_mtime = s.dir2_mtime.tv_nsec >= 0 ? s.dir2_mtime : s.dir_mtime;
    rec.attr_valid |= kAttrStampDirs;
  }
}

int Node::submit(Record& rec, const Targets& t) {
  if (!has_sinks_.load(std::memory_order_acquire)) {
    // Nobody replays these records: the order in which concurrent changes reach the disk need
    // not match their LSNs, so apply them in parallel (FUSE writeback sends many at once).
    {
      TraceTimer timer(TraceStage::master_apply);
      if (int err = store_.apply(rec, t)) return err;
    }
    std::lock_guard lk(order_mu_);
    rec.lsn = next_lsn_locked();
    last_lsn_.store(rec.lsn, std::memory_order_release);
    return 0;
  }
  for (RecordSink* s : sinks_) s->wait_for_room();
  // Applied outside the ordering lock, beside changes to other files (apply_gate.h says why
  // that replays to the same state); published under it. The pass is held until the record is
  // published, so a conflicting change applied after this one is also published after it.
  ApplyGate::Pass pass = gate_.enter(rec);
  Stamps stamps;
  int err;
  {
    TraceTimer timer(TraceStage::master_apply);
    err = store_.apply(rec, t, &stamps);
  }
  if (err && stamps.written > 0 && rec.op == Op::write) {
    // What reached the disk before it filled reaches the replicas too; the caller gets the error.
    Record part = rec;
    part.data = rec.data.substr(0, stamps.written);
    stamp(part, stamps);
    publish(part);
    return err;
  }
  if (err) return err;
  stamp(rec, stamps);
  publish(rec);
  return 0;
}

void Node::publish(Record& rec) {
  std::lock_guard lk(order_mu_);
  rec.lsn = next_lsn_locked();
  for (RecordSink* s : sinks_) s->on_record(rec);
  last_lsn_.store(rec.lsn, std::memory_order_release);
}

int Node::barrier(Record& rec, const Targets& t) {
  std::mutex mu;
  std::condition_variable cv;
  bool answered = false;
  int result = 0;
  barrier_async(rec, t, [&](int err) {
    std::lock_guard lk(mu);
    result = err;
    answered = true;
    cv.notify_one();
  });
  std::unique_lock lk(mu);
  cv.wait(lk, [&] { return answered; });
  return result;
}

void Node::barrier_async(Record& rec, const Targets& t, BarrierDone done) {
  BarrierWaiter waiter;
  std::function<void(Lsn)> pusher;
  for (RecordSink* s : sinks_) s->wait_for_room();
  {
    std::lock_guard lk(order_mu_);
    rec.lsn = next_lsn_locked();
    pusher = barrier_pusher_;
    for (RecordSink* s : sinks_) pusher ? s->on_record_pushed(rec) : s->on_record(rec);
    last_lsn_.store(rec.lsn, std::memory_order_release);
    waiter = barrier_waiter_;
  }
  if (pusher) pusher(rec.lsn);
  // The record is already on its way to the slaves: local and remote durability overlap.
  int err;
  {
    TraceTimer timer(TraceStage::master_flush);
    err = store_.apply(rec, t);
  }
  if (!waiter) return done(err);
  const auto flushed = Trace::on() ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  // A local failure wins over the slaves' answer, but the barrier still waits for them: what
  // the caller hears last is the whole story.
  waiter(rec.lsn, [err, flushed, done = std::move(done)](int remote) {
    if (flushed != std::chrono::steady_clock::time_point{})
      Trace::add(TraceStage::master_wait_slaves, std::chrono::steady_clock::now() - flushed);
    done(err ? err : remote);
  });
}

int Node::apply_received(const Record& rec, bool replay) {
  for (RecordSink* s : sinks_) s->wait_for_room();
  std::lock_guard lk(order_mu_);
  if (!rec.is_barrier()) {
    int err = replay ? store_.apply_replayed(rec) : store_.apply(rec);
    if (err) return err;
  }
  for (RecordSink* s : sinks_) s->on_record(rec);
  last_lsn_.store(rec.lsn, std::memory_order_release);
  return 0;
}

void Node::set_barrier_waiter(BarrierWaiter waiter, std::function<void(Lsn)> pusher) {
  std::lock_guard lk(order_mu_);
  barrier_waiter_ = std::move(waiter);
  barrier_pusher_ = std::move(pusher);
}

void Node::close_clean() {
  std::lock_guard lk(order_mu_);
  try {
    update_identity([&](Identity& id) { id.lsn_reserved = last_lsn(); });
  } catch (const Error& e) {
    LOG_WARN("%s", e.what());
  }
}

void Node::reset_history(Lsn lsn) {
  std::lock_guard lk(order_mu_);
  last_lsn_.store(lsn, std::memory_order_release);
  for (RecordSink* s : sinks_) s->on_reset(lsn);
}

void Node::add_sink(RecordSink* sink) {
  std::lock_guard lk(order_mu_);
  sinks_.push_back(sink);
  has_sinks_ = true;
}

void Node::remove_sink(RecordSink* sink) {
  std::lock_guard lk(order_mu_);
  sinks_.erase(std::remove(sinks_.begin(), sinks_.end(), sink), sinks_.end());
  has_sinks_ = !sinks_.empty();
}

}  // namespace blockrepl
