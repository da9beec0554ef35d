#include "blockrepl/replica.h"

#include <cinttypes>
#include <netdb.h>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/journal.h"
#include "blockrepl/log.h"
#include "blockrepl/node.h"

namespace blockrepl {

namespace {

// "addr:port" of a bound socket ("[addr]:port" for IPv6), with the port the kernel chose.
std::string local_address(int fd, const std::string& asked) {
  sockaddr_storage ss;
  socklen_t len = sizeof ss;
  char host[NI_MAXHOST], port[NI_MAXSERV];
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0 ||
      getnameinfo(reinterpret_cast<sockaddr*>(&ss), len, host, sizeof host, port, sizeof port, NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return asked;
  return ss.ss_family == AF_INET6 ? "[" + std::string(host) + "]:" + port : std::string(host) + ":" + port;
}

}  // namespace

const char* replica_state_name(Replica::State state) {
  switch (state) {
    case Replica::State::master: return "master";
    case Replica::State::attaching: return "attaching";
    case Replica::State::streaming: return "streaming";
    case Replica::State::disconnected: return "disconnected";
  }
  return "?";
}

Replica::Replica(ReplicaConfig cfg)
    : cfg_(std::move(cfg)), role_(cfg_.master_address.empty() ? Role::master : Role::slave) {
  if (!cfg_.listen_address.empty()) {
    listen_fd_ = listen_on(cfg_.listen_address);
    bound_address_ = local_address(listen_fd_, cfg_.listen_address);
  }
}

Replica::~Replica() {
  // Not stopped: a start that failed part way. Threads end, nothing is closed cleanly.
  if (follower_) follower_->stop();
  if (upstream_) upstream_->stop();
  control_.reset();
  if (node_) node_->set_barrier_waiter(nullptr);
  upstream_.reset();
  follower_.reset();
  journal_.reset();
  if (node_) node_->store().set_hashes(nullptr);
  hashes_.reset();
  node_.reset();
  if (listen_fd_ >= 0) close(listen_fd_);
}

void Replica::enter_role(Role role) {
  role_.store(role, std::memory_order_release);
}

void Replica::open() {
  const bool slave = role() == Role::slave;
  node_ = std::make_unique<Node>(cfg_.data_path);
  node_->store().files().set_budget(cfg_.fd_budget);
  // Large aligned writes go past the backing file's page cache on every node (store.h): a
  // slave's replica is read rarely, and a master's mount keeps what its users read in its own
  // page cache (keep_cache), which a second copy in the backing file's would only double. On a
  // sync pair the master's final fsync of a 1 GiB write then has no backing pages left to flush
  // (0.03-0.05 s against 0.24-0.38 s), and the write ran at 357-404 MiB/s with them cached
  // against 448-630 without (tools/bench/README.md, "The mount's dirty pages").
  node_->store().set_direct_writes(true);
  const Identity id = node_->identity();
  if (cfg_.block_size && !id.cluster_id.empty() && *cfg_.block_size != id.block_size)
    throw Error("block size mismatch: " + cfg_.data_path + " was created with --block-size " + std::to_string(id.block_size) +
                ", not " + std::to_string(*cfg_.block_size));
  if (cfg_.block_size && id.cluster_id.empty() && *cfg_.block_size != id.block_size)
    node_->update_identity([&](Identity& i) { i.block_size = *cfg_.block_size; });
  if (!slave && (id.cluster_id.empty() || id.role != "master")) {
    // A new volume, or a former slave mounted as a master: a new history starts here.
    node_->update_identity([&](Identity& i) {
      if (i.cluster_id.empty()) i.cluster_id = random_hex_id(16);
      i.lineage.push_back({random_hex_id(8), node_->last_lsn() + 1});
      i.role = "master";
    });
  }
  // A former master mounted as a slave: its new master refuses it if it wrote after their
  // histories forked (unless discard_my_data), and rewrites it by Merkle diff otherwise.
  // Hash trees for the Merkle re-attach, kept current from here on (recovered first if the
  // last stop was unclean).
  hashes_ = std::make_unique<HashIndex>(node_->store().files(), node_->root_fd(), node_->meta_fd(), cfg_.data_path,
                                        node_->identity().block_size, !cfg_.no_fsync);
  node_->store().set_hashes(hashes_.get());
  if (!cfg_.listen_address.empty() || slave)
    journal_ = std::make_unique<Journal>(cfg_.journal_bytes, 64u << 20, cfg_.ack_timeout);
  enter_role(role());
  if (slave) {
    // A node that applies received records keeps its file table current (the master's callers
    // pass descriptors instead). Kept after a promotion too: the table stays right either way.
    node_->store().set_track_files(true);
    node_->store().files().scan();
    FollowerConfig fc;
    fc.master_address = cfg_.master_address;
    fc.listen_address = cfg_.listen_address;
    fc.no_fsync = cfg_.no_fsync;
    fc.exit_on_disconnect = cfg_.exit_on_disconnect;
    fc.discard_my_data = cfg_.discard_my_data;
    fc.security = cfg_.security;
    fc.compress = cfg_.compress;
    fc.master_timeout = std::max(cfg_.ack_timeout, std::chrono::milliseconds(3000));
    follower_ = std::make_unique<Follower>(*node_, fc);
  }
}

bool Replica::needs_first_copy() const { return follower_ && !follower_->has_data(); }

AttachReport Replica::attach_progress() { return follower_ ? follower_->status().current_attach : AttachReport{}; }

void Replica::start() {
  if (follower_) {
    if (!follower_->has_data()) {
      LOG_INFO("replica %s is empty: attaching to %s", cfg_.data_path.c_str(), cfg_.master_address.c_str());
      follower_->attach_now();
    } else {
      // A replica with data is served even while its master is unreachable, but a master
      // that refuses it (another cluster, diverged) is an error the operator must see now.
      try {
        follower_->attach_now();
      } catch (const FatalAttachError&) {
        throw;
      } catch (const std::exception& e) {
        LOG_WARN("%s; serving the replica and retrying in the background", e.what());
      }
    }
  }
  if (journal_) {
    journal_->set_start(node_->last_lsn());
    node_->add_sink(journal_.get());
  }
  if (listen_fd_ >= 0) {
    UpstreamConfig uc;
    uc.listen_address = cfg_.listen_address;
    uc.ack = cfg_.ack;
    uc.ack_timeout = cfg_.ack_timeout;
    uc.min_sync_slaves = cfg_.min_sync_slaves;
    uc.security = cfg_.security;
    uc.compress = cfg_.compress;
    uc.assign_ids = role() == Role::master;
    upstream_ = std::make_unique<Upstream>(*node_, *journal_, uc);
    upstream_->start(listen_fd_);
    listen_fd_ = -1;
    // Barriers made here wait for our slaves only while we are the master: a slave's barriers
    // are its master's, which waits for its own slaves.
    node_->set_barrier_waiter(
        [this](Lsn lsn, Node::BarrierDone done) {
          if (writable()) upstream_->when_confirmed(lsn, std::move(done));
          else done(0);
        },
        [this](Lsn lsn) { upstream_->push(lsn); });
  }
}

void Replica::run_in_background(CacheInvalidator* invalidator, ExitHandler on_exit) {
  {
    // Not after a promotion that came in over the control socket before we got here.
    std::lock_guard lk(promote_mu_);
    if (follower_ && role() == Role::slave) {
      follower_->set_invalidator(invalidator);
      follower_->set_on_exit(std::move(on_exit));
      follower_->start();
    }
  }
  hashes_->start_checkpoints();
}

void Replica::serve_control(ControlServer::Handler handler) {
  control_ = std::make_unique<ControlServer>(control_socket_name(node_->identity().node_id), std::move(handler));
}

void Replica::stop() {
  if (stopped_ || !node_) return;
  stopped_ = true;
  if (follower_) follower_->stop();
  if (upstream_) upstream_->stop();
  control_.reset();
  if (journal_) {
    node_->remove_sink(journal_.get());
    journal_->close();
  }
  // Only a node that started as a master tells its next start where its LSNs ended; a slave's
  // position is its replica state, and a promoted one reserves ahead as after a crash.
  // A master (also one promoted from a slave) continues right after its last LSN next time, so
  // its slaves can keep streaming.
  if (role() == Role::master) node_->close_clean();
  node_->set_barrier_waiter(nullptr);
  upstream_.reset();
  follower_.reset();
  try {
    hashes_->close_clean();  // saves the trees, so the next start rehashes nothing
  } catch (const std::exception& e) {
    LOG_WARN("%s", e.what());
  }
  node_->store().set_hashes(nullptr);
  hashes_.reset();
}

Promotion Replica::promote() {
  std::lock_guard lk(promote_mu_);
  if (role() != Role::slave || !follower_) throw Error("this node is already a master");
  if (!follower_->has_data()) throw Error("this replica never completed an attach: it holds nothing to serve");
  follower_->stop();
  // What was applied becomes durable before the new history starts after it.
  if (int err = node_->store().sync_all()) throw_errno("cannot sync " + node_->data_path(), err);
  Promotion p;
  p.lsn = node_->last_lsn();
  p.lineage = random_hex_id(8);
  node_->update_identity([&](Identity& id) {
    id.lineage.push_back({p.lineage, p.lsn + 1});
    id.role = "master";
  });
  enter_role(Role::master);
  LOG_WARN("promoted to master at lsn %" PRIu64 ": new lineage %s", p.lsn, p.lineage.c_str());
  return p;
}

DiffReport Replica::verify(bool deep) {
  if (role() != Role::slave || !follower_) throw Error("this node is a master: run verify on a slave");
  // Compared while records keep arriving: a difference may only be a record in flight, so
  // differences count only if a second comparison, once we hold what the master had at the
  // first one, still finds them.
  DiffReport rep = follower_->verify(deep);
  for (int attempt = 0; attempt < 3 && !rep.differences.empty(); attempt++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    rep = follower_->verify(false);
  }
  return rep;
}

Replica::State Replica::state() {
  if (role() == Role::master) return State::master;
  if (!follower_) return State::disconnected;
  const std::string s = follower_->status().state;
  return s == "attaching" ? State::attaching : s == "streaming" ? State::streaming : State::disconnected;
}

ReplicaStatus Replica::status() {
  ReplicaStatus st;
  st.identity = node_->identity();
  st.data_path = node_->data_path();
  st.ack = cfg_.ack;
  st.no_fsync = cfg_.no_fsync;
  if (role() == Role::slave && follower_) {
    FollowerStatus fs = follower_->status();
    st.role = "slave";
    st.state = fs.state;
    st.lsn = fs.durable_lsn;
    st.upstream = std::move(fs);
  } else {
    st.role = "master";
    st.state = "master";
    st.lsn = node_->last_lsn();
  }
  if (upstream_) st.slaves = upstream_->slaves();
  return st;
}

}  // namespace blockrepl
