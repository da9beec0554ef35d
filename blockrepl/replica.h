// One member of a replicated volume as a single object (DESIGN.md section 4): it owns the Node,
// its hash trees, the journal, the upstream that serves slaves, the follower that tracks a master
// and the control socket, and holds the one answer to "what is this node now": a master, or a
// slave that is attaching, streaming or disconnected. Everything that depends on the role (the
// store's write mode, whether barriers wait for slaves, whether the mount takes changes) is set
// where the role changes, in one place. No FUSE in here: the mount asks writable().
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "blockrepl/cache_invalidator.h"
#include "blockrepl/control.h"
#include "blockrepl/follower.h"
#include "blockrepl/merkle.h"
#include "blockrepl/metadata.h"
#include "blockrepl/upstream.h"
#include "blockrepl/wire.h"

namespace blockrepl {

class HashIndex;
class Journal;
class Node;

struct ReplicaConfig {
  std::string data_path;       // the backing directory (absolute)
  std::string listen_address;  // serve slaves here ("" : none); port 0 picks a free one
  std::string master_address;  // follow this master ("" : be a master)
  AckLevel ack = AckLevel::sync;
  std::chrono::milliseconds ack_timeout{5000};
  unsigned min_sync_slaves = 0;
  uint64_t journal_bytes = 256ull << 20;  // records kept for re-attaching slaves
  std::optional<uint32_t> block_size;     // not given: the volume's (4096 for a new one)
  bool no_fsync = false;                  // slave: applied records are not made durable
  bool exit_on_disconnect = false;        // slave: give up when the master is lost
  bool discard_my_data = false;           // slave: a diverged volume may be rewritten
  size_t fd_budget = FileRegistry::kDefaultBudget;  // descriptors the file registry keeps open
  PeerSecurity security;  // secret and TLS, for the master it follows and the slaves it serves
  Compression compress;   // --compress: asked of its master, used for its slaves (batch_codec.h)
};

struct ReplicaStatus {
  std::string role;  // "master" | "slave"
  std::string state;  // "master" | "attaching" | "streaming" | "disconnected"
  Identity identity;
  std::string data_path;
  AckLevel ack = AckLevel::sync;
  bool no_fsync = false;
  Lsn lsn = 0;  // the last record durable here (a slave) or made here (a master)
  std::optional<FollowerStatus> upstream;  // a slave's view of its master
  std::vector<SlaveStatus> slaves;
};

struct Promotion {
  Lsn lsn = 0;          // the last LSN of the old history; the new lineage starts after it
  std::string lineage;  // the new lineage id
};

class Replica {
 public:
  enum class Role { master, slave };
  enum class State { master, attaching, streaming, disconnected };
  // Called (from the follower's thread) when a slave gives up: its master refused it, or it was
  // lost with exit_on_disconnect. `code` is the exit code to report.
  using ExitHandler = std::function<void(int code, const std::string& why)>;

  // Binds the listen address, so that a port in use is refused before anything is written to
  // the data directory (the caller takes the data directory's lock between this and open()).
  // Writes nothing. Throws Error. The values themselves are checked by whoever parsed them.
  explicit Replica(ReplicaConfig cfg);
  // Without stop(), leaves the volume as after a crash (the next open recovers it): what a
  // start that failed does.
  ~Replica();
  Replica(const Replica&) = delete;
  Replica& operator=(const Replica&) = delete;

  // Opens the volume in the data directory (creating it for a new master, or starting a new
  // history for a former slave mounted as a master) with its hash trees and journal. Throws Error.
  void open();
  // A slave attaches to its master (synchronously: one without a completed copy until it has
  // one, else one attempt, and it is served while its master is away, unless the master refused
  // it); a node with a listen address starts serving slaves. Throws Error (FatalAttachError
  // when the master refused).
  void start();
  // From here on (once the mount is up) a slave follows its master in the background, telling
  // `invalidator` (may be null) what it applied; every node checkpoints its hash trees.
  void run_in_background(CacheInvalidator* invalidator, ExitHandler on_exit);
  // Serves `handler` on the control socket of this node (`blockrepl status` and friends).
  void serve_control(ControlServer::Handler handler);
  // Stops following and serving and closes the volume cleanly (hash trees saved, so the next
  // start rehashes nothing). Idempotent.
  void stop();

  // A slave becomes a master (failover): it stops following, makes what it applied durable,
  // starts a new lineage after its last LSN and becomes writable; its own slaves keep
  // streaming. Throws Error saying why not (already a master, never attached).
  Promotion promote();
  // Compares this slave's hash trees with its master's (deep: rehash both first). Compared while
  // records keep arriving, so a difference counts only if it is still there a moment later.
  // Throws Error (on a master, or when the master cannot be reached).
  DiffReport verify(bool deep);

  // The one question the mount asks before a change: a master takes changes, a slave refuses
  // them (EROFS) until promoted.
  bool writable() const { return role_.load(std::memory_order_acquire) == Role::master; }
  Role role() const { return role_.load(std::memory_order_acquire); }
  State state();
  ReplicaStatus status();
  // A slave that holds no completed copy yet: start() takes the first one.
  bool needs_first_copy() const;
  // While a slave attaches (from another thread, e.g. a progress display during start()): what
  // it received so far.
  AttachReport attach_progress();

  // The bound listen address ("" without one), with the port the kernel chose for port 0.
  const std::string& listen_address() const { return bound_address_; }
  const ReplicaConfig& config() const { return cfg_; }
  Node& node() { return *node_; }

 private:
  // Everything that follows from the role, set at once: the store's write mode, whether
  // barriers wait for slaves, and what writable() answers.
  void enter_role(Role role);

  ReplicaConfig cfg_;
  std::atomic<Role> role_;
  int listen_fd_ = -1;
  std::string bound_address_;
  std::unique_ptr<Node> node_;
  std::unique_ptr<HashIndex> hashes_;
  std::unique_ptr<Journal> journal_;
  std::unique_ptr<Follower> follower_;
  std::unique_ptr<Upstream> upstream_;
  std::unique_ptr<ControlServer> control_;
  std::mutex promote_mu_;  // one promotion at a time (status and verify may run alongside)
  bool stopped_ = false;
};

const char* replica_state_name(Replica::State state);

}  // namespace blockrepl
