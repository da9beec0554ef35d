// Helpers for the replication integration tests: masters, slaves and chains on loopback with
// free ports and their logs, status polling with deadlines, sync points, daemon pids, and a
// recursive comparison of two directory trees that reports every difference precisely.
#pragma once
#include <nlohmann/json.hpp>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "harness.h"

namespace blockrepl::test::repl {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Status and waiting

// `blockrepl status MNT --json`, parsed. On failure returns a discarded/null value and fills *err.
json status(const std::string& mnt, std::string* err = nullptr, int timeout_sec = 10);
// The "lsn" field of a node's status; throws std::runtime_error with the reason on failure.
uint64_t lsn_of(const std::string& mnt);

// Polls pred every `every` until it returns true or the deadline passes; returns its last value.
bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout,
                std::chrono::milliseconds every = std::chrono::milliseconds(50));

// Waits until the slave behind slave_mnt has made everything up to `lsn` durable (its status
// shows upstream.state "streaming" and upstream.durable_lsn >= lsn). Returns "" on success, else
// a description of what was last seen.
std::string wait_durable(const std::string& slave_mnt, uint64_t lsn, std::chrono::milliseconds timeout);

// A sync point on a mount: fsync every regular file and directory below it (the writeback cache
// flushes only what is fsynced), then fsync the root directory, so the last record is a barrier.
// Returns "" or what failed.
std::string sync_point(const std::string& mnt);

// sync_point(master), then waits until every slave is durable at the master's LSN; repeats if the
// master's LSN moved meanwhile. Returns "" or a description of which slave lagged and how.
std::string sync_and_wait(const std::string& master_mnt, const std::vector<std::string>& slave_mnts,
                          std::chrono::milliseconds timeout = std::chrono::seconds(30));

// ---------------------------------------------------------------------------------------------
// Processes

// The daemon's pid from DATA/.blockrepl/daemon.pid (0 if missing or unreadable).
pid_t daemon_pid(const std::string& data);
// Whether pid is a live process (a zombie counts as dead).
bool process_alive(pid_t pid);
// Waits until pid is dead; returns whether it died in time.
bool wait_dead(pid_t pid, std::chrono::milliseconds timeout);

// Sends SIGCONT to a stopped process when it goes out of scope (declare it after the Mount it
// belongs to, so that the daemon is running again before the Mount unmounts it).
class ContinueOnExit {
 public:
  explicit ContinueOnExit(pid_t pid = 0) : pid_(pid) {}
  ~ContinueOnExit();
  void set(pid_t pid) { pid_ = pid; }
  void cont();  // now (idempotent)
 private:
  pid_t pid_;
};

// ---------------------------------------------------------------------------------------------
// Nodes and clusters

struct Node {
  std::string name, data, mnt, log;
  int port = 0;  // listen port (0: none)
  std::string master_address;  // "" for a master
  std::vector<std::string> extra;  // the options it was mounted with
  std::unique_ptr<Mount> mount;

  std::string address() const { return "127.0.0.1:" + std::to_string(port); }
  std::string file(const std::string& rel) const { return mnt + "/" + rel; }
  std::string backing(const std::string& rel) const { return data + "/" + rel; }
  pid_t pid() const { return daemon_pid(data); }
  bool ok() const { return mount && mount->ok(); }
};

// Masters and slaves in one temporary directory; every node mounts with -v --log-file.
// Destroyed in reverse order (chain ends first); when the test failed, prints each node's log.
class Cluster {
 public:
  explicit Cluster(const std::string& tag);
  ~Cluster();
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  // A master on a fresh port; extra options such as {"--ack", "async"}.
  Node& add_master(const std::vector<std::string>& extra = {});
  // A slave of `upstream` (a master or a slave that listens); listen: serve slaves of its own.
  Node& add_slave(Node& upstream, const std::vector<std::string>& extra = {}, bool listen = false);
  // Creates a node without mounting it (to control exactly when it mounts).
  Node& define_master(const std::vector<std::string>& extra = {});
  Node& define_slave(Node& upstream, const std::vector<std::string>& extra = {}, bool listen = false);
  // Mounts (again) with the node's options; returns ok().
  bool mount(Node& n);
  void unmount(Node& n);
  // Detaches a dead mount (daemon killed): fusermount3 -u -z.
  void detach(Node& n);

  std::string path() const { return tmp_.path(); }
  // A new data directory path()/vault/data, its parent `vault` of mode 0700 (root-only). When
  // path() itself must be reachable by other users (a database server on a mount), a slave's data
  // directory goes there: blockrepl refuses a replica's data directory that unprivileged users
  // can reach. The data directory itself is 0755, as a volume root may be.
  std::string private_data_dir(const std::string& vault) const;
  std::string log_tail(const Node& n, size_t max_bytes = 6000) const;
  std::string all_logs() const;

 private:
  Node& define(const std::string& name, const std::string& master_address, const std::vector<std::string>& extra,
               bool listen);
  TempDir tmp_;
  std::vector<std::unique_ptr<Node>> nodes_;
};

// ---------------------------------------------------------------------------------------------
// Tree comparison

struct Entry {
  std::string type;  // "file", "dir", "symlink", "fifo", "chr", "blk", "sock"
  mode_t mode = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  uint64_t size = 0;
  nlink_t nlink = 0;
  dev_t rdev = 0;
  ino_t ino = 0;
  timespec mtime{0, 0};
  std::string link_target;
  std::map<std::string, std::string> xattrs;  // user.* only
  bool has_fid = false;
  std::string fid;  // raw value of trusted.blockrepl.fid
};

// Every entry below root (relative paths, "" is the root itself), skipping the top-level
// .blockrepl folder. Throws std::runtime_error if root cannot be read.
std::map<std::string, Entry> scan_tree(const std::string& root, bool with_fid = true);

struct CompareOptions {
  bool fid = true;          // compare trusted.blockrepl.fid (backing directories only)
  bool require_fid = true;  // and require it on regular files
  bool file_mtimes = false; // compare regular files' mtimes (only after a sync point)
  bool dir_mtimes = true;   // compare directories' mtimes (replicas copy the master's)
  bool contents = true;
  bool ownership = true;
  size_t max_reports = 40;
};

// All differences between trees a and b (empty: identical), one line each, e.g.
//   "db/x: size 4096 (master) vs 8192 (slave)" or "f: contents differ at byte 12288 ...".
std::vector<std::string> compare_trees(const std::string& a, const std::string& b, const CompareOptions& opts = {},
                                       const std::string& a_name = "a", const std::string& b_name = "b");
// The same, as one printable string ("" when identical).
std::string diff_report(const std::string& a, const std::string& b, const CompareOptions& opts = {},
                        const std::string& a_name = "a", const std::string& b_name = "b");

// Difference between two scans of the same tree (e.g. before and after a refused mount),
// including file contents through a content digest taken at scan time.
// with_fid = false leaves trusted.blockrepl.fid out (a volume's first mount tags its files; that
// loses nothing).
std::map<std::string, std::string> manifest(const std::string& root, bool with_fid = true);  // path -> description+digest
std::string manifest_diff(const std::map<std::string, std::string>& before,
                          const std::map<std::string, std::string>& after);

// ---------------------------------------------------------------------------------------------
// Small file utilities

std::string random_bytes(uint64_t seed, size_t n);
// pwrite all of data at offset on fd (throws with errno on failure).
void pwrite_all(int fd, const std::string& data, off_t offset);
std::string pread_all(int fd, size_t n, off_t offset);

}  // namespace blockrepl::test::repl
