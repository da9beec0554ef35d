#include "blockrepl/follower.h"

#include "blockrepl/handshake.h"

#include <cerrno>
#include <optional>
#include <cinttypes>
#include <cstring>
#include <unistd.h>

#include "blockrepl/copy.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/error.h"
#include "blockrepl/log.h"
#include "blockrepl/trace.h"
#include "blockrepl/uring_sync.h"

namespace blockrepl {

namespace {

bool changes_namespace(Op op) {
  switch (op) {
    case Op::create: case Op::mkdir: case Op::symlink: case Op::link: case Op::unlink: case Op::rmdir: case Op::rename:
      return true;
    default:
      return false;
  }
}

}  // namespace

Follower::Follower(Node& node, FollowerConfig cfg)
    : node_(node),
      cfg_(std::move(cfg)),
      state_(node.meta_fd(), node.data_path() + "/.blockrepl"),
      reserve_(node.meta_fd(), node.data_path()) {
  status_.address = cfg_.master_address;
  status_.state = "disconnected";
  status_.durable_lsn = status_.received_lsn = state_.durable();
  stage_ = std::make_unique<Stage>(node_.meta_fd(), node_.data_path(), !cfg_.no_fsync);
  // The daemon died while applying a committed Merkle re-attach: finish it before serving.
  if (stage_->committed()) {
    LOG_INFO("finishing the re-attach of %s that was interrupted (up to lsn %" PRIu64 ")", node_.data_path().c_str(),
             stage_->committed_lsn());
    finish_stage();
  }
  if (state_.attach_complete()) node_.set_last_lsn(state_.applied());
}

Follower::~Follower() { stop(); }

bool Follower::has_data() const { return state_.attach_complete() && !node_.identity().cluster_id.empty(); }

void Follower::attach_now() {
  try {
    auto conn = connect_upstream(cfg_.master_address, 5000, cfg_.security, node_.identity().cluster_id);
    handshake(*conn);
    first_conn_ = std::move(conn);  // streaming continues on it in start()
  } catch (const std::exception& e) {
    after_failed_session(e);
    throw;
  }
}

void Follower::start() {
  thread_ = std::thread([this] { run(); });
}

void Follower::stop() {
  stopping_ = true;
  {
    std::lock_guard lk(conn_mu_);
    if (conn_) conn_->shutdown();
  }
  if (thread_.joinable()) thread_.join();
}

FollowerStatus Follower::status() {
  std::lock_guard lk(status_mu_);
  FollowerStatus s = status_;
  if (s.state == "attaching")
    s.current_attach.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - attach_started_).count();
  return s;
}

void Follower::run() {
  auto backoff = std::chrono::milliseconds(200);
  while (!stopping_) {
    try {
      session();
      backoff = std::chrono::milliseconds(200);
    } catch (const FatalAttachError& e) {
      LOG_ERROR("master %s refused this replica: %s", cfg_.master_address.c_str(), e.what());
      {
        std::lock_guard lk(status_mu_);
        status_.last_error = e.what();
      }
      if (on_exit_) on_exit_(1, e.what());
      return;
    } catch (const std::exception& e) {
      if (stopping_) break;
      LOG_WARN("master %s: %s", cfg_.master_address.c_str(), e.what());
      after_failed_session(e);
      // A session that got as far as streaming worked: the next attempt starts with the short
      // wait again, instead of the longest one earlier failures reached.
      if (reached_streaming_.exchange(false)) backoff = std::chrono::milliseconds(200);
    }
    {
      std::lock_guard lk(status_mu_);
      status_.state = "disconnected";
    }
    if (stopping_) break;
    if (cfg_.exit_on_disconnect) {
      if (on_exit_) on_exit_(1, "lost the connection to master " + cfg_.master_address);
      return;
    }
    for (auto slept = std::chrono::milliseconds(0); slept < backoff && !stopping_; slept += std::chrono::milliseconds(50))
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(5000));
  }
}

void Follower::after_failed_session(const std::exception& e) {
  const auto* err = dynamic_cast<const Error*>(&e);
  const bool no_space = err && (err->errno_value() == ENOSPC || err->errno_value() == EDQUOT);
  if (no_space && !resync_) {
    LOG_WARN("replica %s is out of space: it re-attaches by Merkle diff once the master's state fits", node_.data_path().c_str());
    resync_ = true;
    resync_why_ = "room on " + node_.data_path() + " for the master's current state (retrying by Merkle diff)";
  }
  if (no_space) reserve_.release();
  if (apply_failed_ && !no_space && !resync_) {
    // What the records before it did is on disk; what this one and its neighbours in the batch
    // left is unknown. Resuming by stream would replay onto that guesswork: compare instead.
    LOG_WARN("replica %s could not apply a record of its master: it re-attaches by Merkle diff, which repairs what that left",
             node_.data_path().c_str());
    resync_ = true;
    resync_why_ = "a Merkle diff with the master (a record could not be applied)";
  }
  apply_failed_ = false;
  drop_uncommitted_stage();
  std::lock_guard lk(status_mu_);
  status_.last_error = e.what();
  status_.waiting_for = resync_ ? resync_why_ : "";
}

// A stage that was not committed is worth nothing once its session ended; its room is better
// given back at once.
void Follower::drop_uncommitted_stage() {
  if (staging_ && !stage_->committed()) stage_->discard();
  staging_ = false;
}

void Follower::session() {
  // The daemon applied part of a committed stage and then failed (its disk filled): finish it
  // before anything else, as a restart would.
  if (stage_->committed()) finish_stage();
  std::unique_ptr<Connection> conn = std::move(first_conn_);
  const bool fresh = !conn;
  if (fresh) conn = connect_upstream(cfg_.master_address, 5000, cfg_.security, node_.identity().cluster_id);
  {
    std::lock_guard lk(conn_mu_);
    conn_ = conn.get();
  }
  struct Clear {
    Follower* f;
    ~Clear() {
      std::lock_guard lk(f->conn_mu_);
      f->conn_ = nullptr;
    }
  } clear{this};
  if (stopping_) return;
  if (fresh) handshake(*conn);
  stream(*conn);
}

void Follower::send_hello(Connection& conn, wire::Purpose purpose, bool deep) {
  const Identity me = node_.identity();
  const bool complete = state_.attach_complete();
  capnp::MallocMessageBuilder mb;
  auto h = mb.initRoot<wire::Message>().initHello();
  h.setProtocolVersion(kProtocolVersion);
  h.setClusterId(me.cluster_id);
  h.setNodeId(me.node_id);
  h.setBlockSize(me.block_size);
  h.setHashAlgorithm(kHashAlgorithm);
  auto lin = h.initLineage(static_cast<unsigned>(me.lineage.size()));
  for (unsigned i = 0; i < me.lineage.size(); i++) {
    lin[i].setId(me.lineage[i].id);
    lin[i].setFirstLsn(me.lineage[i].first_lsn);
  }
  // A replica whose first copy never completed holds no LSN worth streaming from, but what it
  // holds still saves bytes in a Merkle diff; only a truly empty one needs a full copy.
  // A former master (mounted as a slave) may hold records up to what it reserved: its LSN then
  // tells the master whether it wrote past the point where their histories forked.
  hello_lsn_ = me.role == "master" ? node_.last_lsn() : complete ? state_.durable() : 0;
  h.setDurableLsn(hello_lsn_);
  h.setDiscardMyData(cfg_.discard_my_data);
  h.setResync(resync_ && purpose == wire::Purpose::ATTACH);
  h.setAckLevel(static_cast<wire::AckLevel>(static_cast<uint16_t>(cfg_.ack)));
  h.setEmpty(me.cluster_id.empty() || data_dir_is_empty(node_.root_fd()));
  h.setListenAddress(cfg_.listen_address);
  h.setPurpose(purpose);
  h.setDeep(deep);
  offer_compression(h, cfg_.compress);
  conn.send(mb);
}

// The master's answer to our hello. Until it is known to speak our protocol and accept us, its
// frames are as small as a hello must be (what a master may send us is bounded the same way as
// what a slave may send it); after the welcome, the full limit.
std::unique_ptr<Frame> Follower::receive_welcome(Connection& conn) {
  conn.set_max_frame_bytes(kMaxHelloFrameBytes);
  std::unique_ptr<Frame> frame;
  try {
    frame = conn.receive(30000);
  } catch (const Error& e) {
    // A master that requires TLS resets a connection whose first bytes are not TLS.
    if (e.errno_value() != ECONNRESET || cfg_.security.tls) throw;
    throw Error(std::string(e.what()) + " (does the master require TLS, --tls-*?)", e.errno_value());
  }
  conn.set_max_frame_bytes(kMaxFrameBytes);
  return frame;
}

void Follower::handshake(Connection& conn) {
  drop_uncommitted_stage();
  const Identity me = node_.identity();
  send_hello(conn, wire::Purpose::ATTACH, false);
  const bool empty = me.cluster_id.empty() || data_dir_is_empty(node_.root_fd());
  auto frame = receive_welcome(conn);
  if (!frame)
    throw Error("master " + cfg_.master_address + " closed the connection during the handshake" +
                (cfg_.security.secret && cfg_.security.tls ? "" : " (does it require --secret-file or TLS, --tls-*?)"));
  auto msg = frame->root();
  if (msg.which() == wire::Message::ERROR) {
    auto err = msg.getError();
    check_field_size(err.getReason().size(), kMaxReasonBytes, "reason", cfg_.master_address, "error");
    std::string reason = std::string("master ") + cfg_.master_address + " refused: " + err.getReason().cStr();
    if (err.getFatal()) throw FatalAttachError(reason);
    throw Error(reason);
  }
  if (msg.which() != wire::Message::WELCOME)
    throw Error("peer " + cfg_.master_address + " does not speak the blockrepl protocol", EPROTO);
  auto w = msg.getWelcome();
  check_welcome_sizes(w, cfg_.master_address);
  if (w.getProtocolVersion() != kProtocolVersion)
    throw FatalAttachError("master " + cfg_.master_address + " speaks protocol version " +
                           std::to_string(w.getProtocolVersion()) + ", this node speaks " + std::to_string(kProtocolVersion));
  if (w.getBlockSize() != me.block_size)
    throw FatalAttachError("block size mismatch: master uses " + std::to_string(w.getBlockSize()) + ", this replica " +
                           std::to_string(me.block_size));
  const std::string cluster = w.getClusterId();
  if (conn.authenticated() && cluster != conn.authenticated_cluster())
    throw FatalAttachError("master " + cfg_.master_address + " authenticated for cluster " + conn.authenticated_cluster() +
                           " and welcomes us to cluster " + cluster, EPROTO);
  if (!me.cluster_id.empty() && cluster != me.cluster_id && !empty)
    throw FatalAttachError("cluster id mismatch: master belongs to cluster " + cluster + ", this replica to " + me.cluster_id);
  std::vector<LineageEntry> lineage;
  for (auto e : w.getLineage()) lineage.push_back({e.getId(), e.getFirstLsn()});

  if (w.getNotice().size() > 0) LOG_WARN("master %s: %s", cfg_.master_address.c_str(), w.getNotice().cStr());
  attach_started_ = std::chrono::steady_clock::now();
  {
    std::lock_guard lk(status_mu_);
    status_.state = "attaching";
    status_.current_attach = AttachReport{};
    status_.authenticated = conn.authenticated();
    status_.encrypted = conn.encrypted();
  }
  codec_ = welcome_compression(w, "master " + cfg_.master_address);
  {
    std::lock_guard lk(status_mu_);
    status_.compression = compression_name(codec_);
  }
  const Lsn start = w.getStartLsn();
  master_ack_ = static_cast<AckLevel>(static_cast<int>(w.getAckLevel()));
  const uint64_t bytes_before = conn.bytes_received();
  if (w.getMethod() == wire::AttachMethod::FULL) {
    method_ = "full";
    if (!data_dir_is_empty(node_.root_fd())) {
      LOG_WARN("replica %s must be copied again in full; discarding its contents", node_.data_path().c_str());
      wipe_data_dir(node_.root_fd());
    }
    if (HashIndex* h = node_.store().hashes()) h->reset_all();
    node_.reset_history(start);
    state_.set_attach_complete(false, 0);
    node_.update_identity([&](Identity& id) {
      id.cluster_id = cluster;
      id.lineage = lineage;
      id.role = "slave";
    });
    receive_copy(conn);
    last_lsn_ = start;
    node_.set_last_lsn(start);
  } else if (w.getMethod() == wire::AttachMethod::STREAM) {
    method_ = "stream";
    if (start != hello_lsn_)
      throw Error("master " + cfg_.master_address + " offered to stream from lsn " + std::to_string(start) +
                      " but this replica is at " + std::to_string(hello_lsn_),
                  EPROTO);
    node_.update_identity([&](Identity& id) {
      id.lineage = lineage;
      id.role = "slave";
    });
    // Records after the durable point may already be applied: the daemon died after applying
    // them, or the state file's note of how far we got is older than the data (it is synced
    // lazily). Up to what the master had when we connected, apply tolerantly.
    replay_until_ = std::max(state_.applied(), w.getLastLsn());
    complete_at_ = 0;
    last_lsn_ = start;
    node_.set_last_lsn(start);
    if (cfg_.stage_stream) {
      stage_->begin();
      stage_->add(*frame);
      stage_target_ = w.getLastLsn();
      staging_ = true;
      if (last_lsn_ >= stage_target_) commit_stage(conn, last_lsn_);
    }
  } else if (w.getMethod() == wire::AttachMethod::MERKLE) {
    method_ = "merkle";
    HashIndex* hashes = node_.store().hashes();
    if (!hashes) throw Error("this node keeps no hash trees; cannot take a Merkle re-attach", EPROTO);
    stage_->begin();
    stage_->add(*frame);  // the welcome: the lineage to adopt once the stage is applied
    auto progress = [&](const DiffReport& r) {
      std::lock_guard lk(status_mu_);
      status_.current_attach.method = "merkle";
      status_.current_attach.bytes_received = conn.bytes_received() - bytes_before;
      status_.current_attach.blocks_received = (r.data_bytes + me.block_size - 1) / me.block_size;
    };
    DiffReport rep = run_merkle_diff(conn, node_.root_fd(), *hashes, stage_.get(), false,
                                     static_cast<int>(std::max<int64_t>(cfg_.master_timeout.count(), 60000)), progress);
    auto done = conn.receive(static_cast<int>(std::max<int64_t>(cfg_.master_timeout.count(), 60000)));
    if (!done || done->root().which() != wire::Message::MERKLE_DONE)
      throw Error("master " + cfg_.master_address + " did not finish the Merkle diff", EPROTO);
    stage_target_ = done->root().getMerkleDone().getLsn();
    staging_ = true;
    last_lsn_ = start;
    replay_until_ = 0;
    complete_at_ = 0;
    {
      std::lock_guard lk(status_mu_);
      status_.current_attach.blocks_received = (rep.data_bytes + me.block_size - 1) / me.block_size;
    }
    LOG_INFO("Merkle diff with %s: %" PRIu64 " directories listed, %" PRIu64 " files compared, %" PRIu64
             " blocks and %" PRIu64 " whole files differ, %u round trips; staged until lsn %" PRIu64,
             cfg_.master_address.c_str(), rep.dirs_listed, rep.files_compared, rep.blocks, rep.whole_files, rep.round_trips,
             stage_target_);
    if (last_lsn_ >= stage_target_) commit_stage(conn, last_lsn_);
  } else {
    throw Error("master " + cfg_.master_address + " chose an attach method this node does not support", EPROTO);
  }
  AttachReport report;
  report.method = method_;
  report.bytes_received = conn.bytes_received() - bytes_before;
  {
    std::lock_guard lk(status_mu_);
    report.files_received = status_.current_attach.files_received;
    report.blocks_received = status_.current_attach.blocks_received;
    report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - attach_started_).count();
    status_.last_attach = report;
    status_.has_last_attach = true;
    status_.received_lsn = last_lsn_;
  }
  // An attach ends once we hold what the master had when we connected: until then, what
  // arrives counts towards it (a stream's catch-up happens after the handshake).
  catchup_target_ = w.getLastLsn();
  catchup_bytes_start_ = bytes_before;
  catching_up_ = last_lsn_ < catchup_target_;
  LOG_INFO("attached to %s by %s (%" PRIu64 " bytes, %.2f s), streaming from lsn %" PRIu64, cfg_.master_address.c_str(),
           method_.c_str(), report.bytes_received, report.seconds, start);
  if (method_ == "full" && last_lsn_ >= complete_at_) make_durable(last_lsn_);
  if (method_ == "full" || staging_) {
    // A full copy becomes consistent once the records up to copy-done are replayed and durable;
    // a Merkle stage once it is applied at a barrier past the diff: stream until then (before
    // the mount is offered, for a replica that has nothing consistent to serve yet).
    while (!state_.attach_complete() || staging_) {
      auto frame = expand_batch(conn.receive(static_cast<int>(cfg_.master_timeout.count())), codec_, cfg_.master_address);
      if (!frame) throw Error("master " + cfg_.master_address + " closed the connection");
      auto m = frame->root();
      if (m.which() == wire::Message::BATCH) {
        if (staging_) stage_batch(conn, *frame);
        else apply_batch(conn, m.getBatch());
      } else if (m.which() == wire::Message::HEARTBEAT) {
        if (staging_ && last_lsn_ >= stage_target_ && m.getHeartbeat().getLsn() <= last_lsn_) commit_stage(conn, last_lsn_);
        send_ack(conn);
      } else if (m.which() == wire::Message::ERROR) {
        throw Error(std::string("master ") + cfg_.master_address + ": " + m.getError().getReason().cStr());
      } else {
        throw Error("unexpected message from master " + cfg_.master_address, EPROTO);
      }
    }
  }
  resync_ = false;
  reserve_.hold();
  std::lock_guard lk(status_mu_);
  status_.state = "streaming";
  status_.waiting_for.clear();
  reached_streaming_ = true;
}

void Follower::receive_copy(Connection& conn) {
  CopyReceiver rx(node_.store());
  // The receiver's errors name the file; this names the master.
  auto from_master = [&](const Error& e) {
    return Error("full copy from master " + cfg_.master_address + ": " + e.what(), e.errno_value());
  };
  for (;;) {
    auto frame = conn.receive(static_cast<int>(std::max<int64_t>(cfg_.master_timeout.count(), 30000)));
    if (!frame) throw Error("master " + cfg_.master_address + " closed the connection during the full copy");
    auto msg = frame->root();
    if (msg.which() == wire::Message::COPY_ENTRY) {
      try {
        rx.apply(msg.getCopyEntry());
      } catch (const Error& e) {
        throw from_master(e);
      }
      std::lock_guard lk(status_mu_);
      status_.current_attach.files_received = rx.stats().files;
      status_.current_attach.bytes_received = conn.bytes_received();
      status_.current_attach.blocks_received = rx.stats().bytes / node_.identity().block_size;
      continue;
    }
    if (msg.which() == wire::Message::COPY_DONE) {
      try {
        rx.finish({static_cast<time_t>(msg.getCopyDone().getRootMtimeSec()), static_cast<long>(msg.getCopyDone().getRootMtimeNsec())});
      } catch (const Error& e) {
        throw from_master(e);
      }
      replay_until_ = msg.getCopyDone().getLsn();
      complete_at_ = replay_until_;
      // Everything copied must be durable before the replica may call itself consistent.
      if (!cfg_.no_fsync) {
        if (int err = node_.store().sync_all()) throw_errno("cannot sync " + node_.data_path(), err);
      }
      node_.store().files().scan();
      std::lock_guard lk(status_mu_);
      status_.current_attach.blocks_received = rx.stats().bytes / node_.identity().block_size;
      return;
    }
    if (msg.which() == wire::Message::ERROR)
      throw Error(std::string("master ") + cfg_.master_address + ": " + msg.getError().getReason().cStr());
    throw Error("unexpected message from master " + cfg_.master_address + " during the full copy", EPROTO);
  }
}

void Follower::stream(Connection& conn) {
  while (!stopping_) {
    auto frame = expand_batch(conn.receive(static_cast<int>(cfg_.master_timeout.count())), codec_, cfg_.master_address);
    if (!frame) throw Error("master " + cfg_.master_address + " closed the connection");
    auto msg = frame->root();
    switch (msg.which()) {
      case wire::Message::BATCH:
        if (staging_) stage_batch(conn, *frame);
        else apply_batch(conn, msg.getBatch());
        break;
      case wire::Message::HEARTBEAT: {
        adopt_lineage(msg.getHeartbeat().getLineage());
        if (staging_) {
          // The master is idle and we hold everything it has: the stage is a state it was in.
          if (last_lsn_ >= stage_target_ && msg.getHeartbeat().getLsn() <= last_lsn_) commit_stage(conn, last_lsn_);
          send_ack(conn);
          break;
        }
        // The master is idle: make what we hold durable now rather than at the next barrier,
        // so that a replica left alone is as fresh on disk as in memory.
        Lsn durable;
        {
          std::lock_guard lk(status_mu_);
          durable = status_.durable_lsn;
        }
        if (durable < last_lsn_) {
          make_durable(last_lsn_);
        } else if (!cfg_.no_fsync && state_.durable() == durable &&
                   std::chrono::steady_clock::now() - state_synced_at_ >= std::chrono::seconds(1)) {
          state_.set_durable(durable, true);  // the lazily synced note catches up while idle
          state_synced_at_ = std::chrono::steady_clock::now();
        }
        send_ack(conn);
        break;
      }
      case wire::Message::ERROR:
        throw Error(std::string("master ") + cfg_.master_address + ": " + msg.getError().getReason().cStr());
      default:
        throw Error("unexpected message from master " + cfg_.master_address, EPROTO);
    }
  }
}

void Follower::check_welcome_sizes(wire::Welcome::Reader w, const std::string& peer) {
  check_field_size(w.getNodeId().size(), kMaxIdBytes, "node id", peer, "welcome");
  check_field_size(w.getClusterId().size(), kMaxIdBytes, "cluster id", peer, "welcome");
  check_field_size(w.getNotice().size(), kMaxReasonBytes, "notice", peer, "welcome");
  check_lineage_sizes(w.getLineage(), peer, "welcome");
}

void Follower::adopt_lineage(capnp::List<wire::LineageEntry>::Reader in) {
  if (in.size() == 0) return;
  check_lineage_sizes(in, cfg_.master_address, "heartbeat");
  std::vector<LineageEntry> theirs;
  for (auto e : in) theirs.push_back({e.getId(), e.getFirstLsn()});
  const Identity me = node_.identity();
  // Only an extension of what we hold: our master was promoted and continues our history.
  if (theirs.size() <= me.lineage.size() || !std::equal(me.lineage.begin(), me.lineage.end(), theirs.begin())) return;
  node_.update_identity([&](Identity& id) { id.lineage = theirs; });
  LOG_INFO("master %s started lineage %s at lsn %" PRIu64 "; following it", cfg_.master_address.c_str(), theirs.back().id.c_str(),
           theirs.back().first_lsn);
}

void Follower::stage_batch(Connection& conn, Frame& frame) {
  auto batch = frame.root().getBatch();
  stage_->add(frame);
  Lsn commit_at = 0;
  for (auto wr : batch.getRecords()) {
    const Lsn lsn = wr.getLsn();
    if (lsn <= last_lsn_)
      throw Error("master " + cfg_.master_address + " sent lsn " + std::to_string(lsn) + " after " + std::to_string(last_lsn_), EPROTO);
    last_lsn_ = lsn;
    if (!commit_at && lsn >= stage_target_ && static_cast<Op>(wr.getOp()) == Op::fsync) commit_at = lsn;
  }
  {
    std::lock_guard lk(status_mu_);
    status_.received_lsn = last_lsn_;
    status_.current_attach.bytes_received = conn.bytes_received() - catchup_bytes_start_;
  }
  if (!commit_at) {
    if (std::chrono::steady_clock::now() - last_ack_at_ >= std::chrono::milliseconds(500)) send_ack(conn);
    return;
  }
  // The first barrier past the end of the diff: switch to the staged state there, then go on
  // with the rest of this batch as a streaming replica.
  const Lsn received = last_lsn_;
  commit_stage(conn, commit_at);
  last_lsn_ = commit_at;
  if (received > commit_at) apply_batch(conn, batch, commit_at);
  else send_ack(conn);
}

void Follower::commit_stage(Connection& conn, Lsn lsn) {
  stage_->commit(lsn);
  finish_stage();
  staging_ = false;
  last_lsn_ = lsn;
  reached_streaming_ = true;
  std::lock_guard lk(status_mu_);
  status_.state = "streaming";
  status_.received_lsn = lsn;
  status_.durable_lsn = lsn;
  status_.last_attach.bytes_received = conn.bytes_received() - catchup_bytes_start_;
  status_.last_attach.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - attach_started_).count();
}

void Follower::finish_stage() {
  Stage::Applied a;
  {
    // Readers of the mount wait while the backing directory is switched (several passes).
    struct Hold {
      CacheInvalidator* inv;
      explicit Hold(CacheInvalidator* i) : inv(i) {
        if (inv) inv->hold_readers();
      }
      ~Hold() {
        if (inv) inv->release_readers();
      }
    } hold(invalidator_);
    a = stage_->apply(node_.store(), node_.identity().block_size);
  }
  if (!cfg_.no_fsync) {
    if (int err = node_.store().sync_all()) throw_errno("cannot sync " + node_.data_path(), err);
  }
  if (const Identity me = node_.identity(); (!a.lineage.empty() && me.lineage != a.lineage) || me.role != "slave")
    node_.update_identity([&](Identity& id) {
      if (!a.lineage.empty()) id.lineage = a.lineage;
      id.role = "slave";
    });
  if (!state_.attach_complete()) state_.set_attach_complete(true, a.lsn);
  state_.set_durable(a.lsn, !cfg_.no_fsync);
  state_.set_applied(a.lsn);
  stage_->discard();
  // Our own slaves hold history this node no longer has: they attach again.
  node_.reset_history(a.lsn);
  if (invalidator_) {
    for (auto& [parent, name] : a.names) {
      Record r;
      r.op = Op::unlink;  // drops the cached name and the directory's attributes
      r.parent = parent;
      r.name = name;
      invalidator_->invalidate(r);
    }
    invalidator_->invalidate_all();
  }
  dirty_files_.clear();
  dirty_namespace_ = false;
  deferred_barrier_ = 0;  // the stage's switch synced everything
  LOG_INFO("replica %s switched to the master's state at lsn %" PRIu64 " (%" PRIu64 " entries, %" PRIu64 " blocks, %" PRIu64
           " records applied)", node_.data_path().c_str(), a.lsn, a.entries, a.blocks, a.records);
}

DiffReport Follower::verify(bool deep) {
  HashIndex* hashes = node_.store().hashes();
  if (!hashes) throw Error("this node keeps no hash trees");
  auto conn = connect_upstream(cfg_.master_address, 5000, cfg_.security, node_.identity().cluster_id);
  send_hello(*conn, wire::Purpose::VERIFY, deep);
  auto frame = receive_welcome(*conn);
  if (!frame) throw Error("master " + cfg_.master_address + " closed the connection");
  if (frame->root().which() == wire::Message::ERROR)
    throw Error(std::string("master ") + cfg_.master_address + " refused: " + frame->root().getError().getReason().cStr());
  if (frame->root().which() != wire::Message::WELCOME) throw Error("peer " + cfg_.master_address + " does not speak the blockrepl protocol");
  DiffReport rep = run_merkle_diff(*conn, node_.root_fd(), *hashes, nullptr, deep, 120000);
  auto done = conn->receive(120000);
  return rep;
}

void Follower::apply_batch(Connection& conn, wire::Batch::Reader batch, Lsn applied_upto) {
  // Barriers in one batch share one round of fsyncs: durable at the last one is durable at all
  // of them (concurrent committers, as in PostgreSQL's group commit, cost one sync, not many).
  Lsn last_barrier = 0;
  std::optional<TraceTimer> apply_timer(std::in_place, TraceStage::slave_apply);
  for (auto wr : batch.getRecords()) {
    if (wr.getLsn() <= applied_upto) continue;  // applied with the stage this batch ended
    Record rec = from_wire(wr, /*view_data=*/true, cfg_.master_address);  // the frame outlives this loop
    if (rec.lsn <= last_lsn_)
      throw Error("master " + cfg_.master_address + " sent lsn " + std::to_string(rec.lsn) + " after " + std::to_string(last_lsn_), EPROTO);
    if (rec.is_barrier()) {
      node_.apply_received(rec, false);  // publishes it to our own slaves; durability below
      last_barrier = rec.lsn;
    } else {
      const bool replay = rec.lsn <= replay_until_;
      if (int err = node_.apply_received(rec, replay)) {
        apply_failed_ = true;
        throw Error("cannot apply " + rec.describe() + " from master " + cfg_.master_address + " to " + node_.data_path() + ": " +
                        Store::failure_text(err),
                    err);
      }
      if (changes_namespace(rec.op)) dirty_namespace_ = true;
      else if (rec.fid != kInvalidFileId && rec.op != Op::release) dirty_files_.insert(rec.fid);
      if (invalidator_) invalidator_->invalidate(rec);
    }
    last_lsn_ = rec.lsn;
  }
  {
    std::lock_guard lk(status_mu_);
    status_.received_lsn = last_lsn_;
    if (catching_up_) {
      const uint32_t bs = node_.identity().block_size;
      for (auto wr : batch.getRecords()) status_.last_attach.blocks_received += (wr.getData().size() + bs - 1) / bs;
      status_.last_attach.bytes_received = conn.bytes_received() - catchup_bytes_start_;
      status_.last_attach.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - attach_started_).count();
      if (last_lsn_ >= catchup_target_) catching_up_ = false;
    }
  }
  // Acknowledgements matter to the master at barriers (and heartbeats, for status); a batch of
  // plain writes needs none, which saves a wake-up on both sides per commit.
  bool ack = last_barrier != 0;
  apply_timer.reset();
  const auto now = std::chrono::steady_clock::now();
  if (last_barrier) {
    if (master_ack_ == AckLevel::recv) send_ack(conn);  // received, before our disk: all recv waits for
    if (master_ack_ != AckLevel::sync && state_.attach_complete()) {
      // A master that does not wait for our disk (async, recv) has its barriers flushed here at
      // most every kUnwaitedFlushInterval, each flush covering whole barriers: the replica's
      // disk is still always a state the master had, a little older. Flushing every barrier
      // cost an async master 44% of its SQLite commits on a machine that also runs the replica.
      deferred_barrier_ = last_barrier;
      last_barrier = 0;
      ack = false;
    }
  }
  if (!last_barrier && deferred_barrier_ && now - flushed_at_ >= kUnwaitedFlushInterval) {
    last_barrier = deferred_barrier_;
    ack = true;
  }
  if (last_barrier) {
    TraceTimer timer(TraceStage::slave_flush);
    make_durable(last_barrier);
    flushed_at_ = now;
  } else if (!state_.attach_complete() && last_lsn_ >= complete_at_) {
    // A full copy is consistent once the records up to copy-done are applied: make it durable
    // right away rather than waiting for the application's next barrier.
    make_durable(last_lsn_);
    ack = true;
  }
  state_.set_applied(last_lsn_);
  // ... but the master hears from us at least twice a second, or it presumes us dead.
  if (ack || std::chrono::steady_clock::now() - last_ack_at_ >= std::chrono::milliseconds(500)) {
    TraceTimer timer(TraceStage::slave_ack);
    send_ack(conn);
  }
}

void Follower::make_durable(Lsn lsn) {
  if (!cfg_.no_fsync) {
    if (dirty_namespace_) {
      // Names changed: sync the whole backing file system once rather than each directory.
      if (int err = node_.store().sync_all()) throw_errno("cannot sync " + node_.data_path(), err);
    } else if (dirty_files_.size() == 1) {
      Fd lease = node_.store().files().rw(*dirty_files_.begin());
      int fd = lease.get();
      if (fd >= 0 && fdatasync(fd) != 0) throw_errno("cannot sync a file of " + node_.data_path(), errno);
    } else if (!dirty_files_.empty()) {
      // Several files: their fdatasyncs go to the kernel at once through io_uring and run
      // concurrently, where one after the other each waits for its own cache flush. Measured
      // on the 2-core VM (ext4 on virtio, kernel 6.18, other builds and tests running, load
      // 7-12; median of 9 interleaved runs, CV 25-140%; two sessions), one 4 KiB write per
      // file then the flush, in us:
      //   files   fdatasync in turn   io_uring at once
      //     1        382 / 839           339 / 623   (noise: one file keeps the plain call)
      //     2        537 / 567           322 / 429
      //     4        840 / 1740          363 / 566
      //     8       8091 / 4598          751 / 1451
      // The process's CPU time (io-wq workers included) is the same either way.
      // `micro_bench --benchmark_filter=BM_Flush --benchmark_repetitions=9
      //  --benchmark_enable_random_interleaving=true` (tools/bench/micro/uring_apply_bench.cpp).
      // The writes themselves stay plain pwrite() in Store::apply: submitting a batch's writes
      // through io_uring (with the flush drained or linked after them) cost 2-3 times the CPU
      // for 4 KiB writes (ext4's buffered writes go to io-wq workers: 256 writes 2.2 ms of CPU
      // against 1.1 ms) and was no faster once a flush followed (BM_Apply4k*). 1 MiB O_DIRECT
      // writes do gain (4 in flight, then the flush: 3.5 ms against 4.7 ms; BM_Apply1m*), but
      // that needs Store to keep several aligned buffers in flight: not done yet.
      thread_local ConcurrentSync syncer;  // one ring per applying thread, made on first use
      // A round's descriptors stay open until its syncs complete; rounds of the ring's depth
      // keep thousands of dirty files from holding as many descriptors at once.
      std::vector<Fd> leases;
      std::vector<int> fds;
      auto flush = [&] {
        if (int err = syncer.fdatasync_all(fds)) throw_errno("cannot sync a file of " + node_.data_path(), err);
        leases.clear();
        fds.clear();
      };
      for (FileId fid : dirty_files_) {
        Fd lease = node_.store().files().rw(fid);
        if (!lease) continue;  // gone since it was written: nothing left to sync
        fds.push_back(lease.get());
        leases.push_back(std::move(lease));
        if (fds.size() == ConcurrentSync::kDepth) flush();
      }
      flush();
    }
  }
  dirty_files_.clear();
  dirty_namespace_ = false;
  if (lsn >= deferred_barrier_) deferred_barrier_ = 0;
  if (!state_.attach_complete()) {
    if (lsn >= complete_at_) {
      state_.set_attach_complete(true, lsn);
      LOG_INFO("replica %s is consistent at lsn %" PRIu64, node_.data_path().c_str(), lsn);
    }
  } else {
    // The data is durable now; the note of it only needs to be a lower bound, so it is synced
    // at most every 200 ms rather than costing a second fsync per barrier.
    auto now = std::chrono::steady_clock::now();
    const bool sync_note = now - state_synced_at_ >= std::chrono::milliseconds(200);
    state_.set_durable(lsn, sync_note && !cfg_.no_fsync);
    if (sync_note) state_synced_at_ = now;
  }
  std::lock_guard lk(status_mu_);
  status_.durable_lsn = lsn;
}

void Follower::send_ack(Connection& conn) {
  last_ack_at_ = std::chrono::steady_clock::now();
  capnp::MallocMessageBuilder mb;
  auto ack = mb.initRoot<wire::Message>().initAck();
  ack.setReceivedLsn(last_lsn_);
  Lsn durable;
  {
    std::lock_guard lk(status_mu_);
    durable = status_.durable_lsn;
  }
  ack.setDurableLsn(cfg_.no_fsync ? last_lsn_ : std::min(durable, last_lsn_));
  conn.send(mb);
}

}  // namespace blockrepl
