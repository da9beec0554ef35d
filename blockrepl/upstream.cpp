#include "blockrepl/upstream.h"

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstring>
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "blockrepl/attach.h"
#include "blockrepl/copy.h"
#include "blockrepl/handshake.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/merkle.h"
#include "blockrepl/error.h"
#include "blockrepl/log.h"
#include "blockrepl/trace.h"

namespace blockrepl {

struct Upstream::PendingPeer {
  std::unique_ptr<HandshakeResponder> handshake;
  std::chrono::steady_clock::time_point deadline;
};

struct Upstream::Session {
  std::unique_ptr<Connection> conn;
  std::string node_id;
  std::string listen;  // the slave's own listen address, if any
  AckLevel level = AckLevel::sync;
  std::atomic<bool> streaming{false};
  std::atomic<bool> dead{false};
  std::atomic<Lsn> sent{0}, received{0}, durable{0};
  // When its acknowledgements last moved forward (under mu_): a slave that keeps acknowledging
  // more is slow (a long burst on a slow link), not gone.
  std::chrono::steady_clock::time_point last_progress;
  // Dropped for silence before: barriers do not wait for it until it acknowledges
  // probation_until (under mu_).
  bool probation = false;
  Lsn probation_until = 0;
  BatchEncoder encoder;  // compresses its batches when the welcome said so
  std::thread thread;
  // Whoever sends records holds send_mu: the session's own sender thread, or a barrier's thread
  // pushing its record (Upstream::push). The reader is set before `streaming`.
  std::mutex send_mu;
  std::shared_ptr<Journal::Reader> reader;
  std::chrono::steady_clock::time_point last_send;  // under send_mu
  size_t last_batch_bytes = 0;                       // data in the last batch sent (under send_mu)
};

namespace {

// How long the sender lets a trickle of small records gather (Upstream::stream), and what a
// "small" last batch is. Measured on the 2-core VM (README, Benchmarks).
constexpr auto kLinger = std::chrono::microseconds(1000);
constexpr size_t kLingerBelowBytes = 256 << 10;

void set_lineage(capnp::List<wire::LineageEntry>::Builder out, const std::vector<LineageEntry>& in) {
  for (unsigned i = 0; i < in.size(); i++) {
    out[i].setId(in[i].id);
    out[i].setFirstLsn(in[i].first_lsn);
  }
}

std::vector<LineageEntry> get_lineage(capnp::List<wire::LineageEntry>::Reader in) {
  std::vector<LineageEntry> out;
  for (auto e : in) out.push_back({e.getId(), e.getFirstLsn()});
  return out;
}

}  // namespace

// Every variable-length field of a hello within its limit, checked before anything of it is used
// (a hello is accepted before the session's thread exists: only its size is trusted so far).
void check_hello_sizes(wire::Hello::Reader h, const std::string& peer) {
  check_field_size(h.getNodeId().size(), kMaxIdBytes, "node id", peer, "hello");
  check_field_size(h.getClusterId().size(), kMaxIdBytes, "cluster id", peer, "hello");
  check_field_size(h.getHashAlgorithm().size(), kMaxHashNameBytes, "hash algorithm", peer, "hello");
  check_field_size(h.getListenAddress().size(), kMaxAddressBytes, "listen address", peer, "hello");
  check_lineage_sizes(h.getLineage(), peer, "hello");
  if (h.getCodecs().size() > kMaxCodecsListed)
    throw Error("hello from " + peer + ": codecs lists " + std::to_string(h.getCodecs().size()) + " entries (at most " +
                    std::to_string(kMaxCodecsListed) + ")",
                EPROTO);
}

namespace {

// Events a flood repeats are logged at most kLinesPerSecond times a second; the next line says
// how many were not.
class RateLimitedLog {
 public:
  static constexpr unsigned kLinesPerSecond = 10;
  // Logs `line` as a warning unless too many were logged this second.
  void warn(const std::string& line) {
    uint64_t skipped;
    if (!allow(&skipped)) return;
    if (skipped > 0) LOG_WARN("%s (%" PRIu64 " similar lines left out)", line.c_str(), skipped);
    else LOG_WARN("%s", line.c_str());
  }

 private:
  // Whether to log now; *suppressed is how many were skipped since the last line.
  bool allow(uint64_t* suppressed) {
    const auto now = std::chrono::steady_clock::now();
    if (now - window_start_ >= std::chrono::seconds(1)) {
      window_start_ = now;
      lines_ = 0;
    }
    if (lines_ == kLinesPerSecond) {
      skipped_++;
      return false;
    }
    lines_++;
    *suppressed = std::exchange(skipped_, 0);
    return true;
  }

  std::chrono::steady_clock::time_point window_start_{};
  unsigned lines_ = 0;
  uint64_t skipped_ = 0;
};

// Used by accept threads only: one of each per thread.
thread_local RateLimitedLog over_cap_log, handshake_failure_log;


wire::AttachMethod wire_method(AttachDecision::Method m) {
  switch (m) {
    case AttachDecision::Method::stream: return wire::AttachMethod::STREAM;
    case AttachDecision::Method::merkle: return wire::AttachMethod::MERKLE;
    default: return wire::AttachMethod::FULL;
  }
}

}  // namespace

void Upstream::send_welcome(Connection& conn, const Identity& me, wire::AttachMethod method, Lsn start_lsn, AckLevel level,
                            const std::string& notice, const Compression& codec) {
  capnp::MallocMessageBuilder mb;
  auto w = mb.initRoot<wire::Message>().initWelcome();
  w.setProtocolVersion(kProtocolVersion);
  w.setClusterId(me.cluster_id);
  w.setNodeId(me.node_id);
  w.setBlockSize(me.block_size);
  set_lineage(w.initLineage(static_cast<unsigned>(me.lineage.size())), me.lineage);
  w.setMethod(method);
  w.setStartLsn(start_lsn);
  w.setLastLsn(node_.last_lsn());
  w.setAckLevel(static_cast<wire::AckLevel>(static_cast<uint16_t>(level)));
  w.setNotice(notice);
  set_welcome_compression(w, codec);
  conn.send(mb);
}

Upstream::Upstream(Node& node, Journal& journal, UpstreamConfig cfg) : node_(node), journal_(journal), cfg_(std::move(cfg)) {}

Upstream::~Upstream() { stop(); }

void Upstream::start(int listen_fd) {
  listen_fd_ = listen_fd;
  // The accept thread never blocks on one socket: it drains the listener and the pending peers.
  fcntl(listen_fd_, F_SETFL, fcntl(listen_fd_, F_GETFL) | O_NONBLOCK);
  wake_fd_.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_fd_) throw_errno("cannot create the upstream's wake-up eventfd", errno);
  accept_thread_ = std::thread([this] { accept_loop(); });
  timer_thread_ = std::thread([this] { expire_loop(); });
  LOG_INFO("serving slaves on %s (ack %s)", cfg_.listen_address.c_str(), ack_level_name(cfg_.ack));
}

void Upstream::stop() {
  if (stopping_.exchange(true)) return;
  if (wake_fd_) {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t w = write(wake_fd_.get(), &one, sizeof one);
  }
  if (accept_thread_.joinable()) accept_thread_.join();
  if (listen_fd_ >= 0) close(listen_fd_);
  listen_fd_ = -1;
  std::list<std::shared_ptr<Session>> sessions;
  {
    std::lock_guard lk(mu_);
    sessions = sessions_;
  }
  for (auto& s : sessions) s->conn->shutdown();
  sessions.clear();
  std::vector<std::thread> finished;
  {
    std::unique_lock lk(mu_);
    retired_cv_.wait(lk, [this] { return sessions_.empty(); });
    finished.swap(finished_);
  }
  for (auto& t : finished) t.join();
  {
    std::lock_guard lk(mu_);  // the timer checks stopping_ under mu_: no lost wake-up
  }
  timer_cv_.notify_all();
  if (timer_thread_.joinable()) timer_thread_.join();
  // No slave is left: what is pending completes as min_sync_slaves says (0 needs none).
  settle();
  std::multimap<Lsn, PendingBarrier> left;
  {
    std::lock_guard lk(mu_);
    left.swap(barriers_);
  }
  for (auto& [lsn, b] : left) b.done(EIO);
}

namespace {

// How long the accept thread may sleep: until the earliest handshake deadline, and at most a
// second, so that ended sessions' threads are joined soon.
template <class Pending>
int poll_timeout_ms(const Pending& pending) {
  auto wake = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  for (auto& p : pending) wake = std::min(wake, p->deadline);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(wake - std::chrono::steady_clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(ms + 1, 0, 1000));
}

}  // namespace

void Upstream::accept_loop() {
  PendingPeers pending;
  std::vector<pollfd> fds;
  // Out of descriptors, the listener stays readable: rest it a moment rather than spin.
  auto listener_rests_until = std::chrono::steady_clock::time_point{};
  while (!stopping_) {
    fds.clear();
    fds.push_back({wake_fd_.get(), POLLIN, 0});
    const bool listener_rests = std::chrono::steady_clock::now() < listener_rests_until;
    fds.push_back({listener_rests ? -1 : listen_fd_, POLLIN, 0});
    for (auto& p : pending) fds.push_back({p->handshake->fd(), p->handshake->poll_events(), 0});
    int r = poll(fds.data(), fds.size(), poll_timeout_ms(pending));
    if (r < 0 && errno != EINTR) {
      LOG_ERROR("upstream on %s: poll failed: %s; no more slaves are accepted", cfg_.listen_address.c_str(), strerror(errno));
      break;
    }
    if (stopping_ || (r > 0 && fds[0].revents)) break;
    if (r > 0) {
      for (size_t i = 0; i < pending.size(); i++)
        if (fds[i + 2].revents && advance_handshake(pending[i])) pending[i].reset();
      std::erase(pending, nullptr);
      if (fds[1].revents && !accept_pending(pending))
        listener_rests_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
    }
    close_expired(pending);
    join_finished_sessions();
  }
  // Pending peers close as `pending` goes.
}

bool Upstream::accept_pending(PendingPeers& pending) {
  for (;;) {
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
      // Out of descriptors, most likely: say so (rarely); the caller rests the listener.
      over_cap_log.warn("upstream on " + cfg_.listen_address + ": accept failed: " + strerror(errno));
      return false;
    }
    auto p = std::make_unique<PendingPeer>();
    try {
      p->handshake = std::make_unique<HandshakeResponder>(OwnedFd(fd), peer_name_of(fd), cfg_.security, node_.identity().cluster_id);
    } catch (const std::exception& e) {
      over_cap_log.warn("upstream on " + cfg_.listen_address + ": " + e.what());
      continue;
    }
    p->deadline = std::chrono::steady_clock::now() + cfg_.handshake_deadline;
    if (pending.size() >= cfg_.max_pending_handshakes) make_room(pending);
    pending.push_back(std::move(p));
  }
}

// At the cap, the connection that has waited longest goes, after a last read: a slave sends its
// hello as soon as it connects, so it is through long before it is the oldest, while a peer that
// holds connections open idle cannot keep the newcomers (real slaves among them) out.
void Upstream::make_room(PendingPeers& pending) {
  auto& oldest = pending.front();
  if (!advance_handshake(oldest))
    over_cap_log.warn("closed connection from " + oldest->handshake->peer() + ": " + std::to_string(pending.size()) +
                      " connections wait for their handshake, it waited longest");
  pending.erase(pending.begin());
}

bool Upstream::advance_handshake(std::unique_ptr<PendingPeer>& p) {
  try {
    auto frame = p->handshake->advance();
    if (!frame) return false;  // nothing more for now
    check_hello_sizes(frame->root().getHello(), p->handshake->peer());
    start_session(std::move(p), std::move(frame));
  } catch (const Error& e) {
    // A refusal names the peer already ("refused PEER: ..."); anything else is a broken handshake.
    handshake_failure_log.warn(e.errno_value() == EACCES ? e.what() : std::string("refused before its hello was accepted: ") + e.what());
  } catch (const std::exception& e) {
    handshake_failure_log.warn(std::string("refused before its hello was accepted: ") + e.what());
  }
  return true;
}

void Upstream::close_expired(PendingPeers& pending) {
  const auto now = std::chrono::steady_clock::now();
  std::erase_if(pending, [&](const std::unique_ptr<PendingPeer>& p) {
    if (p->deadline > now) return false;
    handshake_failure_log.warn("closed connection from " + p->handshake->peer() + ": its handshake was not through within " +
                               std::to_string(cfg_.handshake_deadline.count() / 1000.0).substr(0, 4) + " s");
    return true;
  });
}

void Upstream::start_session(std::unique_ptr<PendingPeer> p, std::unique_ptr<Frame> hello) {
  // The session's thread blocks on its socket; sends time out so that a slave that stops
  // reading cannot block us forever.
  auto s = std::make_shared<Session>();
  s->conn = p->handshake->take_connection();
  s->conn->start_session(cfg_.ack_timeout);
  std::lock_guard lk(mu_);  // held while s->thread is assigned: retire() takes it first
  sessions_.push_back(s);
  s->thread = std::thread([this, s, h = std::move(hello)]() mutable { serve(s, std::move(h)); });
}

void Upstream::retire(const std::shared_ptr<Session>& s) {
  {
    std::lock_guard lk(mu_);
    sessions_.remove(s);
    finished_.push_back(std::move(s->thread));
  }
  retired_cv_.notify_all();
}

void Upstream::join_finished_sessions() {
  std::vector<std::thread> finished;
  {
    std::lock_guard lk(mu_);
    finished.swap(finished_);
  }
  for (auto& t : finished) t.join();
}

void Upstream::drop(Session& s, const std::string& why) {
  if (!s.dead.exchange(true)) {
    LOG_WARN("slave %s (%s) dropped: %s", s.conn->peer().c_str(), s.node_id.c_str(), why.c_str());
    s.conn->shutdown();
  }
  settle();  // barriers that waited for it may be confirmed without it
}

void Upstream::serve(std::shared_ptr<Session> sp, std::unique_ptr<Frame> hello) {
  run_session(sp, std::move(hello));
  retire(sp);
  // The last reference to the session (and its socket) is this thread's: it closes as it ends.
}

void Upstream::run_session(std::shared_ptr<Session> sp, std::unique_ptr<Frame> frame) {
  Session& s = *sp;
  Connection& conn = *s.conn;
  std::thread ack_thread;
  std::shared_ptr<Journal::Reader> reader;
  try {
    auto hello = frame->root().getHello();  // the accept thread checked its kind and sizes
    const Identity me = node_.identity();
    s.node_id = hello.getNodeId();
    s.listen = hello.getListenAddress();
    HashIndex* hashes = node_.store().hashes();
    const AttachHello said = hello_of(hello);
    AttachServer server;
    server.node_id = me.node_id;
    server.cluster_id = me.cluster_id;
    server.block_size = me.block_size;
    server.lineage = me.lineage;
    server.last_lsn = node_.last_lsn();
    server.has_hashes = hashes != nullptr;
    server.journal_covers_their_lsn = journal_.covers(said.durable_lsn);
    AttachDecision d = decide_attach(server, said);
    if (d.method == AttachDecision::Method::stream && !(reader = journal_.attach(said.durable_lsn, conn.peer()))) {
      // The journal let go of those records since we asked: decide again without them.
      server.journal_covers_their_lsn = false;
      d = decide_attach(server, said);
    }
    if (d.method == AttachDecision::Method::refuse) {
      LOG_WARN("refused slave %s: %s", conn.peer().c_str(), d.refusal.c_str());
      conn.send_error(d.refusal, d.fatal);
      throw Error(d.refusal);
    }
    s.level = std::min(cfg_.ack, static_cast<AckLevel>(static_cast<int>(hello.getAckLevel())));
    if (d.fork)
      LOG_WARN("slave %s diverged after lsn %" PRIu64 " (its lineage %s, ours %s): rewriting it as it asked", conn.peer().c_str(),
               d.fork->lsn, d.fork->theirs.c_str(), d.fork->ours.c_str());
    else if (!d.notice.empty())
      LOG_INFO("slave %s asked to discard its data but has not diverged: nothing of it is discarded", conn.peer().c_str());

    if (d.verify_only) {
      send_welcome(conn, me, wire::AttachMethod::MERKLE, node_.last_lsn(), s.level);
      LOG_INFO("slave %s (node %s) verifies against us at lsn %" PRIu64, conn.peer().c_str(), s.node_id.c_str(), node_.last_lsn());
      serve_merkle_diff(conn, node_.root_fd(), *hashes, cfg_.assign_ids, hello.getDeep(), 60000);
      capnp::MallocMessageBuilder mb;
      mb.initRoot<wire::Message>().initMerkleDone().setLsn(node_.last_lsn());
      conn.send(mb);
      conn.receive(10000);  // until the slave hangs up
      s.dead = true;
      return;
    }

    const wire::AttachMethod method = wire_method(d.method);
    Lsn start_lsn;
    if (d.start == AttachDecision::Start::their_lsn) {
      start_lsn = said.durable_lsn;  // `reader` resumes there
    } else {
      if (!said.empty)
        LOG_INFO("slave %s at lsn %" PRIu64 " cannot stream (%s; we are at %" PRIu64 "): %s", conn.peer().c_str(),
                 said.durable_lsn, d.why_not_stream.c_str(), journal_.last_lsn(), attach_method_name(d.method));
      // Hold every record from here on for the slave, then compare or copy the tree as it is.
      start_lsn = node_.last_lsn();
      journal_.set_start(start_lsn);
      reader = journal_.attach(journal_.last_lsn(), conn.peer(), true);
      if (!reader) throw Error("cannot start an attach: journal unavailable");
      start_lsn = reader->taken;
    }
    s.encoder.start(choose_compression(cfg_.compress, hello));
    if (s.encoder.compression().on())
      LOG_INFO("slave %s: records compressed with %s%s", conn.peer().c_str(), compression_name(s.encoder.compression()).c_str(),
               cfg_.compress.on() ? "" : " (it asked)");
    send_welcome(conn, me, method, start_lsn, s.level, d.notice, s.encoder.compression());
    LOG_INFO("slave %s (node %s) attaching by %s from lsn %" PRIu64, conn.peer().c_str(), s.node_id.c_str(),
             attach_method_name(d.method), start_lsn);
    s.sent = s.received = s.durable = start_lsn;
    if (method == wire::AttachMethod::FULL) {
      CopyStats st = send_full_copy(conn, node_.root_fd(), cfg_.assign_ids);
      capnp::MallocMessageBuilder mb;
      auto done = mb.initRoot<wire::Message>().initCopyDone();
      done.setLsn(node_.last_lsn());
      done.setFiles(st.files);
      done.setBytes(st.bytes);
      done.setRootMtimeSec(st.root_mtime.tv_sec);
      done.setRootMtimeNsec(st.root_mtime.tv_nsec);
      conn.send(mb);
      journal_.set_attaching(reader, false);
      LOG_INFO("slave %s: full copy sent (%" PRIu64 " files, %" PRIu64 " bytes)", conn.peer().c_str(), st.files, st.bytes);
    } else if (method == wire::AttachMethod::MERKLE) {
      const uint64_t sent_before = conn.bytes_sent();
      serve_merkle_diff(conn, node_.root_fd(), *hashes, cfg_.assign_ids, false,
                        static_cast<int>(std::max<int64_t>(cfg_.ack_timeout.count(), 60000)));
      capnp::MallocMessageBuilder mb;
      mb.initRoot<wire::Message>().initMerkleDone().setLsn(node_.last_lsn());
      conn.send(mb);
      journal_.set_attaching(reader, false);
      LOG_INFO("slave %s: Merkle diff answered (%" PRIu64 " bytes sent)", conn.peer().c_str(), conn.bytes_sent() - sent_before);
    }
    ack_thread = std::thread([this, sp] { read_acks(sp); });
    {
      std::lock_guard lk(mu_);
      if (silent_nodes_.count(s.node_id)) {
        // It let barriers wait for an ack timeout before: until it shows that it answers again,
        // it costs them nothing (a stalled or hostile slave that reconnects cannot hold every
        // barrier for --ack-timeout again and again).
        s.probation = true;
        s.probation_until = std::max(s.sent.load(), node_.last_lsn());
        LOG_WARN("slave %s (%s) was dropped for not acknowledging: barriers do not wait for it until it acknowledges lsn %" PRIu64,
                 conn.peer().c_str(), s.node_id.c_str(), s.probation_until);
      }
      s.reader = reader;
      s.last_progress = std::chrono::steady_clock::now();
      s.streaming = true;
    }
    stream(s);
  } catch (const std::exception& e) {
    drop(s, e.what());
  }
  s.streaming = false;
  drop(s, "session ended");
  if (reader) journal_.detach(reader);
  if (ack_thread.joinable()) ack_thread.join();
}

void Upstream::stream(Session& s) {
  size_t lineage_sent = node_.identity().lineage.size();
  {
    std::lock_guard send(s.send_mu);
    s.last_send = std::chrono::steady_clock::now();
  }
  while (!s.dead && !stopping_) {
    // A promotion here started a new lineage: our slaves adopt it, so that they can resume from
    // us (or a sibling on it) by stream later.
    if (Identity me = node_.identity(); me.lineage.size() != lineage_sent) {
      capnp::MallocMessageBuilder mb;
      auto hb = mb.initRoot<wire::Message>().initHeartbeat();
      hb.setLsn(node_.last_lsn());
      set_lineage(hb.initLineage(static_cast<unsigned>(me.lineage.size())), me.lineage);
      std::lock_guard send(s.send_mu);
      s.conn->send(mb);
      lineage_sent = me.lineage.size();
    }
    if (!journal_.wait(s.reader, std::chrono::milliseconds(200))) {
      if (s.reader->cut_off) throw Error("it fell too far behind the journal");
      return;
    }
    // A trickle of small changes (a database's commits) waits a moment for the next ones: one
    // batch, one send and one wake-up of the slave for several of them, on cores the
    // application shares. Nothing waits for these records meanwhile: a barrier sends its own
    // (push) and an async slave is not waited for. A busy stream (large batches) never waits,
    // nor does one that barriers wait for when it holds a barrier its pusher could not send
    // (this sender was sending): that barrier's p99 was the linger.
    const bool barrier_waits = s.level != AckLevel::async && journal_.last_barrier_lsn() > s.reader->taken;
    if (s.last_batch_bytes < kLingerBelowBytes && !barrier_waits) std::this_thread::sleep_for(kLinger);
    std::lock_guard send(s.send_mu);
    const Lsn sent_before = s.sent;
    if (!send_next(s, 4u << 20)) throw Error("it fell too far behind the journal");
    auto now = std::chrono::steady_clock::now();
    if (s.sent == sent_before && now - s.last_send >= kHeartbeatInterval) {
      capnp::MallocMessageBuilder mb;
      mb.initRoot<wire::Message>().initHeartbeat().setLsn(node_.last_lsn());
      s.conn->send(mb);
      s.last_send = now;
    }
  }
}

bool Upstream::send_next(Session& s, size_t max_bytes) {
  std::vector<RecordPtr> batch;
  if (!journal_.read(s.reader, batch, max_bytes, std::chrono::milliseconds(0))) return !s.reader->cut_off;
  if (batch.empty()) return true;
  TraceTimer timer(TraceStage::master_send);
  capnp::MallocMessageBuilder mb;
  auto list = mb.initRoot<wire::Message>().initBatch().initRecords(static_cast<unsigned>(batch.size()));
  for (unsigned i = 0; i < batch.size(); i++) to_wire(*batch[i], list[i]);
  s.sent = batch.back()->lsn;  // before sending: the slave may acknowledge before send() returns
  s.encoder.send(*s.conn, mb);  // compressed if the session is and it pays off (under send_mu)
  s.last_batch_bytes = 0;
  for (auto& r : batch) s.last_batch_bytes += r->data.size();
  s.last_send = std::chrono::steady_clock::now();
  return true;
}

void Upstream::push(Lsn lsn) {
  // At most this much is sent from a barrier's thread; a stream with more to send is busy, and
  // its sender thread is awake anyway.
  constexpr size_t kPushMaxBytes = 1u << 20;
  std::vector<std::shared_ptr<Session>> targets;
  bool wake = false;
  {
    std::lock_guard lk(mu_);
    for (auto& s : sessions_) {
      if (s->dead || !s->streaming) continue;
      // Nothing waits for an async slave or one on probation: their own sender takes it.
      if (s->level == AckLevel::async || s->probation) wake = true;
      else targets.push_back(s);
    }
  }
  for (auto& sp : targets) {
    Session& s = *sp;
    std::unique_lock send(s.send_mu, std::try_to_lock);
    if (!send) {
      wake = true;  // its sender is sending: it looks at the journal again when done
      continue;
    }
    try {
      if (!send_next(s, kPushMaxBytes) || s.sent < lsn) wake = true;
    } catch (const std::exception& e) {
      send.unlock();
      drop(s, e.what());
    }
  }
  if (wake) journal_.wake_readers();
}

void Upstream::read_acks(std::shared_ptr<Session> sp) {
  Session& s = *sp;
  // A live slave answers every batch and heartbeat; silence this long means it is gone.
  const int timeout_ms = static_cast<int>(std::max<int64_t>(cfg_.ack_timeout.count(), 3 * kHeartbeatInterval.count()));
  // Except before its first answer: after a Merkle diff or a full copy it applies what it
  // received before it streams (a stage of 200,000 files took 15 s), and it was dropped for
  // that again and again. It gets as long as the diff itself (serve_merkle_diff); a barrier
  // meanwhile still waits only --ack-timeout for it.
  const int first_timeout_ms = std::max(timeout_ms, static_cast<int>(std::max<int64_t>(cfg_.ack_timeout.count(), 60000)));
  bool answered = false;
  try {
    while (!s.dead) {
      auto frame = s.conn->receive(answered ? timeout_ms : first_timeout_ms);
      answered = true;
      if (!frame) throw Error("it closed the connection");
      auto msg = frame->root();
      switch (msg.which()) {
        case wire::Message::ACK: {
          auto ack = msg.getAck();
          Lsn r = ack.getReceivedLsn(), d = ack.getDurableLsn();
          if (r > s.sent.load() || d > r) throw Error("it acknowledged records it was never sent", EPROTO);
          {
            std::lock_guard lk(mu_);
            if (r > s.received || d > s.durable) s.last_progress = std::chrono::steady_clock::now();
            if (r > s.received) s.received = r;
            if (d > s.durable) s.durable = d;
            if (s.probation && (s.level == AckLevel::sync ? d : r) >= s.probation_until) {
              s.probation = false;
              silent_nodes_.erase(s.node_id);
              LOG_INFO("slave %s (%s) acknowledges again: barriers wait for it", s.conn->peer().c_str(), s.node_id.c_str());
            }
          }
          settle();  // the barriers this completes get their answer from this thread
          break;
        }
        case wire::Message::ERROR:
          check_field_size(msg.getError().getReason().size(), kMaxReasonBytes, "reason", s.conn->peer(), "error");
          throw Error(std::string("it reported: ") + msg.getError().getReason().cStr());
        default:
          throw Error("it sent an unexpected message", EPROTO);
      }
    }
  } catch (const Error& e) {
    if (e.errno_value() == ETIMEDOUT) note_silent(s);
    drop(s, e.what());
  } catch (const std::exception& e) {
    drop(s, e.what());
  }
}

void Upstream::note_silent(const Session& s) {
  std::lock_guard lk(mu_);
  note_silent_locked(s);
}

void Upstream::note_silent_locked(const Session& s) {
  // Bounded: past the cap a silent node is simply waited for again.
  if (silent_nodes_.size() < kMaxSilentNodes) silent_nodes_.insert(s.node_id);
}

template <class ShortOf>
unsigned Upstream::holding_locked(Lsn lsn, ShortOf&& short_of) const {
  unsigned holding = 0;
  for (auto& s : sessions_) {
    if (s->dead || !s->streaming || s->level == AckLevel::async) continue;
    const Lsn have = s->level == AckLevel::sync ? s->durable.load() : s->received.load();
    if (have >= lsn) holding++;
    else short_of(s);
  }
  return holding;
}

bool Upstream::confirmed_locked(Lsn lsn) const {
  bool waits = false;
  const unsigned confirmed = holding_locked(lsn, [&](const std::shared_ptr<Session>& s) {
    if (!s->probation) waits = true;  // one on probation only counts towards the minimum
  });
  return !waits && confirmed >= cfg_.min_sync_slaves;
}

void Upstream::when_confirmed(Lsn lsn, std::function<void(int)> done) {
  if (cfg_.ack == AckLevel::async && cfg_.min_sync_slaves == 0) return done(0);
  int result = 0;
  {
    std::lock_guard lk(mu_);
    if (!confirmed_locked(lsn)) {
      if (stopping_) {
        result = EIO;  // stopped: no acknowledgement will come and the timer is gone (stop())
      } else {
        const bool first = barriers_.empty();
        barriers_.emplace(lsn, PendingBarrier{std::chrono::steady_clock::now() + cfg_.ack_timeout, std::move(done)});
        if (first) timer_cv_.notify_one();  // the timer sleeps until the oldest barrier's deadline
        return;
      }
    }
  }
  done(result);
}

void Upstream::settle() {
  std::vector<std::function<void(int)>> ready;
  {
    std::lock_guard lk(mu_);
    // Confirmation is monotonic in the LSN: once one is not confirmed, no later one is.
    while (!barriers_.empty() && confirmed_locked(barriers_.begin()->first)) {
      ready.push_back(std::move(barriers_.begin()->second.done));
      barriers_.erase(barriers_.begin());
    }
  }
  for (auto& done : ready) done(0);
}

void Upstream::expire_loop() {
  std::unique_lock lk(mu_);
  while (!stopping_) {
    if (barriers_.empty()) {
      timer_cv_.wait(lk);
      continue;
    }
    // Deadlines follow registration, nearly LSN order: the earliest is among the first few.
    auto oldest = barriers_.begin();
    for (auto it = barriers_.begin(); it != barriers_.end(); ++it)
      if (it->second.deadline < oldest->second.deadline) oldest = it;
    if (std::chrono::steady_clock::now() < oldest->second.deadline) {
      timer_cv_.wait_until(lk, oldest->second.deadline);
      continue;
    }
    const Lsn lsn = oldest->first;
    PendingBarrier barrier = std::move(oldest->second);
    barriers_.erase(oldest);
    const std::optional<int> result = expire_locked(lsn, barrier.deadline, lk);
    if (result) {
      lk.unlock();
      barrier.done(*result);
    } else {
      barriers_.emplace(lsn, std::move(barrier));  // waits on for slaves still making progress
      lk.unlock();
    }
    settle();  // the slaves it dropped no longer hold up later barriers (nor this one)
    lk.lock();
  }
}

std::optional<int> Upstream::expire_locked(Lsn lsn, std::chrono::steady_clock::time_point& deadline,
                                           std::unique_lock<std::mutex>& lk) {
  std::vector<std::shared_ptr<Session>> pending, on_probation;
  const unsigned confirmed = holding_locked(
      lsn, [&](const std::shared_ptr<Session>& s) { (s->probation ? on_probation : pending).push_back(s); });
  // A slave on probation is waited for (and dropped for silence) only when the barrier needs it
  // to reach --min-sync-slaves.
  if (confirmed < cfg_.min_sync_slaves) pending.insert(pending.end(), on_probation.begin(), on_probation.end());
  // The ack timeout is silence, not the barrier's age: a slave whose acknowledgements moved
  // within it is still taking a long burst (100 Mbit/s moves 60 MiB in 5 s) and is waited for.
  const auto now = std::chrono::steady_clock::now();
  bool waits_on = false;
  for (auto& s : pending) {
    if (now - s->last_progress < cfg_.ack_timeout) {
      deadline = waits_on ? std::min(deadline, s->last_progress + cfg_.ack_timeout) : s->last_progress + cfg_.ack_timeout;
      waits_on = true;
      continue;
    }
    note_silent_locked(*s);
    lk.unlock();
    drop(*s, "no acknowledgement of lsn " + std::to_string(lsn) + " within " + std::to_string(cfg_.ack_timeout.count()) +
                 " ms (and no progress for as long)");
    lk.lock();
  }
  if (waits_on) return std::nullopt;
  if (confirmed >= cfg_.min_sync_slaves) return 0;
  LOG_ERROR("barrier at lsn %" PRIu64 ": only %u of the %u required sync slaves confirmed", lsn, confirmed, cfg_.min_sync_slaves);
  return EIO;
}

std::vector<SlaveStatus> Upstream::slaves() {
  std::lock_guard lk(mu_);
  std::vector<SlaveStatus> out;
  const Lsn last = node_.last_lsn();
  for (auto& s : sessions_) {
    if (s->dead) continue;
    SlaveStatus st;
    st.address = s->listen.empty() ? s->conn->peer() : s->listen;
    st.node_id = s->node_id;
    st.state = s->streaming ? "streaming" : "attaching";
    st.ack = ack_level_name(s->level);
    st.received_lsn = s->received;
    st.durable_lsn = s->durable;
    st.lag_bytes = s->durable.load() < last ? journal_.bytes_after(s->durable) : 0;
    st.probation = s->probation;
    st.authenticated = s->conn->authenticated();
    st.encrypted = s->conn->encrypted();
    st.compression = compression_name(s->encoder.compression());
    st.batch_bytes = s->encoder.batch_bytes();
    st.batch_wire_bytes = s->encoder.sent_bytes();
    out.push_back(st);
  }
  return out;
}

AttachHello hello_of(wire::Hello::Reader h) {
  AttachHello out;
  out.protocol_version = h.getProtocolVersion();
  out.node_id = h.getNodeId();
  out.cluster_id = h.getClusterId();
  out.hash_algorithm = h.getHashAlgorithm();
  out.block_size = h.getBlockSize();
  out.lineage = get_lineage(h.getLineage());
  out.durable_lsn = h.getDurableLsn();
  out.empty = h.getEmpty();
  out.purpose = h.getPurpose() == wire::Purpose::VERIFY ? AttachHello::Purpose::verify : AttachHello::Purpose::attach;
  out.discard_my_data = h.getDiscardMyData();
  out.resync = h.getResync();
  return out;
}

}  // namespace blockrepl
