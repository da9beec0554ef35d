#include "blockrepl/upstream.h"

#include <cerrno>
#include <cinttypes>
#include <sys/socket.h>
#include <unistd.h>

#include "blockrepl/attach.h"
#include "blockrepl/copy.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/merkle.h"
#include "blockrepl/error.h"
#include "blockrepl/log.h"

namespace blockrepl {

struct Upstream::Session {
  std::unique_ptr<Connection> conn;
  std::string node_id;
  std::string listen;  // the slave's own listen address, if any
  AckLevel level = AckLevel::sync;
  std::atomic<bool> streaming{false};
  std::atomic<bool> dead{false};
  std::atomic<Lsn> sent{0}, received{0}, durable{0};
  std::thread thread;
};

namespace {

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

// What a hello says, as the plain values the attach decision takes.
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

wire::AttachMethod wire_method(AttachDecision::Method m) {
  switch (m) {
    case AttachDecision::Method::stream: return wire::AttachMethod::STREAM;
    case AttachDecision::Method::merkle: return wire::AttachMethod::MERKLE;
    default: return wire::AttachMethod::FULL;
  }
}

}  // namespace

void Upstream::send_welcome(Connection& conn, const Identity& me, wire::AttachMethod method, Lsn start_lsn, AckLevel level,
                            const std::string& notice) {
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
  conn.send(mb);
}

Upstream::Upstream(Node& node, Journal& journal, UpstreamConfig cfg) : node_(node), journal_(journal), cfg_(std::move(cfg)) {}

Upstream::~Upstream() { stop(); }

void Upstream::start(int listen_fd) {
  listen_fd_ = listen_fd;
  accept_thread_ = std::thread([this] { accept_loop(); });
  LOG_INFO("serving slaves on %s (ack %s)", cfg_.listen_address.c_str(), ack_level_name(cfg_.ack));
}

void Upstream::stop() {
  if (stopping_.exchange(true)) return;
  if (listen_fd_ >= 0) {
    shutdown(listen_fd_, SHUT_RDWR);
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
  for (auto& s : sessions)
    if (s->thread.joinable()) s->thread.join();
  std::lock_guard lk(mu_);
  sessions_.clear();
}

void Upstream::accept_loop() {
  while (!stopping_) {
    auto conn = accept_from(listen_fd_);
    if (!conn) break;
    if (stopping_) break;
    // A slave that stops reading must not block us forever: sends time out.
    timeval tv{static_cast<time_t>(cfg_.ack_timeout.count() / 1000), static_cast<suseconds_t>((cfg_.ack_timeout.count() % 1000) * 1000)};
    setsockopt(conn->fd(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    auto s = std::make_shared<Session>();
    s->conn = std::move(conn);
    // Reap sessions that ended; joined outside the lock, which their last steps still take.
    std::list<std::shared_ptr<Session>> ended;
    {
      std::lock_guard lk(mu_);
      for (auto it = sessions_.begin(); it != sessions_.end();) {
        if ((*it)->dead) {
          ended.push_back(*it);
          it = sessions_.erase(it);
        } else {
          ++it;
        }
      }
      sessions_.push_back(s);
      s->thread = std::thread([this, s] { serve(s); });
    }
    for (auto& e : ended)
      if (e->thread.joinable()) e->thread.join();
  }
}

void Upstream::drop(Session& s, const std::string& why) {
  if (!s.dead.exchange(true)) {
    LOG_WARN("slave %s (%s) dropped: %s", s.conn->peer().c_str(), s.node_id.c_str(), why.c_str());
    s.conn->shutdown();
  }
  { std::lock_guard lk(mu_); }  // see read_acks: no lost wake-ups for waiting barriers
  ack_cv_.notify_all();
}

void Upstream::serve(std::shared_ptr<Session> sp) {
  Session& s = *sp;
  Connection& conn = *s.conn;
  std::thread ack_thread;
  std::shared_ptr<Journal::Reader> reader;
  try {
    auto frame = conn.receive(10000);
    if (!frame) throw Error("closed the connection before saying hello");
    auto msg = frame->root();
    if (msg.which() != wire::Message::HELLO) throw Error("spoke first with something other than hello", EPROTO);
    auto hello = msg.getHello();
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
    send_welcome(conn, me, method, start_lsn, s.level, d.notice);
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
      s.streaming = true;
    }
    ack_cv_.notify_all();
    stream(s, reader);
  } catch (const std::exception& e) {
    drop(s, e.what());
  }
  s.streaming = false;
  drop(s, "session ended");
  if (reader) journal_.detach(reader);
  if (ack_thread.joinable()) ack_thread.join();
}

void Upstream::stream(Session& s, std::shared_ptr<Journal::Reader> reader) {
  std::vector<RecordPtr> batch;
  auto last_send = std::chrono::steady_clock::now();
  size_t lineage_sent = node_.identity().lineage.size();
  while (!s.dead && !stopping_) {
    // A promotion here started a new lineage: our slaves adopt it, so that they can resume from
    // us (or a sibling on it) by stream later.
    if (Identity me = node_.identity(); me.lineage.size() != lineage_sent) {
      capnp::MallocMessageBuilder mb;
      auto hb = mb.initRoot<wire::Message>().initHeartbeat();
      hb.setLsn(node_.last_lsn());
      set_lineage(hb.initLineage(static_cast<unsigned>(me.lineage.size())), me.lineage);
      s.conn->send(mb);
      lineage_sent = me.lineage.size();
    }
    batch.clear();
    if (!journal_.read(reader, batch, 4u << 20, std::chrono::milliseconds(200))) {
      if (reader->cut_off) throw Error("it fell too far behind the journal");
      return;
    }
    auto now = std::chrono::steady_clock::now();
    if (batch.empty()) {
      if (now - last_send >= kHeartbeatInterval) {
        capnp::MallocMessageBuilder mb;
        mb.initRoot<wire::Message>().initHeartbeat().setLsn(node_.last_lsn());
        s.conn->send(mb);
        last_send = now;
      }
      continue;
    }
    capnp::MallocMessageBuilder mb;
    auto list = mb.initRoot<wire::Message>().initBatch().initRecords(static_cast<unsigned>(batch.size()));
    for (unsigned i = 0; i < batch.size(); i++) to_wire(*batch[i], list[i]);
    s.sent = batch.back()->lsn;  // before sending: the slave may acknowledge before send() returns
    s.conn->send(mb);
    last_send = now;
  }
}

void Upstream::read_acks(std::shared_ptr<Session> sp) {
  Session& s = *sp;
  // A live slave answers every batch and heartbeat; silence this long means it is gone.
  const int timeout_ms = static_cast<int>(std::max<int64_t>(cfg_.ack_timeout.count(), 3 * kHeartbeatInterval.count()));
  try {
    while (!s.dead) {
      auto frame = s.conn->receive(timeout_ms);
      if (!frame) throw Error("it closed the connection");
      auto msg = frame->root();
      switch (msg.which()) {
        case wire::Message::ACK: {
          auto ack = msg.getAck();
          Lsn r = ack.getReceivedLsn(), d = ack.getDurableLsn();
          if (r > s.sent.load() || d > r) throw Error("it acknowledged records it was never sent", EPROTO);
          {
            // Under the lock, so a barrier between its check and its wait cannot miss this.
            std::lock_guard lk(mu_);
            if (r > s.received) s.received = r;
            if (d > s.durable) s.durable = d;
          }
          ack_cv_.notify_all();
          break;
        }
        case wire::Message::ERROR:
          throw Error(std::string("it reported: ") + msg.getError().getReason().cStr());
        default:
          throw Error("it sent an unexpected message", EPROTO);
      }
    }
  } catch (const std::exception& e) {
    drop(s, e.what());
  }
}

int Upstream::wait_barrier(Lsn lsn) {
  if (cfg_.ack == AckLevel::async && cfg_.min_sync_slaves == 0) return 0;
  const auto deadline = std::chrono::steady_clock::now() + cfg_.ack_timeout;
  std::unique_lock lk(mu_);
  for (;;) {
    unsigned confirmed = 0;
    std::vector<std::shared_ptr<Session>> pending;
    for (auto& s : sessions_) {
      if (s->dead || !s->streaming || s->level == AckLevel::async) continue;
      Lsn have = s->level == AckLevel::sync ? s->durable.load() : s->received.load();
      if (have >= lsn) confirmed++;
      else pending.push_back(s);
    }
    if (pending.empty() && confirmed >= cfg_.min_sync_slaves) return 0;
    if (ack_cv_.wait_until(lk, deadline) == std::cv_status::timeout) {
      for (auto& s : pending) {
        Lsn have = s->level == AckLevel::sync ? s->durable.load() : s->received.load();
        if (have < lsn) {
          lk.unlock();
          drop(*s, "no acknowledgement of lsn " + std::to_string(lsn) + " within " +
                       std::to_string(cfg_.ack_timeout.count()) + " ms");
          lk.lock();
        } else {
          confirmed++;
        }
      }
      if (confirmed >= cfg_.min_sync_slaves) return 0;
      LOG_ERROR("barrier at lsn %" PRIu64 ": only %u of the %u required sync slaves confirmed", lsn, confirmed,
                cfg_.min_sync_slaves);
      return EIO;
    }
  }
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
    out.push_back(st);
  }
  return out;
}

}  // namespace blockrepl
